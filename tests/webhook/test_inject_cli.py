"""`tlsproxy inject -f FILE|-`: the real command, on multi-document YAML with every workload kind."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

from tlsproxy.webhook.k8s_yaml import TEMPLATE_PATHS, inject_text, split_documents

TLSPROXY = [str(Path(sys.executable).parent / "tlsproxy")]

POD_SPEC = {"containers": [{"name": "app", "image": "example/app:1", "ports": [{"containerPort": 8080}]}]}
TEMPLATE = {"metadata": {"labels": {"app": "web"}}, "spec": POD_SPEC}
SELECTOR = {"matchLabels": {"app": "web"}}
JOB_TEMPLATE = {"metadata": {"labels": {"app": "web"}}, "spec": {**POD_SPEC, "restartPolicy": "Never"}}

WORKLOADS = [
    {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "web"}, "spec": POD_SPEC},
    {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "web"},
     "spec": {"selector": SELECTOR, "template": TEMPLATE}},
    {"apiVersion": "apps/v1", "kind": "StatefulSet", "metadata": {"name": "web"},
     "spec": {"selector": SELECTOR, "serviceName": "web", "template": TEMPLATE}},
    {"apiVersion": "apps/v1", "kind": "DaemonSet", "metadata": {"name": "web"},
     "spec": {"selector": SELECTOR, "template": TEMPLATE}},
    {"apiVersion": "apps/v1", "kind": "ReplicaSet", "metadata": {"name": "web"},
     "spec": {"selector": SELECTOR, "template": TEMPLATE}},
    {"apiVersion": "batch/v1", "kind": "Job", "metadata": {"name": "web"},
     "spec": {"template": JOB_TEMPLATE}},
    {"apiVersion": "batch/v1", "kind": "CronJob", "metadata": {"name": "web"},
     "spec": {"schedule": "0 0 * * *", "jobTemplate": {"spec": {"template": JOB_TEMPLATE}}}},
]

OTHER = """# kept verbatim, comments and all
apiVersion: v1
kind: Service
metadata:
  name: web   # trailing comment
spec: {ports: [{port: 443, targetPort: 9443}], selector: {app: web}}
"""


def build_input() -> str:
    docs = [OTHER] + [yaml.safe_dump(w, sort_keys=False) for w in WORKLOADS]
    return "---\n".join(docs)


def run(args, stdin=None):
    return subprocess.run(TLSPROXY + args, input=stdin, capture_output=True, text=True, timeout=60)


def template_of(doc):
    t = doc
    for key in TEMPLATE_PATHS[doc["kind"]]:
        t = t[key]
    return t


def test_every_workload_kind_is_injected_and_valid(tmp_path):
    src = tmp_path / "in.yaml"
    src.write_text(build_input())
    r = run(["inject", "-f", str(src), "--image", "registry.example/tlsproxy:9"])
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith(OTHER)                       # untouched byte for byte
    docs = list(yaml.safe_load_all(r.stdout))
    assert [d["kind"] for d in docs] == ["Service"] + [w["kind"] for w in WORKLOADS]
    for doc in docs:
        kubernetes_validate.validate(doc, "1.33", strict=True)
        if doc["kind"] == "Service":
            continue
        t = template_of(doc)
        assert t["metadata"]["annotations"]["tlsproxy.io/status"] == "injected"
        sidecar = t["spec"]["initContainers"][0]
        assert sidecar["name"] == "tlsproxy" and sidecar["image"] == "registry.example/tlsproxy:9"
        assert sidecar["restartPolicy"] == "Always"
    assert r.stderr.count(" injected") == len(WORKLOADS)


def test_stdin_and_idempotent():
    first = run(["inject", "-f", "-"], stdin=build_input())
    assert first.returncode == 0, first.stderr
    second = run(["inject", "-f", "-"], stdin=first.stdout)
    assert second.returncode == 0
    assert second.stdout == first.stdout
    assert "skipped: already injected" in second.stderr


def test_opt_out_is_left_verbatim():
    doc = yaml.safe_dump({**WORKLOADS[1], "spec": {"selector": SELECTOR, "template": {
        "metadata": {"annotations": {"tlsproxy.io/inject": "disabled"}}, "spec": POD_SPEC}}})
    out, reports = inject_text(doc)
    assert out == doc and "disabled" in reports[0].decision.reason


@pytest.mark.parametrize("content, message", [
    ("a: [\n", "not valid YAML"),
    (yaml.safe_dump({**WORKLOADS[0], "metadata": {"name": "web", "annotations": {
        "tlsproxy.io/port": "https"}}}), "pod/web: annotation tlsproxy.io/port"),
])
def test_errors_are_one_line_exit_2(content, message):
    r = run(["inject", "-f", "-"], stdin=content)
    assert r.returncode == 2
    assert r.stdout == ""
    assert r.stderr.startswith("tlsproxy: error: ") and message in r.stderr
    assert r.stderr.count("\n") == 1


def test_missing_file_and_bad_image():
    r = run(["inject", "-f", "/nonexistent/x.yaml"])
    assert r.returncode == 2 and r.stderr.startswith("tlsproxy: error: -f /nonexistent/x.yaml")
    r = run(["inject", "-f", "-", "--image", "a b"], stdin="")
    assert r.returncode == 2 and "--image" in r.stderr


def test_split_documents_round_trips():
    text = "a: 1\n---\nb: 2\n--- # c\nc: 3\n"
    assert "".join(sep + body for sep, body in split_documents(text)) == text
