"""``tlsproxy certs bootstrap``: a CA, a server pair for a Kubernetes Service, optionally a client pair.

Like Contour's ``certgen`` (a CA, a server pair, a client pair), but laid out as ``kubernetes.io/tls``
Secret directories so the output can be mounted, or fed to ``--cert-dir``, unchanged::

    OUT/ca.crt  OUT/ca.key            the CA (ca.key only when the CA was made here)
    OUT/tls.crt OUT/tls.key           the server pair (SANs: NAME, NAME.NS, NAME.NS.svc, ...)
    OUT/client/tls.crt, tls.key, ca.crt   the client pair (with --client), clientAuth only

Issuing is pure (values in, PEM out); :func:`write_files` is the only part touching the disk and
writes each file atomically (temporary file + rename), keys with mode 0600.
"""

from __future__ import annotations

import base64
import datetime as dt
import ipaddress
import os
import re
from dataclasses import dataclass
from pathlib import Path

import yaml
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from ..errors import CertError, ConfigError
from . import generate
from .bundle import CA_FILE, CERT_FILE, KEY_FILE, read_file, resolve_secret_dir

CA_KEY_FILE = "ca.key"
CLIENT_SUBDIR = "client"
DEFAULT_DAYS = generate.LEAF_VALIDITY.days   # 365: rotate at least yearly
MAX_DAYS = 3650                               # never outlive a bootstrap CA (10 years)
CLUSTER_DOMAIN = "cluster.local"

_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")             # RFC 1123 label (k8s names)
_DNS_LABEL = re.compile(r"^(?!-)[A-Za-z0-9-]{1,63}(?<!-)$")


# ---------------------------------------------------------------------------- validation (argparse types)

def k8s_label(text: str) -> str:
    """A Service or namespace name: an RFC 1123 label, as Kubernetes requires."""
    if not _LABEL.match(text):
        raise ValueError(f"{text!r} is not a valid Kubernetes name (lowercase letters, digits, '-', "
                         "at most 63 characters)")
    return text


def dns_name(text: str) -> str:
    """A DNS SAN: dot-separated labels, optionally a leading ``*.`` wildcard."""
    name = text[2:] if text.startswith("*.") else text
    if not name or len(text) > 253 or not all(_DNS_LABEL.match(p) for p in name.rstrip(".").split(".")):
        raise ValueError(f"{text!r} is not a valid DNS name")
    return text


def ip_address(text: str) -> str:
    try:
        return str(ipaddress.ip_address(text))
    except ValueError:
        raise ValueError(f"{text!r} is not an IPv4 or IPv6 address") from None


def uri_san(text: str) -> str:
    if ":" not in text or text.startswith(":") or any(c.isspace() for c in text):
        raise ValueError(f"{text!r} is not a URI (e.g. spiffe://cluster.local/ns/NS/sa/NAME)")
    return text


# ---------------------------------------------------------------------------- issuing

@dataclass(frozen=True)
class Spec:
    service: str
    namespace: str
    dns: tuple[str, ...] = ()
    ips: tuple[str, ...] = ()
    key_type: str = "ecdsa"
    days: int = DEFAULT_DAYS
    client: str | None = None
    client_uris: tuple[str, ...] = ()

    @property
    def server_cn(self) -> str:
        return f"{self.service}.{self.namespace}.svc"

    @property
    def server_dns(self) -> tuple[str, ...]:
        s, n = self.service, self.namespace
        names = (s, f"{s}.{n}", f"{s}.{n}.svc", f"{s}.{n}.svc.{CLUSTER_DOMAIN}", *self.dns)
        return tuple(dict.fromkeys(names))   # keep order, drop repeats


@dataclass(frozen=True)
class Material:
    ca: generate.Issued
    ca_is_new: bool
    server: generate.Issued
    client: generate.Issued | None


def load_ca(ca_dir: Path, *, now: dt.datetime | None = None) -> generate.Issued:
    """Read ``ca.crt``/``ca.key`` from a directory (a mounted Secret works too) and check they form a
    usable CA. Raises CertError naming the file and the reason."""
    if not ca_dir.is_dir():
        raise CertError(ca_dir, "is not a directory")
    base = resolve_secret_dir(ca_dir)
    cert_pem = read_file(base / CA_FILE, "CA certificate")
    key_pem = read_file(base / CA_KEY_FILE, "CA private key")
    try:
        cert = x509.load_pem_x509_certificate(cert_pem)
    except ValueError as exc:
        raise CertError(ca_dir / CA_FILE, f"CA certificate does not parse: {exc}") from None
    try:
        key = serialization.load_pem_private_key(key_pem, password=None)
    except TypeError:
        raise CertError(ca_dir / CA_KEY_FILE, "CA key is encrypted; an unencrypted key is needed") from None
    except ValueError:
        raise CertError(ca_dir / CA_KEY_FILE, "CA key does not parse as a PEM private key") from None
    try:
        bc = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
        is_ca = bc.ca
    except x509.ExtensionNotFound:
        is_ca = False
    if not is_ca:
        raise CertError(ca_dir / CA_FILE, "is not a CA certificate (basicConstraints CA:TRUE missing)")
    spki = serialization.PublicFormat.SubjectPublicKeyInfo
    if (key.public_key().public_bytes(serialization.Encoding.DER, spki)
            != cert.public_key().public_bytes(serialization.Encoding.DER, spki)):
        raise CertError(ca_dir / CA_KEY_FILE, f"CA key does not match {ca_dir / CA_FILE}")
    now = now or dt.datetime.now(dt.UTC)
    if cert.not_valid_after_utc <= now:
        raise CertError(ca_dir / CA_FILE, f"CA expired at {cert.not_valid_after_utc.isoformat()}")
    return generate.Issued(cert_pem, key_pem)


