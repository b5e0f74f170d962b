"""docs/outbound.md's walk-through, with real processes: certs bootstrap → tlsproxy demo (B, mTLS)
→ tlsproxy serve --outbound (A) → plain HTTP from "app A" → app B sees A's SPIFFE ID."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess

from tests.support import TLSPROXY, free_ports, wait_for


@contextlib.contextmanager
def process(args: list[str], cwd, log):
    proc = subprocess.Popen([TLSPROXY, *args], cwd=cwd, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=5)


def http_get(port: int, path: str) -> tuple[int, bytes]:
    import http.client

    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request("GET", path)
        r = conn.getresponse()
        return r.status, r.read()
    except OSError:
        return 0, b""
    finally:
        conn.close()


def test_walkthrough_with_real_processes(tmp_path):
    r = subprocess.run([TLSPROXY, "certs", "bootstrap", "--service", "app-b", "--namespace", "shop",
                        "--dns", "localhost", "--client", "app-a", "--client-uri",
                        "spiffe://cluster.local/ns/shop/sa/app-a", "--out", "pki"],
                       cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    # Every port chosen up front: a process binding port 0 later could be handed one of these.
    b_port, b_admin, a_port, a_admin, out_port, b_app = free_ports(6)
    b_args = ["demo", "--app-port", str(b_app), "--listen", f"127.0.0.1:{b_port}",
              "--admin", f"127.0.0.1:{b_admin}",
              "--cert-dir", "pki", "--client-ca", "pki/ca.crt", "--drain-delay", "0"]
    a_args = ["serve", "--listen", f"127.0.0.1:{a_port}", "--admin", f"127.0.0.1:{a_admin}",
              "--state-dir", "./a-state", "--drain-delay", "0",
              "--outbound", f"127.0.0.1:{out_port}=https://localhost:{b_port}",
              "--outbound-cert-dir", "pki/client"]
    with open(tmp_path / "b.log", "wb") as b_log, open(tmp_path / "a.log", "wb") as a_log, \
            process(b_args, tmp_path, b_log), process(a_args, tmp_path, a_log):
        assert wait_for(lambda: http_get(out_port, "/hello")[0] == 200, timeout=20, interval=0.2), \
            (tmp_path / "a.log").read_text() + (tmp_path / "b.log").read_text()
        status, body = http_get(out_port, "/hello")
        echo = json.loads(body)
        assert echo["path"] == "/hello"
        assert echo["headers"]["host"] == f"localhost:{b_port}"       # Host is the peer's authority
        xfcc = echo["headers"]["x-forwarded-client-cert"]
        assert 'Subject="CN=app-a"' in xfcc
        assert "URI=spiffe://cluster.local/ns/shop/sa/app-a" in xfcc
    a_text = (tmp_path / "a.log").read_text()
    assert "outbound TLS loaded" in a_text
    assert f'"listener":"outbound:localhost:{b_port}"' in a_text       # the access-log line
    assert "Traceback" not in a_text + (tmp_path / "b.log").read_text()


def test_outbound_with_workers_runs_on_worker_zero_only(pki, tmp_path):
    from tests.outbound.peer import tls_peer

    leaf = pki.issue("localhost", dns=("localhost",))
    with tls_peer(tmp_path / "peer", leaf) as peer:
        out_port, admin = free_ports(2)
        args = ["serve", "--workers", "2", "--listen", "127.0.0.1:0", "--admin", f"127.0.0.1:{admin}",
                "--state-dir", str(tmp_path / "state"), "--drain-delay", "0",
                "--outbound", f"127.0.0.1:{out_port}=https://localhost:{peer.port}",
                "--outbound-ca", str(pki.ca_file)]
        with open(tmp_path / "a.log", "wb") as log, process(args, tmp_path, log) as proc:
            assert wait_for(lambda: http_get(out_port, "/w")[0] == 200, timeout=20, interval=0.2), \
                (tmp_path / "a.log").read_text()
            for _ in range(5):
                assert http_get(out_port, "/w")[0] == 200
            assert proc.poll() is None, (tmp_path / "a.log").read_text()   # no worker died on a bind
