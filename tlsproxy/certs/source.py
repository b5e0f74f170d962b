"""Where certificate material comes from: a Secret directory or explicit files (plus CA files).

A source knows the paths to watch and how to read one consistent :class:`Bundle`; it knows
nothing of TLS contexts (that is ``tls/``).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

from . import bundle as _bundle
from .bundle import Bundle


@dataclass(frozen=True)
class CertSource:
    cert_dir: Path | None = None
    cert: Path | None = None
    key: Path | None = None
    client_ca: Path | None = None     # --client-ca: becomes the bundle's CA (replacing any ca.crt)

    def load(self) -> Bundle:
        if self.cert_dir is not None:
            bundle = _bundle.load_dir(self.cert_dir)
        else:
            assert self.cert is not None and self.key is not None
            bundle = _bundle.load_files(self.cert, self.key)
        if self.client_ca is not None:
            # Read with the pair, so a CA change is part of the bundle's digest and of a reload.
            ca_pem = _bundle.read_file(self.client_ca, "client CA bundle")
            _bundle.parse_pem_certs(ca_pem, str(self.client_ca), "client CA bundle")
            bundle = dataclasses.replace(bundle, ca_pem=ca_pem, ca_path=str(self.client_ca))
        return bundle

    @property
    def watch_paths(self) -> tuple[Path, ...]:
        """Directories to watch (never the files: kubelet swaps a symlinked directory)."""
        extra = (self.client_ca.parent,) if self.client_ca is not None else ()
        if self.cert_dir is not None:
            return tuple(dict.fromkeys((self.cert_dir, *extra)))
        assert self.cert is not None and self.key is not None
        return tuple(dict.fromkeys((self.cert.parent, self.key.parent, *extra)))

    def describe(self) -> str:
        text = str(self.cert_dir) if self.cert_dir else f"{self.cert} + {self.key}"
        return f"{text} + client CA {self.client_ca}" if self.client_ca is not None else text
