"""certs/provision.py: the pure decisions about a self-provisioned Secret, table-driven, plus a
simulated life of years where a caller that reloads ca.crt within the rollover delay never meets
an unknown CA."""

from __future__ import annotations

import datetime as dt

import pytest
from cryptography import x509

from tlsproxy.certs import generate, provision
from tlsproxy.certs.provision import CA, CA_KEY, CERT, KEY, Keep, Policy, Write, plan

NOW = dt.datetime(2026, 12, 6, 12, 0, tzinfo=dt.UTC)
NAMES = ("web", "web.demo", "web.demo.svc", "web.demo.svc.cluster.local")
POLICY = Policy(NAMES, leaf_validity=dt.timedelta(days=90), ca_validity=dt.timedelta(days=360),
                rollover_delay=dt.timedelta(minutes=5))


def certs_of(pem: bytes) -> list[x509.Certificate]:
    return x509.load_pem_x509_certificates(pem)


def leaf_of(data) -> x509.Certificate:
    return x509.load_pem_x509_certificate(data[CERT])


def issuer_in(data) -> bool:
    leaf = leaf_of(data)
    for ca in certs_of(data[CA]):
        try:
            leaf.verify_directly_issued_by(ca)
            return True
        except Exception:  # noqa: BLE001
            continue
    return False


def test_empty_secret_gets_ca_leaf_and_key():
    for data in (None, {}, {CERT: b"", KEY: b""}):
        p = plan(data, POLICY, NOW)
        assert isinstance(p, Write) and p.step == "empty"
        assert set(p.data) == {CERT, KEY, CA, CA_KEY}
        leaf = leaf_of(p.data)
        assert issuer_in(p.data)
        assert leaf.not_valid_after_utc == NOW + POLICY.leaf_validity
        san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        assert tuple(san.get_values_for_type(x509.DNSName)) == NAMES
        # and what was written is then current
        again = plan(p.data, POLICY, NOW)
        assert isinstance(again, Keep) and again.servable and again.reason == "current"
        assert again.next_check == provision.renew_at(leaf)


def test_invalid_material_is_replaced_but_valid_foreign_material_is_served_untouched():
    first = plan(None, POLICY, NOW).data
    garbage = dict(first, **{CERT: b"-----BEGIN CERTIFICATE-----\nnope\n-----END CERTIFICATE-----\n"})
    p = plan(garbage, POLICY, NOW)
    assert isinstance(p, Write) and p.step == "invalid"
    # the CA was fine: only the leaf is new, callers keep their trust
    assert p.data[CA] == first[CA] and p.data[CA_KEY] == first[CA_KEY] and issuer_in(p.data)
    other = generate.make_ca("someone else")
    foreign = generate.issue(other, "web", dns=NAMES)
    p = plan({CERT: foreign.cert_pem, KEY: foreign.key_pem, CA: other.cert_pem}, POLICY, NOW)
    assert isinstance(p, Keep) and p.servable and "not made by tlsproxy" in p.reason
    # a leaf from a CA that is not in ca.crt: a new leaf from our CA
    p = plan(dict(first, **{CERT: foreign.cert_pem, KEY: foreign.key_pem}), POLICY, NOW)
    assert isinstance(p, Write) and p.step == "invalid" and "signed by no" in p.detail


def test_key_that_matches_no_ca_starts_over():
    first = plan(None, POLICY, NOW).data
    p = plan(dict(first, **{CA_KEY: generate.key_pem(generate.new_key())}), POLICY, NOW)
    assert isinstance(p, Write) and p.step == "invalid" and p.data[CA] != first[CA]


def test_renewal_window_is_a_third_of_the_lifetime_and_keeps_the_ca():
    first = plan(None, POLICY, NOW).data
    window = provision.renew_at(leaf_of(first))
    assert isinstance(plan(first, POLICY, window - dt.timedelta(seconds=1)), Keep)
    p = plan(first, POLICY, window)
    assert isinstance(p, Write) and p.step == "renew"
    assert p.data[CA] == first[CA] and leaf_of(p.data).serial_number != leaf_of(first).serial_number


def test_new_names_get_a_new_leaf():
    first = plan(None, POLICY, NOW).data
    wider = Policy((*NAMES, "web.example.com"), leaf_validity=POLICY.leaf_validity,
                   ca_validity=POLICY.ca_validity)
    p = plan(first, wider, NOW)
    assert isinstance(p, Write) and p.step == "renew" and "web.example.com" in p.detail


