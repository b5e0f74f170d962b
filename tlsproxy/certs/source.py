"""Where certificate material comes from: a Secret directory or explicit files (plus CA files).

A source knows the paths to watch and how to read one consistent :class:`Bundle`; it knows
nothing of TLS contexts (that is ``tls/``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from . import bundle as _bundle
from .bundle import Bundle


@dataclass(frozen=True)
class CertSource:
    cert_dir: Path | None = None
    cert: Path | None = None
    key: Path | None = None

    def load(self) -> Bundle:
        if self.cert_dir is not None:
            return _bundle.load_dir(self.cert_dir)
        assert self.cert is not None and self.key is not None
        return _bundle.load_files(self.cert, self.key)

    @property
    def watch_paths(self) -> tuple[Path, ...]:
        """Directories to watch (never the files: kubelet swaps a symlinked directory)."""
        if self.cert_dir is not None:
            return (self.cert_dir,)
        assert self.cert is not None and self.key is not None
        return tuple(dict.fromkeys((self.cert.parent, self.key.parent)))

    def describe(self) -> str:
        return str(self.cert_dir) if self.cert_dir else f"{self.cert} + {self.key}"
