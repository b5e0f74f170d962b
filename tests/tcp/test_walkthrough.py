"""docs/tcp.md's walk-through with real processes: certs bootstrap → the doc's gRPC stand-in
"contour" → tlsproxy --protocol tcp --alpn h2 (mTLS) → tlsproxy --config envoy-side.yaml (outbound
tls:// route) → the doc's "envoy" stand-in. The stand-in script and the YAML are taken from the doc
itself; only the ports are replaced by free ones."""

from __future__ import annotations

import re
import subprocess
import sys

from tests.outbound.test_walkthrough import process
from tests.support import ROOT, TLSPROXY, free_port, wait_for

DOC = (ROOT / "docs" / "tcp.md").read_text()


def heredoc(name: str) -> str:
    m = re.search(rf"cat > {re.escape(name)} <<'EOF'\n(.*?)\nEOF\n", DOC, re.S)
    assert m, f"{name} not found in docs/tcp.md"
    return m.group(1) + "\n"


def ready(port: int, path: str = "/readyz") -> bool:
    import http.client

    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
    try:
        conn.request("GET", path)
        return conn.getresponse().status == 200
    except OSError:
        return False
    finally:
        conn.close()


def test_walkthrough_with_real_processes(tmp_path):
    ports = {p: free_port() for p in (18001, 18443, 18901, 18444, 18902, 15002)}

    def sub(text: str) -> str:
        for old, new in ports.items():
            text = text.replace(str(old), str(new))
        return text

    r = subprocess.run([TLSPROXY, "certs", "bootstrap", "--service", "contour", "--namespace",
                        "projectcontour", "--dns", "localhost", "--client", "envoy", "--client-uri",
                        "spiffe://cluster.local/ns/projectcontour/sa/envoy", "--out", "pki"],
                       cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    (tmp_path / "standin.py").write_text(sub(heredoc("standin.py")))
    (tmp_path / "envoy-side.yaml").write_text(sub(heredoc("envoy-side.yaml")))
    contour_args = sub("serve --protocol tcp --alpn h2 --listen 127.0.0.1:18443 --admin 127.0.0.1:18901 "
                       "--upstream tcp://127.0.0.1:18001 --cert-dir pki --client-ca pki/ca.crt "
                       "--allow-uri spiffe://cluster.local/ns/projectcontour/sa/envoy").split()
    assert " ".join(contour_args) in sub(" ".join(DOC.replace("\\\n", " ").split())), \
        "the doc's command changed"
    with open(tmp_path / "log.txt", "w") as log:
        run_chain(tmp_path, ports, contour_args, log)
    text = (tmp_path / "log.txt").read_text()
    line = next(ln for ln in text.splitlines()
                if '"listener":"inbound"' in ln and '"event":"connection"' in ln)
    assert '"alpn":"h2"' in line and "uri=spiffe://cluster.local/ns/projectcontour/sa/envoy" in line, line
    assert '"tls_version":"TLSv1.3"' in line


def run_chain(tmp_path, ports, contour_args, log) -> None:
    standin = subprocess.Popen([sys.executable, "standin.py", "contour"], cwd=tmp_path, stdout=log,
                               stderr=subprocess.STDOUT)
    try:
        quick = ["--log-format", "json", "--drain-delay", "0"]      # the test's own: JSON lines, fast stop
        with process(contour_args + quick, tmp_path, log), \
                process(["serve", "--config", "envoy-side.yaml", *quick], tmp_path, log):
            # Contour's side is ready once its tcp:// upstream accepts connections (the readiness probe
            # works for tcp upstreams); Envoy's side has no upstream of its own in this walk-through.
            assert wait_for(lambda: ready(ports[18901]) and ready(ports[18902], "/readyz?exclude=upstream"),
                            timeout=20), \
                (tmp_path / "log.txt").read_text()
            out = subprocess.run([sys.executable, "standin.py", "envoy", f"127.0.0.1:{ports[15002]}"],
                                 cwd=tmp_path, capture_output=True, text=True, timeout=30)
            assert out.returncode == 0, out.stderr + (tmp_path / "log.txt").read_text()
            assert out.stdout == "contour answers DiscoveryRequest 1\ncontour answers DiscoveryRequest 2\n"
    finally:
        standin.kill()
        standin.wait(5)
