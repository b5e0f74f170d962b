"""``tlsproxy serve --provision-secret`` end to end: real tlsproxy processes, the stand-in API
server (tests/k8s_standin.py), real TLS clients that trust only the Secret's ca.crt."""

from __future__ import annotations

import datetime as dt
import ssl
import threading
import time

import httpx
import pytest

from tests.k8s.helpers import NAME, NS, SECRET, fetch, metric, serial_of, served_serial, tlsproxy, wait_for
from tlsproxy.certs import generate, provision
from tlsproxy.certs.provision import CA, CA_KEY, CERT, KEY


def provision_args(standin, *extra: str) -> list[str]:
    return ["--provision-secret", f"{NS}/{SECRET}", "--kubeconfig", str(standin.kubeconfig()), *extra]


def test_two_replicas_race_on_an_empty_secret_and_serve_one_certificate_then_follow_changes(
        standin, tmp_path, app):
    standin.put_secret(NS, SECRET)          # the empty Secret an installer ships
    args = provision_args(standin)
    with tlsproxy(tmp_path, *args, upstream_port=app.port) as a, \
            tlsproxy(tmp_path, *args, upstream_port=app.port) as b:
        assert wait_for(lambda: a.ready() and b.ready(), 30), a.logs() + b.logs()
        data = standin.secret_data(NS, SECRET)
        assert set(data) >= {CERT, KEY, CA, CA_KEY}
        won = [w for w in standin.writes() if w[2] == 200]
        assert len(won) == 1, standin.writes()          # one CA, one certificate: one write won
        serial = serial_of(data[CERT])
        for p in (a, b):
            assert fetch(p.port, data[CA]) == (200, serial)
        lost = metric(a.metrics() + b.metrics(), "tlsproxy_provision_writes_total", result="conflict")
        assert lost == len([w for w in standin.writes() if w[2] == 409])

        # a change written to the Secret (a renewal by hand, same CA) reaches both within a second
        policy = provision.Policy(provision.service_dns_names("web", NS))
        leaf = provision.new_leaf(policy, generate.Issued(data[CA], data[CA_KEY]), dt.datetime.now(dt.UTC))
        written_at = time.monotonic()
        standin.put_secret(NS, SECRET, dict(data, **{CERT: leaf.cert_pem, KEY: leaf.key_pem}))
        new = serial_of(leaf.cert_pem)
        for p in (a, b):
            assert wait_for(lambda p=p: served_serial(p.port, data[CA]) == new, 1.0, 0.02), p.logs()
        assert time.monotonic() - written_at < 1.5
        assert [w for w in standin.writes() if w[2] == 200] == won    # nobody overwrote it


class Caller:
    """A client of the sidecar that trusts the Secret's ca.crt, re-read every ``refresh_s`` (as a
    caller following the Secret would), and sends one request per fresh connection."""

    def __init__(self, standin, port: int, refresh_s: float = 0.3) -> None:
        self.standin, self.port, self.refresh_s = standin, port, refresh_s
        self.ca = standin.secret_data(NS, SECRET)[CA]
        self.read_at = time.monotonic()
        self.ok = 0
        self.failures: list[str] = []
        self.serials: set[int] = set()

    def run(self, seconds: float, max_requests: int = 2000) -> None:
        end = time.monotonic() + seconds
        while time.monotonic() < end and self.ok + len(self.failures) < max_requests:
            if time.monotonic() - self.read_at >= self.refresh_s:
                self.ca = self.standin.secret_data(NS, SECRET)[CA]
                self.read_at = time.monotonic()
            try:
                status, serial = fetch(self.port, self.ca)
                assert status == 200, status
                self.ok += 1
                self.serials.add(serial)
            except Exception as exc:  # noqa: BLE001 - every failure is the finding
                self.failures.append(f"{type(exc).__name__}: {exc}")
            time.sleep(0.02)


@pytest.mark.parametrize("away_s", [4.0, pytest.param(60.0, marks=pytest.mark.slow)])
def test_api_server_away_changes_nothing_for_clients_and_is_followed_again(standin, tmp_path, app, away_s):
    standin.put_secret(NS, SECRET)
    with tlsproxy(tmp_path, *provision_args(standin), upstream_port=app.port) as p:
        assert wait_for(p.ready, 30), p.logs()
        caller = Caller(standin, p.port, refresh_s=3600)
        standin.stop()                                      # the API server goes away
        caller.run(away_s, max_requests=4000)
        assert caller.ok > 20 and not caller.failures, caller.failures[:3]
        assert p.ready() and p.popen.poll() is None
        assert "cannot reach the API server" in p.logs()
        assert metric(p.metrics(), "tlsproxy_k8s_api_errors_total", code="unreachable") >= 1
        standin.start()                                     # back, same address
        data = standin.secret_data(NS, SECRET)
        leaf = provision.new_leaf(provision.Policy(provision.service_dns_names("web", NS)),
                                  generate.Issued(data[CA], data[CA_KEY]), dt.datetime.now(dt.UTC))
        standin.put_secret(NS, SECRET, dict(data, **{CERT: leaf.cert_pem, KEY: leaf.key_pem}))
        # the follower retries with backoff (at most 30 s apart): followed again within that
        assert wait_for(lambda: served_serial(p.port, data[CA]) == serial_of(leaf.cert_pem), 40, 0.1), \
            p.logs()


