"""``tlsproxy serve --provision-secret`` end to end: real tlsproxy processes, the stand-in API
server (tests/k8s_standin.py), real TLS clients that trust only the Secret's ca.crt."""

from __future__ import annotations

import datetime as dt
import time

from tests.k8s.helpers import NS, SECRET, fetch, metric, serial_of, served_serial, tlsproxy, wait_for
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