def issue_material(spec: Spec, ca: generate.Issued | None = None, *,
                   now: dt.datetime | None = None) -> Material:
    """Make (or reuse) the CA and issue the server (and client) certificates."""
    now = now or dt.datetime.now(dt.UTC)
    ca_is_new = ca is None
    if ca is None:
        ca = generate.make_ca(f"{spec.service}.{spec.namespace} tlsproxy CA", key_type=spec.key_type,
                              now=now)
    not_after = now + dt.timedelta(days=spec.days)
    ca_not_after = ca.cert.not_valid_after_utc
    if not_after > ca_not_after:
        raise ConfigError(f"--days {spec.days} outlives the CA, which expires {ca_not_after.date()}; "
                          "use fewer days or a new CA")
    server = generate.issue(ca, spec.server_cn, dns=spec.server_dns, ips=spec.ips, server=True,
                            client=False, key_type=spec.key_type, not_after=not_after)
    client = None
    if spec.client:
        client = generate.issue(ca, spec.client, uris=spec.client_uris, server=False, client=True,
                                key_type=spec.key_type, not_after=not_after)
    return Material(ca, ca_is_new, server, client)


# ---------------------------------------------------------------------------- output

def files_of(material: Material) -> dict[str, tuple[bytes, int]]:
    """Relative path -> (content, mode). Keys are 0600, certificates 0644."""
    files: dict[str, tuple[bytes, int]] = {CA_FILE: (material.ca.cert_pem, 0o644)}
    if material.ca_is_new:
        files[CA_KEY_FILE] = (material.ca.key_pem, 0o600)
    files[CERT_FILE] = (material.server.cert_pem, 0o644)
    files[KEY_FILE] = (material.server.key_pem, 0o600)
    if material.client is not None:
        files[f"{CLIENT_SUBDIR}/{CERT_FILE}"] = (material.client.cert_pem, 0o644)
        files[f"{CLIENT_SUBDIR}/{KEY_FILE}"] = (material.client.key_pem, 0o600)
        files[f"{CLIENT_SUBDIR}/{CA_FILE}"] = (material.ca.cert_pem, 0o644)
    return files


def _os_error(what: str, exc: OSError) -> ConfigError:
    return ConfigError(f"{what}: {exc.strerror or exc}")


def write_files(out: Path, files: dict[str, tuple[bytes, int]], *, force: bool = False) -> list[Path]:
    """Write every file atomically. Refuses (before writing anything) to replace a file whose content
    differs unless ``force``. New directories are created with mode 0700."""
    targets = [(out / rel, data, mode) for rel, (data, mode) in files.items()]
    try:
        out.mkdir(mode=0o700, parents=True, exist_ok=True)
    except OSError as exc:
        raise _os_error(f"--out {out}: cannot create the directory", exc) from None
    if not force:
        for path, data, _mode in targets:
            try:
                if path.is_file() and path.read_bytes() != data:
                    raise ConfigError(f"{path} already exists; use --force to replace it "
                                      "(or --ca-dir to reuse its CA)")
            except OSError as exc:
                raise _os_error(f"cannot read {path}", exc) from None
    written = []
    for path, data, mode in targets:
        try:
            path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            _write_atomic(path, data, mode)
        except OSError as exc:
            raise _os_error(f"cannot write {path}", exc) from None
        written.append(path)
    return written


def _write_atomic(path: Path, data: bytes, mode: int) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, mode)
    try:
        os.fchmod(fd, mode)          # the umask must not widen nor narrow what we promise
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        tmp.unlink(missing_ok=True)
        raise
    os.close(fd)
    os.replace(tmp, path)


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def server_secret_name(spec: Spec) -> str:
    return f"{spec.service}-tls"


def client_secret_name(spec: Spec) -> str:
    return f"{spec.client}-client-tls"


def secret_manifests(spec: Spec, material: Material) -> list[dict]:
    """``kubernetes.io/tls`` Secrets: the server pair and, with --client, the client pair."""
    def secret(name: str, pair: generate.Issued, component: str) -> dict:
        return {
            "apiVersion": "v1",
            "kind": "Secret",
            "metadata": {
                "name": name,
                "namespace": spec.namespace,
                "labels": {
                    "app.kubernetes.io/name": spec.service,
                    "app.kubernetes.io/component": component,
                    "app.kubernetes.io/managed-by": "tlsproxy",
                },
            },
            "type": "kubernetes.io/tls",
            "data": {
                "tls.crt": _b64(pair.cert_pem),
                "tls.key": _b64(pair.key_pem),
                "ca.crt": _b64(material.ca.cert_pem),
            },
        }

    docs = [secret(server_secret_name(spec), material.server, "server")]
    if material.client is not None:
        docs.append(secret(client_secret_name(spec), material.client, "client"))
    return docs


def render_yaml(manifests: list[dict]) -> str:
    return yaml.safe_dump_all(manifests, sort_keys=False, explicit_start=True, width=1 << 20)


def cabundle(material: Material) -> str:
    """The CA as one base64 line, for a webhook's or a ClusterInterceptor's ``caBundle``."""
    return _b64(material.ca.cert_pem)
