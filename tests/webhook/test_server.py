"""`tlsproxy webhook` over real HTTPS: real AdmissionReview bodies, a real client (httpx, CA file),
the returned patch applied with jsonpatch and the pod validated against the 1.33 schema."""

from __future__ import annotations

import base64
import json
import os
import select
import signal
import socket
import ssl
import subprocess
import sys
import time
from pathlib import Path

import httpx
import jsonpatch
import kubernetes_validate
import pytest
import trio

from tests.webhook.samples import sample_files
from tlsproxy.certs.generate import issue, make_ca
from tlsproxy.config import build_settings
from tlsproxy.webhook.injector import InjectOptions
from tlsproxy.webhook.review import MAX_REVIEW_BYTES
from tlsproxy.webhook.server import Webhook, WebhookConfig

TLSPROXY = str(Path(sys.executable).parent / "tlsproxy")


@pytest.fixture
def pki(tmp_path):
    ca = make_ca()
    leaf = issue(ca, "tlsproxy-webhook.tlsproxy-system.svc", dns=("localhost",), ips=("127.0.0.1",))
    d = tmp_path / "tls"
    d.mkdir()
    (d / "tls.crt").write_bytes(leaf.cert_pem)
    (d / "tls.key").write_bytes(leaf.key_pem)
    (d / "ca.crt").write_bytes(ca.cert_pem)
    return {"ca": ca, "dir": d, "ca_file": d / "ca.crt", "leaf": leaf}


def settings_for(pki):
    return build_settings({"listen": "127.0.0.1:0", "admin": "127.0.0.1:0", "cert-dir": str(pki["dir"]),
                           "drain-delay": "0"}, env={})


async def start(nursery, pki, **kw):
    webhook = Webhook(WebhookConfig(settings_for(pki), InjectOptions(image="tlsproxy:under-test"), **kw))
    return await nursery.start(webhook.run)


def check_response(review, answer):
    assert answer["apiVersion"] == review["apiVersion"] and answer["kind"] == "AdmissionReview"
    assert answer["response"]["uid"] == review["request"]["uid"]
    assert answer["response"]["allowed"] is True and answer["response"]["patchType"] == "JSONPatch"
    patch = json.loads(base64.b64decode(answer["response"]["patch"]))
    pod = jsonpatch.apply_patch(review["request"]["object"], patch)
    pod.setdefault("apiVersion", "v1")
    pod.setdefault("kind", "Pod")
    kubernetes_validate.validate(pod, "1.33", strict=True)
    return pod


async def test_samples_over_https_one_keepalive_connection(pki):
    samples = sample_files()
    async with trio.open_nursery() as nursery:
        webhook = await start(nursery, pki)
        url = f"https://127.0.0.1:{webhook.bound_tls.port}"
        with trio.fail_after(30):
            async with httpx.AsyncClient(verify=ssl.create_default_context(cafile=str(pki["ca_file"])),
                                         base_url=url) as client:
                for path in samples:
                    review = json.loads(path.read_text())
                    review.pop("response", None)
                    r = await client.post("/mutate-namespace", content=json.dumps(review),
                                          headers={"Content-Type": "application/json"})
                    assert r.status_code == 200 and r.headers["content-type"] == "application/json"
                    tls = r.extensions["network_stream"].get_extra_info("ssl_object")
                    assert tls.version() == "TLSv1.3"
                    pod = check_response(review, r.json())
                    sidecar = pod["spec"]["initContainers"][0]
                    assert sidecar["name"] == "tlsproxy" and sidecar["image"] == "tlsproxy:under-test"
                # annotated-only path: the samples carry no tlsproxy annotation -> allowed, no patch
                review = json.loads(samples[0].read_text())
                r = await client.post("/mutate", content=json.dumps(review))
                assert r.json()["response"] == {"uid": review["request"]["uid"], "allowed": True}
                admin = f"http://127.0.0.1:{webhook.bound_admin.port}"
                ready = await client.get(admin + "/readyz")
                assert ready.status_code == 200
                metrics = (await client.get(admin + "/metrics")).text
                assert f'tlsproxy_webhook_reviews_total{{action="injected"}} {len(samples)}.0' in metrics
        nursery.cancel_scope.cancel()


