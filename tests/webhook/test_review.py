"""AdmissionReview in/out against the real request bodies in ../shared/k8s-samples/."""

from __future__ import annotations

import base64
import copy
import json

import jsonpatch
import kubernetes_validate
import pytest

from tests.webhook.samples import SAMPLE_FILES, SAMPLES, sample_files
from tlsproxy.webhook.review import PATHS, ReviewError, handle, respond


def test_the_samples_are_there():
    """../shared/k8s-samples is an input of this suite: absent, the suite fails (never skips)."""
    assert len(sample_files()) >= 1


def load(name: str) -> dict:
    return json.loads((SAMPLES / name).read_text())


def patched_pod(review: dict, response: dict) -> dict:
    patch = json.loads(base64.b64decode(response["response"]["patch"]))
    pod = jsonpatch.apply_patch(review["request"]["object"], patch)
    pod.setdefault("apiVersion", "v1")
    pod.setdefault("kind", "Pod")
    kubernetes_validate.validate(pod, "1.33", strict=True)
    return pod


@pytest.mark.parametrize("path", SAMPLE_FILES, ids=lambda p: p.name)
def test_every_sample_namespace_default(path):
    review = json.loads(path.read_text())
    review.pop("response", None)   # the kyverno sample carries its own answer; we answer the request
    outcome = handle("/mutate-namespace", json.dumps(review).encode())
    r = outcome.response
    assert r["apiVersion"] == review["apiVersion"] and r["kind"] == "AdmissionReview"
    assert r["response"]["uid"] == review["request"]["uid"]
    assert r["response"]["allowed"] is True and r["response"]["patchType"] == "JSONPatch"
    pod = patched_pod(review, r)
    names = [c["name"] for c in pod["spec"]["initContainers"]]
    assert names[0] == "tlsproxy"
    assert pod["metadata"]["annotations"]["tlsproxy.io/status"] == "injected"
    # the namespace of the log label comes from the request when the object has none
    assert outcome.pod.startswith(review["request"]["namespace"] + "/")


@pytest.mark.parametrize("path", SAMPLE_FILES, ids=lambda p: p.name)
def test_every_sample_annotated_only(path):
    review = json.loads(path.read_text())
    outcome = handle("/mutate", path.read_bytes())
    assert outcome.action == "skipped"
    assert outcome.response["response"] == {"uid": review["request"]["uid"], "allowed": True}
    review["request"]["object"].setdefault("metadata", {}).setdefault("annotations", {})[
        "tlsproxy.io/inject"] = "enabled"
    outcome = handle("/mutate", json.dumps(review).encode())
    assert outcome.action == "injected"
    patched_pod(review, outcome.response)


def test_v1beta1_answered_in_v1beta1_and_generate_name():
    review = load("pod-create-v1beta1-sidecar-injector-connctd-sqlbee.json")
    outcome = respond(review, namespace_default=True)
    assert outcome.response["apiVersion"] == "admission.k8s.io/v1beta1"
    assert outcome.pod == "default/echoheaders-deployment-6f8fb55c79-*"
    pod = patched_pod(review, outcome.response)
    assert "name" not in pod["metadata"]


def test_denial_names_annotation_and_echoes_uid():
    review = load("pod-create-v1-replicaset-edcelvista.json")
    review["request"]["object"]["metadata"].setdefault("annotations", {}).update(
        {"tlsproxy.io/inject": "enabled", "tlsproxy.io/port": "https"})
    r = respond(review, namespace_default=False)
    assert r.action == "denied"
    resp = r.response["response"]
    assert resp["uid"] == review["request"]["uid"] and resp["allowed"] is False
    assert "tlsproxy.io/port" in resp["status"]["message"] and resp["status"]["code"] == 400
    assert "patch" not in resp


def test_asked_but_skipped_warns():
    review = load("pod-create-v1-replicaset-edcelvista.json")
    obj = review["request"]["object"]
    obj["metadata"].setdefault("annotations", {})["tlsproxy.io/inject"] = "enabled"
    obj["spec"]["hostNetwork"] = True
    r = respond(review, namespace_default=False)
    assert r.action == "skipped" and "hostNetwork" in r.reason
    assert "hostNetwork" in r.response["response"]["warnings"][0]


def test_not_a_pod_create_is_allowed_untouched():
    review = load("pod-create-v1-replicaset-edcelvista.json")
    update = copy.deepcopy(review)
    update["request"]["operation"] = "UPDATE"
    r = respond(update, namespace_default=True)
    assert r.action == "ignored" and r.response["response"] == {"uid": review["request"]["uid"],
                                                                "allowed": True}


@pytest.mark.parametrize("path, body, status", [
    ("/nope", b"{}", 404),
    ("/mutate", b"not json", 400),
    ("/mutate", b"[1,2]", 400),
    ("/mutate", b'{"kind":"AdmissionReview","apiVersion":"admission.k8s.io/v2"}', 400),
    ("/mutate", b'{"kind":"AdmissionReview","apiVersion":"admission.k8s.io/v1","request":{}}', 400),
    ("/mutate", b"x" * (4 * 1024 * 1024), 413),
])
def test_unanswerable_requests(path, body, status):
    with pytest.raises(ReviewError) as info:
        handle(path, body)
    assert info.value.status == status


def test_paths():
    assert PATHS == {"/mutate": False, "/mutate-namespace": True}
