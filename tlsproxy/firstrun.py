"""What a person sees first: the "try this" lines of ``tlsproxy demo`` and standalone ``tlsproxy serve``.

Printed on stdout by the command line *before* the runtime is imported or any log line is written,
and only when the output is for a person (``log.resolve_format`` says text: stdout and stderr are
terminals, or ``--log-format text``). In a pod or a pipe the same facts arrive as one JSON log line
("standalone mode", from the runtime) and nothing is printed here. Pure text; no heavy imports.
"""

from __future__ import annotations

from pathlib import Path

from .config import Settings


def is_standalone(settings: Settings) -> bool:
    """No certificate given: the development CA makes one (``certs/devca.py``)."""
    return settings.cert_dir is None and settings.cert is None


def state_dir(settings: Settings) -> Path:
    from .certs.devca import default_state_dir

    return settings.state_dir or default_state_dir()


def lines(settings: Settings, command: str) -> list[str]:
    """The banner for ``serve`` (standalone) or ``demo``; empty when the port is not known yet
    (``--listen :0``: the runtime's log line carries the bound port)."""
    port = settings.listen.port
    if not port:
        return []
    ca = state_dir(settings) / "ca.crt" if is_standalone(settings) else None
    url = f"https://localhost:{port}/" if port != 443 else "https://localhost/"
    if command == "demo":
        head = f"tlsproxy demo: a built-in app behind the proxy at {url}"
        try_url = f"{url}hello"
    else:
        head = (f"tlsproxy serve: standalone mode, {url} -> {settings.upstream} "
                "(start your app there)")
        try_url = url
    if not is_standalone(settings):     # the demo with your own certificate
        return [head, f"  try:      curl --cacert YOUR-CA.pem {try_url}",
                "  stop:     Ctrl-C           (finishes in-flight requests first)", ""]
    return [
        head,
        f"  try:      curl --cacert {ca} {try_url}",
        "  browsers: tlsproxy trust   (trusts the development CA, which can only vouch for localhost;",
        "                              tlsproxy trust --uninstall removes it)",
        "  stop:     Ctrl-C           (finishes in-flight requests first)",
        "",
    ]