@pytest.mark.parametrize("method, path, body, status", [
    ("GET", "/mutate", b"", 405),
    ("POST", "/validate", b"{}", 404),
    ("POST", "/mutate", b"{not json", 400),
    ("POST", "/mutate", b'{"kind":"AdmissionReview","apiVersion":"admission.k8s.io/v1"}', 400),
    ("POST", "/mutate", b"x" * (MAX_REVIEW_BYTES + 1), 413),
])
async def test_bad_requests_get_clear_statuses(pki, method, path, body, status):
    async with trio.open_nursery() as nursery:
        webhook = await start(nursery, pki)
        with trio.fail_after(30):
            async with httpx.AsyncClient(verify=ssl.create_default_context(cafile=str(pki["ca_file"]))) as c:
                r = await c.request(method, f"https://127.0.0.1:{webhook.bound_tls.port}{path}", content=body)
        assert r.status_code == status
        assert r.json()["error"]
        nursery.cancel_scope.cancel()


def served_serial(port: int, ca_file: Path) -> int:
    ctx = ssl.create_default_context(cafile=str(ca_file))
    with socket.create_connection(("127.0.0.1", port), timeout=5) as raw, \
            ctx.wrap_socket(raw, server_hostname="localhost") as tls:
        from cryptography import x509

        return x509.load_der_x509_certificate(tls.getpeercert(binary_form=True)).serial_number


async def test_certificate_rotation_is_picked_up_and_bad_material_is_refused(pki):
    async with trio.open_nursery() as nursery:
        webhook = await start(nursery, pki, reload_check_s=0.05)
        port = webhook.bound_tls.port
        first = await trio.to_thread.run_sync(served_serial, port, pki["ca_file"])
        assert first == pki["leaf"].cert.serial_number
        # a broken pair (key of another certificate) must not replace the working one
        other = issue(pki["ca"], "other", dns=("localhost",))
        (pki["dir"] / "tls.key").write_bytes(other.key_pem)
        await trio.sleep(0.3)
        assert await trio.to_thread.run_sync(served_serial, port, pki["ca_file"]) == first
        assert webhook.store.last_error
        # a good new pair, written like kubelet would (new files, then rename), is served
        new = issue(pki["ca"], "tlsproxy-webhook.tlsproxy-system.svc", dns=("localhost",), ips=("127.0.0.1",))
        for name, data in (("tls.crt", new.cert_pem), ("tls.key", new.key_pem)):
            tmp = pki["dir"] / f".{name}.tmp"
            tmp.write_bytes(data)
            os.replace(tmp, pki["dir"] / name)
        wanted = new.cert.serial_number
        with trio.fail_after(10):
            while True:  # noqa: ASYNC110 - polling a real socket, there is no event to wait on
                if await trio.to_thread.run_sync(served_serial, port, pki["ca_file"]) == wanted:
                    break
                await trio.sleep(0.05)
        nursery.cancel_scope.cancel()


def _wait_for_line(proc: subprocess.Popen, event: str, timeout_s: float) -> dict:
    deadline = time.monotonic() + timeout_s
    buf = b""
    while time.monotonic() < deadline:
        ready, _, _ = select.select([proc.stderr], [], [], 0.2)
        if not ready:
            if proc.poll() is not None:
                break
            continue
        chunk = os.read(proc.stderr.fileno(), 65536)
        if not chunk:
            break
        buf += chunk
        for line in buf.decode(errors="replace").splitlines():
            if line.startswith("{") and json.loads(line).get("event") == event:
                return json.loads(line)
    raise AssertionError(f"no {event!r} line; output: {buf.decode(errors='replace')[-2000:]}")


