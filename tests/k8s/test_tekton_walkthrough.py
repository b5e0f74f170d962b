"""The Tekton case (TEP-0102) with no user input: the interceptor's sidecar fills an empty Secret on
first start and serves it; the EventListener's sidecar trusts that Secret's ca.crt for its outbound
route (``--outbound-ca-secret``), follows it through the API, and keeps working through a CA
rollover. Real tlsproxy processes, the stand-in API server, plain HTTP from the "EventListener"."""

from __future__ import annotations

import json
import time
import urllib.request

from tests.k8s.helpers import NS, metric, tlsproxy, wait_for
from tests.support import free_port

SECRET = "core-interceptors-tls"
SERVICE = "core-interceptors"


def test_eventlistener_reaches_the_interceptor_through_a_ca_rollover(standin, tmp_path, app):
    standin.put_secret(NS, SECRET)                      # installed empty with the interceptor
    kube = str(standin.kubeconfig())
    interceptor_args = ["--provision-secret", f"{NS}/{SECRET}", "--kubeconfig", kube,
                        "--provision-cert-validity", "6s", "--provision-ca-validity", "15s",
                        "--provision-rollover-delay", "1s"]
    with tlsproxy(tmp_path, *interceptor_args, upstream_port=app.port) as interceptor:
        assert wait_for(interceptor.ready, 30), interceptor.logs()
        local = free_port()
        route = (f"{{listen: '127.0.0.1:{local}', url: 'https://127.0.0.1:{interceptor.port}', "
                 f"server_name: {SERVICE}.{NS}.svc}}")
        listener_args = ["--outbound-routes", route, "--outbound-ca-secret", f"{NS}/{SECRET}",
                         "--kubeconfig", kube, "--cert-dir", str(tmp_path / "unused")]
        (tmp_path / "unused").mkdir()
        from tlsproxy.certs import generate

        own = generate.issue(generate.make_ca(), "el")
        (tmp_path / "unused" / "tls.crt").write_bytes(own.cert_pem)
        (tmp_path / "unused" / "tls.key").write_bytes(own.key_pem)
        with tlsproxy(tmp_path, *listener_args, upstream_port=app.port) as listener:
            assert wait_for(listener.ready, 30), listener.logs()
            ok, failures = 0, []
            end = time.monotonic() + 14.0                 # one CA rollover happens at ~10 s
            while time.monotonic() < end and ok + len(failures) < 3000:
                try:
                    with urllib.request.urlopen(f"http://127.0.0.1:{local}/tekton", timeout=5) as r:
                        body = json.loads(r.read())
                        assert r.status == 200 and body["path"] == "/tekton"
                        ok += 1
                except Exception as exc:  # noqa: BLE001
                    failures.append(f"{type(exc).__name__}: {exc}")
                time.sleep(0.02)
            assert ok > 50 and not failures, failures[:3]
            text = interceptor.metrics()
            for step in ("empty", "ca_rollover_start", "ca_rollover_switch", "ca_rollover_finish"):
                assert metric(text, "tlsproxy_provision_writes_total", step=step, result="written") >= 1
            assert metric(listener.metrics(), "tlsproxy_certificate_reloads_total", role="outbound",
                          result="success") >= 3       # first load, new CA added, old CA dropped
