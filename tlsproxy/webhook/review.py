"""AdmissionReview in, AdmissionReview out: pure, no I/O.

The API server POSTs an ``AdmissionReview`` (``admission.k8s.io/v1``, or ``v1beta1`` from old servers)
and expects one back in the same apiVersion, echoing ``request.uid``. A mutation is a base64-encoded
JSON Patch with ``patchType: JSONPatch``; a denial is ``allowed: false`` with ``status.message`` (shown
to the user by kubectl as "admission webhook ... denied the request: <message>").

Two URL paths, one per MutatingWebhookConfiguration entry (see config/webhook/mutatingwebhook.yaml):
``/mutate`` injects only pods annotated ``tlsproxy.io/inject: enabled``; ``/mutate-namespace`` is called
for namespaces labelled ``tlsproxy.io/inject=enabled`` and injects every pod that does not opt out.
The label decides in the API server (namespaceSelector), so the webhook needs no API access.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from .injector import DEFAULT_OPTIONS, Decision, Denied, Injected, InjectOptions, Skipped, decide

API_VERSIONS = ("admission.k8s.io/v1", "admission.k8s.io/v1beta1")
PATHS = {"/mutate": False, "/mutate-namespace": True}   # path -> inject by default
MAX_REVIEW_BYTES = 3 * 1024 * 1024   # etcd's 1.5 MiB object limit, twice (object + oldObject) plus slack


class ReviewError(Exception):
    """Not an AdmissionReview we can answer; ``status`` is the HTTP status for the reply."""

    def __init__(self, reason: str, status: int = 400) -> None:
        super().__init__(reason)
        self.reason = reason
        self.status = status


@dataclass(frozen=True, slots=True)
class Outcome:
    """The answer plus what to log: ``action`` is injected, skipped, denied or ignored."""

    response: dict[str, Any]
    action: str
    reason: str
    pod: str        # namespace/name, best effort (generateName pods have no name yet)


def parse(body: bytes) -> dict[str, Any]:
    if len(body) > MAX_REVIEW_BYTES:
        raise ReviewError(f"AdmissionReview larger than {MAX_REVIEW_BYTES} bytes", 413)
    try:
        review = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        raise ReviewError("body is not JSON") from None
    if not isinstance(review, dict):
        raise ReviewError("body is not a JSON object")
    return review


def respond(review: Mapping[str, Any], *, namespace_default: bool,
            options: InjectOptions = DEFAULT_OPTIONS) -> Outcome:
    """Answer one decoded AdmissionReview."""
    api_version = review.get("apiVersion")
    if review.get("kind") != "AdmissionReview" or api_version not in API_VERSIONS:
        raise ReviewError(f"expected kind AdmissionReview with apiVersion {' or '.join(API_VERSIONS)}")
    request = review.get("request")
    if not isinstance(request, dict) or not isinstance(request.get("uid"), str) or not request["uid"]:
        raise ReviewError("AdmissionReview has no request.uid")
    pod = request.get("object")
    kind = (request.get("kind") or {}).get("kind")
    label = _pod_label(request, pod if isinstance(pod, dict) else {})
    if kind != "Pod" or request.get("operation", "CREATE") != "CREATE" or not isinstance(pod, dict):
        why = f"not a Pod CREATE ({kind} {request.get('operation')})"
        return Outcome(_answer(api_version, request["uid"], True), "ignored", why, label)
    decision = decide(pod, namespace_default=namespace_default, options=options)
    return _outcome(api_version, request["uid"], decision, label)


def _outcome(api_version: str, uid: str, decision: Decision, label: str) -> Outcome:
    if isinstance(decision, Injected):
        patch = base64.b64encode(json.dumps(list(decision.patch), separators=(",", ":")).encode()).decode()
        response = _answer(api_version, uid, True, patchType="JSONPatch", patch=patch)
        return Outcome(response, "injected", "", label)
    if isinstance(decision, Denied):
        response = _answer(api_version, uid, False,
                           status={"code": 400, "reason": "BadRequest",
                                   "message": f"tlsproxy: {decision.reason}"})
        return Outcome(response, "denied", decision.reason, label)
    assert isinstance(decision, Skipped)
    extra: dict[str, Any] = {}
    if decision.asked and api_version == "admission.k8s.io/v1":
        # The pod asked for the sidecar and runs without it: tell whoever created it.
        extra["warnings"] = [f"tlsproxy: not injected: {decision.reason}"]
    return Outcome(_answer(api_version, uid, True, **extra), "skipped", decision.reason, label)


def _answer(api_version: str, uid: str, allowed: bool, **fields: Any) -> dict[str, Any]:
    return {"apiVersion": api_version, "kind": "AdmissionReview",
            "response": {"uid": uid, "allowed": allowed, **fields}}


def _pod_label(request: Mapping[str, Any], pod: Mapping[str, Any]) -> str:
    """``namespace/name`` for logs: request.name, then metadata.name, then generateName + ``*``."""
    metadata = pod.get("metadata") or {}
    namespace = request.get("namespace") or metadata.get("namespace") or "?"
    name = request.get("name") or metadata.get("name")
    if not name:
        name = (metadata.get("generateName") or "?") + "*"
    return f"{namespace}/{name}"


def handle(path: str, body: bytes, options: InjectOptions = DEFAULT_OPTIONS) -> Outcome:
    """Path + raw body → Outcome; raises ReviewError (with an HTTP status) for anything unanswerable."""
    if path.split("?", 1)[0] not in PATHS:
        raise ReviewError(f"no such path; use {' or '.join(PATHS)}", 404)
    return respond(parse(body), namespace_default=PATHS[path.split("?", 1)[0]], options=options)