def test_cli_webhook_process(pki):
    samples = sample_files()
    proc = subprocess.Popen([TLSPROXY, "webhook", "--listen", "127.0.0.1:0", "--admin", "127.0.0.1:0",
                             "--cert-dir", str(pki["dir"]), "--image", "example.registry/tlsproxy:7",
                             "--log-format", "json", "--drain-delay", "0"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        ready = _wait_for_line(proc, "webhook ready", 20)
        port = int(ready["listen"].rsplit(":", 1)[1])
        review = json.loads(samples[0].read_text())
        with httpx.Client(verify=ssl.create_default_context(cafile=str(pki["ca_file"])), timeout=10) as c:
            r = c.post(f"https://localhost:{port}/mutate-namespace", content=json.dumps(review))
        pod = check_response(review, r.json())
        assert pod["spec"]["initContainers"][0]["image"] == "example.registry/tlsproxy:7"
        line = _wait_for_line(proc, "admission review", 10)
        assert line["action"] == "injected" and line["uid"] == review["request"]["uid"]
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)


def test_cli_webhook_without_certificate_is_a_one_line_error():
    r = subprocess.run([TLSPROXY, "webhook", "--listen", "127.0.0.1:0"], capture_output=True, text=True,
                       timeout=30)
    assert r.returncode == 2
    assert r.stderr.startswith("tlsproxy: error: webhook needs --cert-dir") and r.stderr.count("\n") == 1


def test_answer_is_a_function_of_the_request():
    """The webhook's request answering, called directly: (method, path, headers, body, client) →
    (status, headers, body); every refusal is a status with a JSON error."""
    from tlsproxy.metrics import Metrics
    from tlsproxy.webhook.server import Answerer

    answerer = Answerer(InjectOptions(image="tlsproxy:under-test"), Metrics())
    review = json.loads(sample_files()[0].read_text())
    review.pop("response", None)
    status, headers, body = answerer.answer(b"POST", "/mutate-namespace", [], json.dumps(review).encode(),
                                            "127.0.0.1:1")
    assert status == 200 and (b"content-type", b"application/json") in headers
    check_response(review, json.loads(body))
    for method, path, payload, want in [(b"GET", "/mutate", b"", 405), (b"POST", "/validate", b"{}", 404),
                                        (b"POST", "/mutate", b"{not json", 400),
                                        (b"POST", "/mutate", b"x" * (MAX_REVIEW_BYTES + 1), 413)]:
        status, headers, body = answerer.answer(method, path, [], payload, "127.0.0.1:1")
        assert status == want and json.loads(body)["error"], (method, path, status, body)


async def test_webhook_runs_on_the_shared_runtime(pki):
    """The proxy's runtime, not a copy: /certs reports the served certificate, SIGHUP's reload path
    rebuilds it, and POST /shutdown from loopback drains the webhook until its run returns."""
    async with trio.open_nursery() as nursery:
        # a drain delay, so /readyz can be asked while the drain runs
        webhook = Webhook(WebhookConfig(settings_for(pki).replace(drain_delay_s=1.0),
                                        InjectOptions(image="tlsproxy:under-test")))
        await nursery.start(webhook.run)
        admin = f"http://127.0.0.1:{webhook.bound_admin.port}"
        with trio.fail_after(30):
            async with httpx.AsyncClient(timeout=5) as client:
                certs = (await client.get(admin + "/certs")).json()
                assert certs["generation"] == 1
                assert certs["certificates"][0]["serial"] == format(pki["leaf"].cert.serial_number, "x")
                await webhook.runtime.on_sighup()          # what SIGHUP does: a forced rebuild
                assert (await client.get(admin + "/certs")).json()["generation"] == 2
                assert (await client.get(admin + "/readyz")).json() == {"ready": True}
                r = await client.post(admin + "/shutdown")
                assert r.status_code == 202
                ready = await client.get(admin + "/readyz")
                assert ready.status_code == 503 and "drain" in ready.json()["not_ready"]
            # after the drain delay the run ends by itself (the nursery has nothing else to wait for)
            while nursery.child_tasks:  # noqa: ASYNC110 - the run is the nursery's only task
                await trio.sleep(0.05)
        with pytest.raises(OSError):
            socket.create_connection(("127.0.0.1", webhook.bound_tls.port), timeout=2).close()