def test_forbidden_write_keeps_serving_names_the_permission_and_renews_once_allowed(standin, tmp_path, app):
    past = dt.datetime.now(dt.UTC) - dt.timedelta(days=70)     # a 90-day certificate, 20 days left
    data = provision.plan(None, provision.Policy(provision.service_dns_names("web", NS)), past).data
    standin.put_secret(NS, SECRET, data)
    standin.deny.add(("update", "secrets", SECRET))
    with tlsproxy(tmp_path, *provision_args(standin), upstream_port=app.port) as p:
        assert wait_for(p.ready, 30), p.logs()
        assert fetch(p.port, data[CA]) == (200, serial_of(data[CERT]))   # what is there is served
        assert wait_for(lambda: '"code":403' in p.logs(), 10), p.logs()
        line = next(x for x in p.logs().splitlines() if '"code":403' in x)
        assert '"level":"error"' in line and "forbidden: the API server refused" in line
        assert "update secrets/web-tls in namespace demo" in line
        assert 'resourceNames: [\\"web-tls\\"], verbs: [\\"update\\"]' in line
        assert metric(p.metrics(), "tlsproxy_k8s_api_errors_total", verb="update", code="403") >= 1
        assert metric(p.metrics(), "tlsproxy_provision_writes_total", step="renew", result="failed") >= 1
        standin.deny.clear()                                # RBAC fixed: the retry (backoff) renews
        assert wait_for(lambda: standin.secret_data(NS, SECRET)[CERT] != data[CERT], 20, 0.1), p.logs()
        new = standin.secret_data(NS, SECRET)
        assert new[CA] == data[CA]
        assert wait_for(lambda: served_serial(p.port, data[CA]) == serial_of(new[CERT]), 2, 0.05)


def test_renewal_under_load_loses_no_request(standin, tmp_path, app):
    standin.put_secret(NS, SECRET)
    args = provision_args(standin, "--provision-cert-validity", "6s", "--provision-ca-validity", "1h")
    with tlsproxy(tmp_path, *args, upstream_port=app.port) as p:
        assert wait_for(p.ready, 30), p.logs()
        # three callers on fresh connections (the CA does not change: read once) and one keep-alive
        # connection that lives across the renewals (it keeps the certificate it began with)
        callers = [Caller(standin, p.port, refresh_s=3600) for _ in range(3)]
        kept = {"ok": 0, "failures": []}

        def keep_alive() -> None:
            ca = standin.secret_data(NS, SECRET)[CA]
            ctx = ssl.create_default_context(cadata=ca.decode())
            end = time.monotonic() + 10.0
            with httpx.Client(verify=ctx, timeout=5) as client:
                while time.monotonic() < end:
                    try:
                        r = client.get(f"https://127.0.0.1:{p.port}/keep", headers={"Host": NAME},
                                       extensions={"sni_hostname": NAME})   # SNI and the name checked
                        assert r.status_code == 200
                        kept["ok"] += 1
                    except Exception as exc:  # noqa: BLE001
                        kept["failures"].append(repr(exc))
                    time.sleep(0.02)

        threads = [threading.Thread(target=c.run, args=(10.0,)) for c in callers]
        threads.append(threading.Thread(target=keep_alive))
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        for c in callers:
            assert c.ok > 20 and not c.failures, c.failures[:3]
        assert kept["ok"] > 20 and not kept["failures"], kept["failures"][:3]
        assert len(set().union(*(c.serials for c in callers))) >= 3   # renewed every ~4 s, no restart
        assert metric(p.metrics(), "tlsproxy_provision_writes_total", step="renew", result="written") >= 2


def test_ca_rollover_never_leaves_a_caller_with_an_unknown_ca(standin, tmp_path, app):
    standin.put_secret(NS, SECRET)
    args = provision_args(standin, "--provision-cert-validity", "6s", "--provision-ca-validity", "15s",
                          "--provision-rollover-delay", "1s")
    with tlsproxy(tmp_path, *args, upstream_port=app.port) as a, \
            tlsproxy(tmp_path, *args, upstream_port=app.port) as b:
        assert wait_for(lambda: a.ready() and b.ready(), 30), a.logs() + b.logs()
        # each caller re-reads ca.crt every half rollover delay, and keeps using what it read
        callers = [Caller(standin, port, refresh_s=0.5) for port in (a.port, b.port, a.port, b.port)]
        threads = [threading.Thread(target=c.run, args=(14.0,)) for c in callers]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        for c in callers:
            assert c.ok > 20 and not c.failures, c.failures[:3]
        text = a.metrics() + b.metrics()
        for step in ("ca_rollover_start", "ca_rollover_switch", "ca_rollover_finish"):
            assert metric(text, "tlsproxy_provision_writes_total", step=step, result="written") >= 1, step
