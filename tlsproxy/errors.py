"""One shallow exception hierarchy. Each exception carries what its handler needs."""

from __future__ import annotations


class TLSProxyError(Exception):
    """Base of every error tlsproxy raises on purpose."""


class ConfigError(TLSProxyError):
    """A bad setting. The message is one line naming the key and the problem; the CLI exits 2."""


class CertError(TLSProxyError):
    """Certificate material that cannot be used. ``path`` names the file, ``reason`` says why."""

    def __init__(self, path: object, reason: str) -> None:
        super().__init__(f"{path}: {reason}")
        self.path = str(path)
        self.reason = reason


class HTTPError(TLSProxyError):
    """A request that ends with an error response from the proxy itself.

    ``status`` is the response code; ``reason`` is the short plain-text body and log message;
    ``kind`` is the metric/log label (the status when not given).
    """

    def __init__(self, status: int, reason: str, *, kind: str = "") -> None:
        super().__init__(f"{status} {reason}")
        self.status = status
        self.reason = reason
        self.kind = kind or str(status)


class UpstreamError(TLSProxyError):
    """The upstream (app or peer) failed. ``kind`` is a metric label (connect, timeout, reset, protocol…)."""

    def __init__(self, kind: str, reason: str, *, sent_nothing: bool = False) -> None:
        super().__init__(reason)
        self.kind = kind
        self.reason = reason
        self.sent_nothing = sent_nothing
