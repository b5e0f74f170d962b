"""Structured logging: every line is an event name plus key/value fields.

``log = get_logger("inbound")``; ``log.info("listening", addr=":9443")`` prints either
``{"ts": "...", "level": "info", "logger": "inbound", "event": "listening", "addr": ":9443"}`` (json) or
``2026-11-25T12:00:00.000Z info  inbound listening addr=:9443`` (text). Lines go to stderr.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import Any

_ROOT = "tlsproxy"


class _Formatter(logging.Formatter):
    def __init__(self, fmt: str) -> None:
        super().__init__()
        self.json = fmt == "json"

    def format(self, record: logging.LogRecord) -> str:
        fields: dict[str, Any] = getattr(record, "fields", {})
        ts = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
        ts += f".{int(record.msecs):03d}Z"
        name = record.name.removeprefix(_ROOT + ".") if record.name != _ROOT else "main"
        level = record.levelname.lower()
        if self.json:
            line = {"ts": ts, "level": level, "logger": name, "event": record.getMessage()}
            line.update(fields)
            return json.dumps(line, default=str, separators=(",", ":"))
        parts = [ts, f"{level:<7}", name, record.getMessage()]
        for key, value in fields.items():
            text = str(value)
            if not text or any(c in text for c in ' "='):
                text = json.dumps(text)
            parts.append(f"{key}={text}")
        return " ".join(parts)


class Logger:
    """A thin wrapper: ``log.info(event, **fields)``."""

    __slots__ = ("_log",)

    def __init__(self, name: str) -> None:
        self._log = logging.getLogger(f"{_ROOT}.{name}" if name else _ROOT)

    def _emit(self, level: int, event: str, fields: dict[str, Any]) -> None:
        if self._log.isEnabledFor(level):
            self._log.log(level, event, extra={"fields": fields})

    def debug(self, event: str, **fields: Any) -> None:
        self._emit(logging.DEBUG, event, fields)

    def info(self, event: str, **fields: Any) -> None:
        self._emit(logging.INFO, event, fields)

    def warning(self, event: str, **fields: Any) -> None:
        self._emit(logging.WARNING, event, fields)

    def error(self, event: str, **fields: Any) -> None:
        self._emit(logging.ERROR, event, fields)

    def enabled(self, level: int = logging.INFO) -> bool:
        return self._log.isEnabledFor(level)


def get_logger(name: str = "") -> Logger:
    return Logger(name)


def _isatty(stream: Any) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError, OSError):    # no isatty, or a closed stream
        return False


def resolve_format(fmt: str = "auto", stream: Any = None, stdout: Any = None) -> str:
    """``auto`` is text for a person at a terminal (stdout and the log stream both terminals) and
    JSON otherwise (a pod, a pipe, a file); ``text`` and ``json`` are taken as given."""
    if fmt != "auto":
        return fmt
    stream = stream or sys.stderr
    stdout = stdout or sys.stdout
    return "text" if _isatty(stdout) and _isatty(stream) else "json"


def setup(fmt: str = "auto", level: str = "info", stream: Any = None) -> None:
    stream = stream or sys.stderr
    fmt = resolve_format(fmt, stream)
    handler = logging.StreamHandler(stream)
    handler.setFormatter(_Formatter(fmt))
    root = logging.getLogger(_ROOT)
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    root.propagate = False
