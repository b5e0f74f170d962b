"""What to write into a self-provisioned Secret, decided from what it holds now. Pure: bytes in,
a :class:`Plan` out; no clock but the ``now`` given, no I/O.

Theory of operation
-------------------
The Secret is the whole state, shared by every replica: ``tls.crt`` (the serving leaf), ``tls.key``,
``ca.crt`` (the trust bundle callers load: one CA, two during a CA rollover) and ``ca.key`` (the key
of the *signing* CA, the one in ``ca.crt`` it matches). Every replica reads it, runs :func:`plan`,
and writes only with the resourceVersion it read, so of two replicas deciding the same step one
wins and the other reads the winner's result, for which :func:`plan` then says :class:`Keep`.

The steps, in the order :func:`plan` checks them:

1. **Empty** (no ``tls.crt``/``tls.key``): a new CA and a leaf. **Invalid** (does not parse, key
   does not match, expired, leaf not signed by a CA of ``ca.crt``): a new leaf from the signing CA
   when that CA is still good, else a new CA and leaf. Material without ``ca.key`` that is valid was
   made by someone else (cert-manager, ``certs bootstrap``): it is served as it is and never written.
2. **CA rollover, start**: the signing CA has a third of its life left. A new CA is *added* to
   ``ca.crt`` beside the old one and ``ca.key`` becomes its key; the served leaf does not change.
3. **CA rollover, switch**: the leaf is still signed by the old CA and ``rollover_delay`` has passed
   since the new CA appeared (time for every caller to load the two-CA ``ca.crt``: the kubelet
   refreshes a mounted Secret within about two minutes, a watcher within a second): a new leaf
   signed by the new CA.
4. **Renew**: the leaf has a third of its life left, or lacks a DNS name asked for: a new leaf from
   the signing CA (never outliving it).
5. **CA rollover, finish**: ``ca.crt`` still holds CAs that signed nothing served, and the leaf of
   the new CA is ``rollover_delay`` old (every replica serves it): ``ca.crt`` becomes the signing CA
   alone. Expired CAs are dropped from ``ca.crt`` whenever something is written.

A caller that trusts ``ca.crt`` therefore never meets a leaf of a CA it does not have, provided it
reloads ``ca.crt`` within ``rollover_delay``. :class:`Keep` carries ``next_check``: when the next
step falls due, so the caller can sleep until then.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping
from dataclasses import dataclass

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization

from ..errors import CertError
from . import bundle as _bundle
from . import generate

CERT, KEY, CA, CA_KEY = _bundle.CERT_FILE, _bundle.KEY_FILE, _bundle.CA_FILE, "ca.key"
LEAF_VALIDITY = dt.timedelta(days=90)        # cert-manager's default duration
CA_VALIDITY = dt.timedelta(days=3650)        # rolled over (step 2) when a third is left: after ~6.7 years
ROLLOVER_DELAY = dt.timedelta(minutes=5)     # > the kubelet's Secret refresh (sync 60 s + cache TTL)
TIME_RESOLUTION = dt.timedelta(seconds=1)   # X.509 times have whole seconds: notBefore is truncated
MAX_CN = 64                                  # RFC 5280 ub-common-name
RENEW_FRACTION = 3                           # renew with a third of the lifetime left (cert-manager: 1/3)


@dataclass(frozen=True)
class Policy:
    """What to issue. ``dns_names``: every name the leaf must carry (the first is its CN)."""

    dns_names: tuple[str, ...]
    ca_name: str = "tlsproxy CA"
    leaf_validity: dt.timedelta = LEAF_VALIDITY
    ca_validity: dt.timedelta = CA_VALIDITY
    rollover_delay: dt.timedelta = ROLLOVER_DELAY
    key_type: str = "ecdsa"


@dataclass(frozen=True)
class Keep:
    """Write nothing. ``servable``: the Secret holds material that can be served as it is."""

    reason: str
    servable: bool = True
    next_check: dt.datetime | None = None


@dataclass(frozen=True)
class Write:
    """Write ``data`` (every key of the Secret's ``data``) with the resourceVersion read."""

    data: dict[str, bytes]
    step: str            # empty, invalid, ca_rollover_start, ca_rollover_switch, renew, ca_rollover_finish
    detail: str


Plan = Keep | Write


# ---------------------------------------------------------------------------- helpers

def _pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def _lifetime(cert: x509.Certificate) -> dt.timedelta:
    return cert.not_valid_after_utc - cert.not_valid_before_utc


def renew_at(cert: x509.Certificate) -> dt.datetime:
    """When a third of the certificate's lifetime is left."""
    return cert.not_valid_after_utc - _lifetime(cert) / RENEW_FRACTION


def _backdate(validity: dt.timedelta) -> dt.timedelta:
    # clock skew between pods; never a large share of a short (test) lifetime
    return min(generate.BACKDATE, validity / 20)


def _made_at(cert: x509.Certificate) -> dt.datetime:
    """The latest time the certificate can have been made: its notBefore was backdated and
    truncated to the second when it was issued here."""
    return cert.not_valid_before_utc + _backdate(_lifetime(cert)) + TIME_RESOLUTION


def _same_key(cert: x509.Certificate, key_pem: bytes) -> bool:
    try:
        key = serialization.load_pem_private_key(key_pem, password=None)
    except (ValueError, TypeError):
        return False
    spki = serialization.PublicFormat.SubjectPublicKeyInfo
    der = serialization.Encoding.DER
    return key.public_key().public_bytes(der, spki) == cert.public_key().public_bytes(der, spki)


def _signed_by(leaf: x509.Certificate, ca: x509.Certificate) -> bool:
    try:
        leaf.verify_directly_issued_by(ca)
    except (ValueError, TypeError, InvalidSignature):
        return False
    return True


def new_ca(policy: Policy, now: dt.datetime) -> generate.Issued:
    # make_ca backdates by generate.BACKDATE from ``now``; shift ``now`` so it backdates ours instead
    back = _backdate(policy.ca_validity)
    shifted = now - back + generate.BACKDATE
    # each CA gets its own subject (the time it was made): during a rollover two CAs are trusted
    # side by side, and chain building must never confuse them
    name = f"{policy.ca_name[:MAX_CN - 21]} {now:%Y-%m-%dT%H:%M:%SZ}"
    return generate.make_ca(name, key_type=policy.key_type, now=shifted,
                            validity=now + policy.ca_validity - shifted)


def new_leaf(policy: Policy, ca: generate.Issued, now: dt.datetime) -> generate.Issued:
    ca_end = ca.cert.not_valid_after_utc
    not_after = min(now + policy.leaf_validity, ca_end)      # a leaf never outlives its CA
    back = _backdate(not_after - now)
    fits = [n for n in policy.dns_names if len(n) <= MAX_CN]        # the CN is informative only
    cn = min(fits, key=len) if fits else "tlsproxy"
    return generate.issue(ca, cn, dns=policy.dns_names, server=True,
                          key_type=policy.key_type, not_before=now - back, not_after=not_after)


def _data(leaf: generate.Issued, cas: list[x509.Certificate], signing: generate.Issued) -> dict[str, bytes]:
    return {CERT: leaf.cert_pem, KEY: leaf.key_pem, CA: b"".join(_pem(c) for c in cas),
            CA_KEY: signing.key_pem}


def _fresh(policy: Policy, now: dt.datetime, step: str, detail: str) -> Write:
    ca = new_ca(policy, now)
    return Write(_data(new_leaf(policy, ca, now), [ca.cert], ca), step, detail)


# ---------------------------------------------------------------------------- the decision

def plan(data: Mapping[str, bytes] | None, policy: Policy, now: dt.datetime,
         where: str = "Secret") -> Plan:
    """Decide the next write (see the module docstring). ``data``: the Secret's decoded ``data``."""
    data = dict(data or {})
    cert_pem, key_pem = data.get(CERT, b""), data.get(KEY, b"")
    ca_pem, ca_key_pem = data.get(CA), data.get(CA_KEY)
    if not cert_pem.strip() and not key_pem.strip():
        return _fresh(policy, now, "empty", "the Secret has no certificate yet")
    try:
        _bundle.build(cert_pem, key_pem, ca_pem, f"{where} {CERT}", f"{where} {KEY}",
                      f"{where} {CA}" if ca_pem is not None else None, now=now)
        problem = None
    except CertError as exc:
        problem = exc.reason
    if not ca_key_pem:
        if problem is None:
            return Keep(f"served as it is: no {CA_KEY}, so it was not made by tlsproxy and is never "
                        "renewed here")
        return _fresh(policy, now, "invalid", problem)

    # Ours: find the signing CA (the one ca.key matches) among the trusted ones.
    try:
        cas = list(_bundle.load_x509(ca_pem or b"", f"{where} {CA}", "CA bundle"))
    except CertError as exc:
        return _fresh(policy, now, "invalid", exc.reason)
    live = [c for c in cas if c.not_valid_after_utc > now]
    signing_cert = next((c for c in reversed(live) if _same_key(c, ca_key_pem)), None)
    if signing_cert is None:
        return _fresh(policy, now, "invalid", f"{CA_KEY} matches no unexpired CA in {CA}")
    signing = generate.Issued(_pem(signing_cert), ca_key_pem)
    leaf = None if problem else x509.load_pem_x509_certificate(cert_pem)
    issuer = next((c for c in live if leaf is not None and _signed_by(leaf, c)), None)
    if leaf is None or issuer is None:
        why = problem or f"the certificate is signed by no unexpired CA of {CA}"
        if now < renew_at(signing_cert):
            return Write(_data(new_leaf(policy, signing, now), live, signing), "invalid",
                         f"{why}; a new certificate from the current CA")
        return _fresh(policy, now, "invalid", why)

    # 2. start a CA rollover: the signing CA is in its last third
    if now >= renew_at(signing_cert):
        ca = new_ca(policy, now)
        return Write({CERT: cert_pem, KEY: key_pem, CA: b"".join(_pem(c) for c in [*live, ca.cert]),
                      CA_KEY: ca.key_pem}, "ca_rollover_start",
                     f"the CA expires {signing_cert.not_valid_after_utc.isoformat()}: a new CA is "
                     f"trusted beside it before it signs anything")
    checks: list[dt.datetime] = [renew_at(signing_cert)]
    # 3. switch the leaf to the new CA once callers had time to trust it
    if issuer is not signing_cert:
        trusted_since = _made_at(signing_cert) + policy.rollover_delay
        # only a leaf that would expire before then is switched early (callers may fail; a dead
        # certificate fails every caller)
        urgent = leaf.not_valid_after_utc <= trusted_since + policy.rollover_delay
        if now >= trusted_since or urgent:
            return Write(_data(new_leaf(policy, signing, now), live, signing), "ca_rollover_switch",
                         "the new CA has been trusted for the rollover delay: the certificate now "
                         "comes from it")
        checks.append(trusted_since)
        return Keep("CA rollover: waiting for callers to trust the new CA", next_check=min(checks))
    # 4. renew the leaf
    missing = [n for n in policy.dns_names if n not in _dns_names(leaf)]
    if now >= renew_at(leaf) or missing:
        detail = (f"the certificate lacks {', '.join(missing)}" if missing else
                  f"the certificate expires {leaf.not_valid_after_utc.isoformat()}")
        return Write(_data(new_leaf(policy, signing, now), live, signing), "renew", detail)
    checks.append(renew_at(leaf))
    # 5. finish a rollover: drop CAs that signed nothing served (expired ones at once)
    if len(cas) > 1:
        served_since = _made_at(leaf) + policy.rollover_delay
        keep = [signing_cert] if now >= served_since else live
        if len(keep) < len(cas):
            return Write({CERT: cert_pem, KEY: key_pem, CA: b"".join(_pem(c) for c in keep),
                          CA_KEY: ca_key_pem}, "ca_rollover_finish",
                         "no served certificate is signed by the old CA any more" if len(keep) == 1
                         else "an expired CA is dropped from ca.crt")
        checks.append(served_since)
    return Keep("current", next_check=min(checks))


def _dns_names(cert: x509.Certificate) -> tuple[str, ...]:
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return ()
    return tuple(san.get_values_for_type(x509.DNSName))


def service_dns_names(service: str, namespace: str, domain: str = "cluster.local") -> tuple[str, ...]:
    """The names a Service is dialled by, as ``certs bootstrap`` puts them in its certificate."""
    return (service, f"{service}.{namespace}", f"{service}.{namespace}.svc",
            f"{service}.{namespace}.svc.{domain}")
