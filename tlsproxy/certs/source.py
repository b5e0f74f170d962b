"""Where certificate material comes from: a Secret directory or explicit files (plus CA files).

A source knows the paths to watch and how to read one consistent :class:`Material` (the raw
bytes of every file, read once) that validates into :class:`Bundle` values; it knows nothing of TLS
contexts (that is ``tls/``).

Reading and validating are two steps so that a reload can decide "changed?" by the hash of the bytes
(:attr:`Material.digest`) before doing any work, and skip material it already refused.

Two key types side by side: besides ``tls.crt``/``tls.key`` a Secret directory may hold
``tls2.crt``/``tls2.key`` (or ``--cert2``/``--key2`` name the files), a second certificate of the
*other* key type (ECDSA next to RSA). OpenSSL keeps one certificate per key type, so two of the same
type are refused instead of one silently replacing the other.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import hashlib
from dataclasses import dataclass
from pathlib import Path

from ..errors import CertError
from . import bundle as _bundle
from .bundle import Bundle

CERT2_FILE = "tls2.crt"     # the optional second pair of a Secret directory (other key type)
KEY2_FILE = "tls2.key"


@dataclass(frozen=True)
class PairBytes:
    """One certificate chain + key as read from disk (paths as the operator named them)."""

    cert_pem: bytes
    key_pem: bytes
    cert_path: str
    key_path: str
    ca_pem: bytes | None = None
    ca_path: str | None = None

    def validate(self, now: dt.datetime | None = None) -> Bundle:
        return _bundle.build(self.cert_pem, self.key_pem, self.ca_pem, self.cert_path, self.key_path,
                             self.ca_path, now=now)


@dataclass(frozen=True)
class Material:
    """Everything a context is built from, read consistently; not yet validated."""

    pairs: tuple[PairBytes, ...]
    client_ca_pem: bytes | None = None
    client_ca_path: str | None = None

    @property
    def digest(self) -> str:
        """Hash of every byte read: equal digests mean nothing changed (mtime plays no part)."""
        h = hashlib.sha256()
        parts: list[bytes] = []
        for p in self.pairs:
            parts += [p.cert_pem, p.key_pem, p.ca_pem or b""]
        parts.append(self.client_ca_pem or b"")
        for part in parts:
            h.update(len(part).to_bytes(8, "big"))
            h.update(part)
        return h.hexdigest()

    def bundles(self, now: dt.datetime | None = None) -> tuple[Bundle, ...]:
        """Validate every pair (raises CertError naming the file). The first bundle carries the
        client CA (when ``--client-ca`` is given) as its CA, replacing any ``ca.crt``."""
        bundles = [p.validate(now) for p in self.pairs]
        if self.client_ca_pem is not None and bundles:
            path = self.client_ca_path or "client CA"
            _bundle.parse_pem_certs(self.client_ca_pem, path, "client CA bundle")
            bundles[0] = dataclasses.replace(bundles[0], ca_pem=self.client_ca_pem, ca_path=path)
        if len(bundles) > 1 and bundles[0].info.key_type == bundles[1].info.key_type:
            raise CertError(bundles[1].cert_path,
                            f"second certificate has the same key type ({bundles[1].info.key_type}) as "
                            f"{bundles[0].cert_path}; the second pair must be the other type (ECDSA + RSA)")
        return tuple(bundles)


@dataclass(frozen=True)
class CertSource:
    """Where one TLS identity's files are. A server source names a pair (``cert_dir``, or ``cert``
    + ``key``); a client source may name none (an outbound CA bundle alone: no client certificate).
    ``client_ca`` is the CA file of the source: the CA that verifies clients (server), or the trust
    bundle (client)."""

    cert_dir: Path | None = None
    cert: Path | None = None
    key: Path | None = None
    client_ca: Path | None = None     # --client-ca: becomes the bundle's CA (replacing any ca.crt)
    cert2: Path | None = None         # --cert2/--key2: second pair (other key type); else tls2.* in cert_dir
    key2: Path | None = None

    def read(self) -> Material:
        """Read every file once, consistently (a Secret's ``..data`` is resolved once). Raises
        CertError for a missing or unreadable file; validation is :meth:`Material.bundles`."""
        pairs: list[PairBytes] = []
        if self.cert_dir is not None:
            d = self.cert_dir
            if not d.is_dir():
                raise CertError(d, "does not exist" if not d.exists() else "is not a directory")
            base = _bundle.resolve_secret_dir(d)

            def read(name: str, what: str) -> bytes:
                try:
                    return _bundle.read_file(base / name, what)
                except CertError as exc:    # name the file as the operator knows it, not ..2026_…/
                    raise CertError(d / name, exc.reason) from None

            ca_pem = ca_path = None
            if (base / _bundle.CA_FILE).exists():
                ca_pem = read(_bundle.CA_FILE, "CA bundle")
                ca_path = str(d / _bundle.CA_FILE)
            pairs.append(PairBytes(read(_bundle.CERT_FILE, "certificate"),
                                   read(_bundle.KEY_FILE, "private key"),
                                   str(d / _bundle.CERT_FILE), str(d / _bundle.KEY_FILE), ca_pem, ca_path))
            if self.cert2 is None and ((base / CERT2_FILE).exists() or (base / KEY2_FILE).exists()):
                pairs.append(PairBytes(read(CERT2_FILE, "second certificate"),
                                       read(KEY2_FILE, "second private key"),
                                       str(d / CERT2_FILE), str(d / KEY2_FILE)))
        elif self.cert is not None and self.key is not None:
            pairs.append(PairBytes(_bundle.read_file(self.cert, "certificate"),
                                   _bundle.read_file(self.key, "private key"), str(self.cert), str(self.key)))
        if self.cert2 is not None and self.key2 is not None:
            pairs.append(PairBytes(_bundle.read_file(self.cert2, "second certificate"),
                                   _bundle.read_file(self.key2, "second private key"),
                                   str(self.cert2), str(self.key2)))
        ca = None
        if self.client_ca is not None:
            ca = _bundle.read_file(self.client_ca, "client CA bundle")
        return Material(tuple(pairs), ca, str(self.client_ca) if self.client_ca is not None else None)

    def load_all(self, now: dt.datetime | None = None) -> tuple[Bundle, ...]:
        return self.read().bundles(now)

    @property
    def watch_paths(self) -> tuple[Path, ...]:
        """Directories to watch (never the files: kubelet swaps a symlinked directory)."""
        extra = tuple(p.parent for p in (self.cert2, self.key2, self.client_ca) if p is not None)
        if self.cert_dir is not None:
            return tuple(dict.fromkeys((self.cert_dir, *extra)))
        pair = tuple(p.parent for p in (self.cert, self.key) if p is not None)
        return tuple(dict.fromkeys((*pair, *extra)))

    def describe(self) -> str:
        if self.cert_dir is None and self.cert is None:
            return f"CA {self.client_ca}" if self.client_ca is not None else "no files"
        text = str(self.cert_dir) if self.cert_dir else f"{self.cert} + {self.key}"
        if self.cert2 is not None:
            text += f" + {self.cert2} + {self.key2}"
        return f"{text} + client CA {self.client_ca}" if self.client_ca is not None else text
