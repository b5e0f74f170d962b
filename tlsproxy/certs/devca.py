"""Standalone mode's development CA: made once per user, reused on every start, and unable to vouch
for a real domain.

Layout of the state directory (``$XDG_STATE_HOME/tlsproxy`` or ``~/.local/state/tlsproxy``)::

    ca.crt  ca.key          the development CA (10 years); trust ca.crt (``tlsproxy trust``)
    tls.crt tls.key         a leaf for localhost, 127.0.0.1, ::1 and the --dev-ca-name names,
                            re-issued when < 30 days remain or the names change

The CA is *name-constrained* (RFC 5280 §4.2.1.10, a critical extension): it may sign only for
``localhost`` and the names under it, ``127.0.0.0/8``, ``::1`` and the names given with
``--dev-ca-name``. So trusting it in a browser or the system store can never let it (or whoever
copies ``ca.key``) vouch for ``example.com``: verifiers refuse such a leaf ("permitted subtree
violation"). mkcert's CA has no such limit; this is its most-requested change. A CA found without
constraints, or with other names than requested, is replaced on start with a warning in the log; a
trusted copy of the old one then no longer matters (``tlsproxy trust`` again for the new one).
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from ..log import get_logger

if TYPE_CHECKING:    # cryptography and generate load only when a CA is checked or made
    from cryptography import x509

    from . import generate

log = get_logger("devca")

CA_NAME = "tlsproxy development CA"
LEAF_RENEW_BEFORE = dt.timedelta(days=30)
LEAF_NAMES = ("localhost",)
LEAF_IPS = ("127.0.0.1", "::1")
# What the CA may sign for whatever the flags say: loopback names and addresses only.
PERMITTED = ("localhost", ".localhost", "127.0.0.0/8", "::1/128")


def default_state_dir(env: dict[str, str] | None = None) -> Path:
    env = os.environ if env is None else env
    base = env.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(base) / "tlsproxy"


def permitted_names(extra: Sequence[str] = ()) -> tuple[str, ...]:
    """The CA's permitted subtrees as text: the loopback defaults, then ``extra`` (already checked
    by ``config.parse_dev_ca_name``: a DNS name, ``.suffix``, an IP address or network)."""
    out: list[str] = []
    for name in (*PERMITTED, *extra):
        text = _normal(name)
        if text not in out:
            out.append(text)
    return tuple(out)


def _normal(name: str) -> str:
    try:
        return str(ipaddress.ip_network(name, strict=False))
    except ValueError:
        return name.strip().lower()


def _general_name(text: str) -> x509.GeneralName:
    from cryptography import x509

    try:
        return x509.IPAddress(ipaddress.ip_network(text, strict=False))
    except ValueError:
        return x509.DNSName(text)


def _text(name: x509.GeneralName) -> str:
    from cryptography import x509

    return str(name.value) if isinstance(name, x509.IPAddress) else _normal(str(name.value))


def ca_constraints(cert: x509.Certificate) -> tuple[str, ...] | None:
    """The permitted subtrees of a CA certificate as text, or None when it has no name constraints."""
    from cryptography import x509

    try:
        nc = cert.extensions.get_extension_for_class(x509.NameConstraints).value
    except x509.ExtensionNotFound:
        return None
    return tuple(_text(n) for n in nc.permitted_subtrees or ())


def leaf_names(extra: Sequence[str] = ()) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(DNS names, IP addresses) of the standalone leaf: localhost and loopback, plus each extra
    name that is one host (a DNS name without a leading dot, a single address)."""
    dns, ips = list(LEAF_NAMES), list(LEAF_IPS)
    for name in extra:
        text = _normal(name)
        try:
            net = ipaddress.ip_network(text, strict=False)
        except ValueError:
            if not text.startswith(".") and text not in dns:
                dns.append(text)
            continue
        if net.num_addresses == 1 and str(net.network_address) not in ips:
            ips.append(str(net.network_address))
    return tuple(dns), tuple(ips)


def _write(path: Path, data: bytes, mode: int) -> None:
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