def test_long_names_fit_the_common_name_limit():
    long = Policy(("a" * 63 + ".namespace-with-a-long-name.svc",), ca_name="x" * 80)
    data = plan(None, long, NOW).data
    assert leaf_of(data).subject.rfc4514_string() == "CN=tlsproxy"
    assert len(certs_of(data[CA])[0].subject.rfc4514_string()) < 80


def test_leaf_never_outlives_its_ca():
    short_ca = Policy(NAMES, leaf_validity=dt.timedelta(days=90), ca_validity=dt.timedelta(days=30))
    data = plan(None, short_ca, NOW).data
    assert leaf_of(data).not_valid_after_utc <= certs_of(data[CA])[0].not_valid_after_utc


@pytest.mark.parametrize("step_s", [86400, 3600 * 7])
def test_years_of_rotation_never_leave_a_caller_with_an_unknown_ca(step_s):
    """Every ``step_s`` the replicas run plan() on the Secret (writing what it says). A caller loads
    ca.crt ``rollover_delay`` late; the leaf served at any time must be signed by a CA of the
    ca.crt the caller holds then."""
    delay = POLICY.rollover_delay
    history: list[tuple[dt.datetime, dict]] = []
    data = None
    t = NOW
    steps: list[str] = []
    end = NOW + dt.timedelta(days=3 * 360)
    while t < end:
        p = plan(data, POLICY, t)
        if isinstance(p, Write):
            steps.append(p.step)
            data = p.data
            history.append((t, data))
            p2 = plan(data, POLICY, t)          # a second replica reading the result writes nothing
            assert isinstance(p2, Keep), p2
        assert leaf_of(data).not_valid_after_utc > t and issuer_in(data)
        # the caller's view: the newest version written at least `delay` ago (or the first)
        old = [d for (w, d) in history if w <= t - delay] or [history[0][1]]
        caller_ca = certs_of(old[-1][CA])
        leaf = leaf_of(data)
        ok = False
        for ca in caller_ca:
            try:
                leaf.verify_directly_issued_by(ca)
                ok = True
            except Exception:  # noqa: BLE001
                pass
        assert ok or history[0][1] is data, f"caller with stale ca.crt fails at {t} after {steps}"
        # sample right after every write (a third of the delay apart) and at each step falling due
        step = delay / 3 if history[-1][0] > t - 2 * delay else dt.timedelta(seconds=step_s)
        nxt = p.next_check if isinstance(p, Keep) and p.next_check else t + step
        t = min(t + step, max(nxt, t + dt.timedelta(seconds=1)))
    assert steps.count("ca_rollover_start") >= 2
    assert steps.count("ca_rollover_switch") == steps.count("ca_rollover_start")
    assert steps.count("ca_rollover_finish") >= 2
    assert "renew" in steps and "invalid" not in steps


def test_rollover_steps_wait_the_full_delay_despite_whole_second_certificate_times():
    """notBefore is truncated to the second: counting from it would switch up to 1 s early."""
    short = Policy(NAMES, leaf_validity=dt.timedelta(seconds=6), ca_validity=dt.timedelta(seconds=15),
                   rollover_delay=dt.timedelta(seconds=1))
    t0 = NOW + dt.timedelta(microseconds=999_000)
    data = plan(None, short, t0).data
    ca = certs_of(data[CA])[0]
    start_at = provision.renew_at(ca)
    t = start_at + dt.timedelta(microseconds=900_000)
    while True:                                      # renewals until the CA's window
        p = plan(data, short, t)
        if isinstance(p, Write) and p.step == "ca_rollover_start":
            break
        if isinstance(p, Write):
            data = p.data
        t += dt.timedelta(milliseconds=100)
    started, data = t, p.data
    while True:
        t += dt.timedelta(milliseconds=50)
        p = plan(data, short, t)
        if isinstance(p, Write):
            assert p.step == "ca_rollover_switch" and t - started >= short.rollover_delay, t - started
            break
    switched, data = t, p.data
    while True:
        t += dt.timedelta(milliseconds=50)
        p = plan(data, short, t)
        if isinstance(p, Write):
            assert p.step == "ca_rollover_finish" and t - switched >= short.rollover_delay, t - switched
            break
