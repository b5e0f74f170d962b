"""``tlsproxy webhook --provision-secret … --webhook-configuration tlsproxy``: the webhook fills its own
Secret and keeps caBundle of the MutatingWebhookConfiguration of config/webhook/ equal to its ca.crt
(on start, after a rotation, after a hand edit). The stand-in API server plays the cluster; the test
plays the API server calling the webhook, trusting only caBundle."""

from __future__ import annotations

import base64
import datetime as dt
import json
import socket
import ssl
import subprocess
import time
from pathlib import Path

import yaml

from tests.k8s.helpers import metric, serial_of, tlsproxy, wait_for
from tests.k8s_standin import MWC, SECRETS
from tlsproxy.certs import provision
from tlsproxy.certs.provision import CA, CA_KEY, CERT, KEY

ROOT = Path(__file__).resolve().parents[2]
NS, SECRET, SERVICE_NAME = "tlsproxy-system", "tlsproxy-webhook-tls", "tlsproxy-webhook.tlsproxy-system.svc"


def bundles(standin) -> list[str | None]:
    obj = standin.get(MWC, "", "tlsproxy") or {}
    return [(h.get("clientConfig") or {}).get("caBundle") for h in obj.get("webhooks", [])]


def review(port: int, ca_bundle_b64: str) -> dict:
    """What the API server does: POST an AdmissionReview, trusting only caBundle, to the Service name."""
    body = json.dumps({"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview", "request": {
        "uid": "u-1", "namespace": "demo", "operation": "CREATE",
        "object": {"metadata": {"name": "p", "annotations": {"tlsproxy.io/inject": "enabled"}},
                   "spec": {"containers": [{"name": "app", "image": "app"}]}}}}).encode()
    ctx = ssl.create_default_context(cadata=base64.b64decode(ca_bundle_b64).decode())
    with socket.create_connection(("127.0.0.1", port), timeout=5) as raw, \
            ctx.wrap_socket(raw, server_hostname=SERVICE_NAME) as tls:
        tls.sendall(b"POST /mutate HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                    b"Connection: close\r\nContent-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
        data = b""
        while chunk := tls.recv(65536):
            data += chunk
    head, _, payload = data.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200"), head
    return json.loads(payload)


def test_webhook_provisions_itself_and_keeps_cabundle_current(standin, tmp_path):
    mwc = yaml.safe_load((ROOT / "config" / "webhook" / "mutatingwebhook.yaml").read_text())
    secret = yaml.safe_load((ROOT / "config" / "webhook" / "secret.yaml").read_text())
    standin.put(MWC, "", "tlsproxy", mwc)                   # as `kubectl apply -k config/webhook/` leaves it
    standin.put(SECRETS, NS, SECRET, secret)
    assert bundles(standin) == [None, None]
    args = ["--provision-secret", f"{NS}/{SECRET}", "--webhook-configuration", "tlsproxy",
            "--kubeconfig", str(standin.kubeconfig())]
    with tlsproxy(tmp_path, *args, command="webhook") as hook:
        assert wait_for(hook.ready, 30), hook.logs()
        data = standin.secret_data(NS, SECRET)
        want = base64.b64encode(data[CA]).decode()
        assert wait_for(lambda: bundles(standin) == [want, want], 5), hook.logs()
        answer = review(hook.port, want)
        assert answer["response"]["allowed"] and answer["response"]["uid"] == "u-1"

        # a hand edit (or a re-apply without caBundle) is put back within a second
        edited = standin.get(MWC, "", "tlsproxy")
        edited["webhooks"][1]["clientConfig"]["caBundle"] = base64.b64encode(b"not a CA").decode()
        edited["webhooks"][0]["clientConfig"].pop("caBundle")
        standin.put(MWC, "", "tlsproxy", edited)
        start = time.monotonic()
        assert wait_for(lambda: bundles(standin) == [want, want], 2, 0.02), hook.logs()
        assert time.monotonic() - start < 1.5
        # the patch touched only caBundle: everything else of the entries is as applied
        now = standin.get(MWC, "", "tlsproxy")
        for applied, kept in zip(mwc["webhooks"], now["webhooks"], strict=True):
            kept = dict(kept, clientConfig={k: v for k, v in kept["clientConfig"].items() if k != "caBundle"})
            assert kept == applied

        # a new CA in the Secret (a re-provisioning): caBundle follows, the webhook serves its leaf
        new = provision.plan(None, provision.Policy(provision.service_dns_names("tlsproxy-webhook", NS)),
                             dt.datetime.now(dt.UTC)).data
        standin.put_secret(NS, SECRET, new)
        want2 = base64.b64encode(new[CA]).decode()
        assert wait_for(lambda: bundles(standin) == [want2, want2], 2, 0.02), hook.logs()
        assert wait_for(lambda: _serves(hook.port, want2) == serial_of(new[CERT]), 2, 0.05)
        assert review(hook.port, want2)["response"]["allowed"]
        assert wait_for(lambda: metric(hook.metrics(), "tlsproxy_webhook_cabundle_patches_total",
                                       result="patched") == 3, 5, 0.1), hook.logs()
        assert set(new) == {CERT, KEY, CA, CA_KEY}


def _serves(port: int, bundle_b64: str) -> int | None:
    try:
        ctx = ssl.create_default_context(cadata=base64.b64decode(bundle_b64).decode())
        with socket.create_connection(("127.0.0.1", port), timeout=5) as raw, \
                ctx.wrap_socket(raw, server_hostname=SERVICE_NAME) as tls:
            from cryptography import x509

            return x509.load_der_x509_certificate(tls.getpeercert(True)).serial_number
    except (OSError, ssl.SSLError):
        return None


def test_webhook_flag_errors_are_one_line(tmp_path):
    from tests.support import TLSPROXY

    r = subprocess.run([TLSPROXY, "webhook", "--cert-dir", str(tmp_path), "--webhook-configuration",
                        "tlsproxy"], capture_output=True, text=True, timeout=30)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "needs --provision-secret" in r.stderr
    r = subprocess.run([TLSPROXY, "webhook", "--provision-secret", "a/b", "--webhook-configuration", "ns/x"],
                       capture_output=True, text=True, timeout=30)
    assert r.returncode == 2 and "has no namespace" in r.stderr


def test_two_webhook_replicas_agree_on_one_certificate_and_one_cabundle(standin, tmp_path):
    """config/webhook/ runs two replicas: both start on the empty Secret at once."""
    mwc = yaml.safe_load((ROOT / "config" / "webhook" / "mutatingwebhook.yaml").read_text())
    standin.put(MWC, "", "tlsproxy", mwc)
    secret = yaml.safe_load((ROOT / "config" / "webhook" / "secret.yaml").read_text())
    standin.put(SECRETS, NS, SECRET, secret)
    args = ["--provision-secret", f"{NS}/{SECRET}", "--webhook-configuration", "tlsproxy",
            "--kubeconfig", str(standin.kubeconfig())]
    with tlsproxy(tmp_path, *args, command="webhook") as a, tlsproxy(tmp_path, *args, command="webhook") as b:
        assert wait_for(lambda: a.ready() and b.ready(), 30), a.logs() + b.logs()
        data = standin.secret_data(NS, SECRET)
        want = base64.b64encode(data[CA]).decode()
        assert wait_for(lambda: bundles(standin) == [want, want], 5), a.logs() + b.logs()
        assert len([w for w in standin.writes() if w[2] == 200]) == 1      # one Secret write won
        for hook in (a, b):
            assert _serves(hook.port, want) == serial_of(data[CERT])
            assert review(hook.port, want)["response"]["allowed"]
        time.sleep(0.5)                                  # nothing keeps patching: one caBundle, settled
        patched = metric(a.metrics() + b.metrics(), "tlsproxy_webhook_cabundle_patches_total",
                         result="patched")
        assert 1 <= patched <= 2 and bundles(standin) == [want, want]