@dataclass(frozen=True)
class DevCA:
    dir: Path
    created: bool            # made now (new, or replacing an unconstrained / differently named one)
    replaced: str | None     # why an existing CA was replaced, else None

    @property
    def ca_file(self) -> Path:
        return self.dir / "ca.crt"


def check_ca(state_dir: Path, names: Sequence[str] = ()) -> str | None:
    """Why the CA in ``state_dir`` cannot be reused for ``names`` ("missing", or why it would be
    replaced), or None when it can. Reads only."""
    from cryptography import x509

    ca_crt, ca_key = state_dir / "ca.crt", state_dir / "ca.key"
    if not (ca_crt.exists() and ca_key.exists()):
        return "missing"
    wanted = permitted_names(names)
    try:
        have = ca_constraints(x509.load_pem_x509_certificate(ca_crt.read_bytes()))
    except ValueError:
        return "it does not parse"
    if have is None:
        return "it has no name constraints, so trusting it would trust any name"
    if set(have) != set(wanted):
        return f"its permitted names ({', '.join(have)}) differ from the wanted ({', '.join(wanted)})"
    return None


def ensure_ca(state_dir: Path, names: Sequence[str] = ()) -> DevCA:
    """Make (or reuse) the name-constrained CA and a current leaf in ``state_dir``.

    An existing CA is reused only when its name constraints are exactly ``permitted_names(names)``;
    otherwise it is replaced (logged as a warning). Raises OSError when the directory is unusable."""
    from . import generate

    state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    ca_crt, ca_key = state_dir / "ca.crt", state_dir / "ca.key"
    wanted = permitted_names(names)
    problem = check_ca(state_dir, names)
    replaced = problem if problem not in (None, "missing") else None
    if problem is None:
        ca = generate.Issued(ca_crt.read_bytes(), ca_key.read_bytes())
    else:
        ca = generate.make_ca(CA_NAME, permitted=tuple(_general_name(n) for n in wanted))
        _write(ca_key, ca.key_pem, 0o600)
        _write(ca_crt, ca.cert_pem, 0o644)
        if replaced:
            log.warning("development CA replaced", ca=str(ca_crt), reason=replaced,
                        permitted=",".join(wanted),
                        hint="a trusted copy of the old CA is useless now: run tlsproxy trust again")
    created = problem is not None
    leaf_crt, leaf_key = state_dir / "tls.crt", state_dir / "tls.key"
    dns, ips = leaf_names(names)
    if created or not _leaf_fresh(leaf_crt, ca, dns, ips):
        leaf = generate.issue(ca, "localhost", dns=dns, ips=ips)
        _write(leaf_key, leaf.key_pem, 0o600)
        _write(leaf_crt, leaf.cert_pem, 0o644)
    return DevCA(state_dir, created, replaced)


def ensure(state_dir: Path, names: Sequence[str] = ()) -> tuple[Path, bool]:
    """``ensure_ca`` as (directory, whether the CA is new): the directory is a Secret-style layout
    (tls.crt, tls.key, ca.crt)."""
    made = ensure_ca(state_dir, names)
    return made.dir, made.created


def _leaf_fresh(path: Path, ca: generate.Issued, dns: tuple[str, ...], ips: tuple[str, ...]) -> bool:
    from cryptography import x509
    from cryptography.exceptions import InvalidSignature

    try:
        cert = x509.load_pem_x509_certificate(path.read_bytes())
        sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        ca_cert = ca.cert
        cert.verify_directly_issued_by(ca_cert)
    except (OSError, ValueError, TypeError, x509.ExtensionNotFound, InvalidSignature):
        return False
    have_dns = set(sans.get_values_for_type(x509.DNSName))
    have_ips = {str(a) for a in sans.get_values_for_type(x509.IPAddress)}
    now = dt.datetime.now(dt.UTC)
    return (have_dns == set(dns) and have_ips == set(ips)
            and cert.not_valid_after_utc - now > LEAF_RENEW_BEFORE)
