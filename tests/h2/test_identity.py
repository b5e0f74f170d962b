"""Client identity over HTTP/2: XFCC per stream, identity rules per stream, the access line."""

from __future__ import annotations

import hashlib

from tests.inbound.test_mtls import SPIFFE_FRONT, der_of, front_client, write_client
from tests.support import captured_logs, curl, running_proxy, settings_for, wait_for


def test_xfcc_on_every_stream_and_the_access_line_says_h2(pki, app, tmp_path):
    client = front_client(pki)
    cert, key = write_client(tmp_path / "c", "front", client)
    settings = settings_for(pki, app.port, client_ca=pki.ca_file, allow_uri=("spiffe://cluster.local/ns/shop/*",))
    with running_proxy(settings) as proxy, captured_logs("tlsproxy.access") as lines:
        # two URLs, one connection, two streams; a forged XFCC on each is replaced
        r = curl("--http2", "-sS", "--cacert", str(pki.ca_file), "--cert", cert, "--key", key,
                 "-H", "x-forwarded-client-cert: Hash=forged", "-w", "|%{http_version}\n",
                 f"{proxy.url}/one", f"{proxy.url}/two", timeout=20)
        assert wait_for(lambda: sum(rec.getMessage() == "request" for rec in lines) == 2, 5)
    assert r.returncode == 0, r.stderr
    digest = hashlib.sha256(der_of(client)).hexdigest()
    expected = f'Hash={digest};Subject="CN=front,OU=shop";URI={SPIFFE_FRONT};DNS=front.shop.svc'
    for seen in app.seen[-2:]:
        assert [v for k, v in seen.headers if k.lower() == "x-forwarded-client-cert"] == [expected]
    assert [line.split("|")[1] for line in r.stdout.decode().splitlines()] == ["2", "2"]
    fields = [rec.fields for rec in lines if rec.getMessage() == "request"]
    assert [f["path"] for f in fields] == ["/one", "/two"]
    assert all(f["protocol"] == "h2" and "CN=front" in f["identity"] and f["status"] == 200 for f in fields)


def test_a_refused_identity_gets_403_on_every_stream(pki, app, tmp_path):
    stranger = pki.issue("batch", client=True, server=False, ou="jobs",
                         uris=("spiffe://cluster.local/ns/jobs/sa/batch",))
    cert, key = write_client(tmp_path / "c", "batch", stranger)
    settings = settings_for(pki, app.port, client_ca=pki.ca_file, allow_uri=("spiffe://cluster.local/ns/shop/*",))
    with running_proxy(settings) as proxy:
        r = curl("--http2", "-sS", "--cacert", str(pki.ca_file), "--cert", cert, "--key", key,
                 "-w", "|%{http_code}|%{http_version}\n", f"{proxy.url}/a", f"{proxy.url}/b", timeout=20)
    assert r.returncode == 0, r.stderr
    out = r.stdout.decode()
    assert out.count("|403|2") == 2 and "not allowed" in out, out
    assert not app.seen
