"""Command line: ``tlsproxy serve|demo|certs|webhook|inject``.

Parsing happens once, here; every bad value ends as one line ``tlsproxy: error: ...`` on stderr and
exit code 2. Subcommands that are not the proxy itself live in their own modules and register a
``(add_arguments, run)`` pair in :data:`SUBCOMMANDS`, so this module stays a thin table.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from . import __version__
from .config import Settings, build_settings, options
from .errors import ConfigError, TLSProxyError

EXIT_USAGE = 2


class _Parser(argparse.ArgumentParser):
    """argparse that reports errors as one line and exit code 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        sys.stderr.write(f"tlsproxy: error: {message}\n")
        raise SystemExit(EXIT_USAGE)


def add_settings_arguments(parser: argparse.ArgumentParser, groups: Sequence[str] | None = None,
                           flags: Sequence[str] | None = None) -> None:
    """Add every setting of the table as a flag (or only those of ``groups``, or only ``flags``).
    Values stay raw strings; ``build_settings`` parses."""
    seen: dict[str, Any] = {}             # argparse argument groups (their class is private)
    for o in options():
        if groups is not None and o.group not in groups:
            continue
        if flags is not None and o.flag not in flags:
            continue
        group = seen.setdefault(o.group, parser.add_argument_group(o.group))
        help_text = o.help
        if o.repeat:
            help_text += " (repeatable)"
        elif o.default not in (None, (), ""):
            shown = o.default
            if isinstance(shown, bool):
                shown = "on" if shown else "off"
            help_text += f" [default: {shown}]"
        help_text += f"; env {o.env}" if not o.repeat else ""
        group.add_argument(f"--{o.flag}", dest=f"opt:{o.flag}", metavar=o.metavar or "VALUE",
                           action="append" if o.repeat else "store", default=argparse.SUPPRESS,
                           help=help_text.replace("%", "%%"))


def settings_from_args(ns: argparse.Namespace, env: Mapping[str, str] | None = None,
                       base: Settings | None = None) -> Settings:
    flags = {k[4:]: v for k, v in vars(ns).items() if k.startswith("opt:")}
    return build_settings(flags, os.environ if env is None else env, base)


def parse_serve_settings(argv: Sequence[str], env: Mapping[str, str] | None = None) -> Settings:
    """Parse ``tlsproxy serve`` arguments into Settings (the injector's tests use this too)."""
    parser = _Parser(prog="tlsproxy serve")
    add_settings_arguments(parser)
    ns = parser.parse_args(list(argv))
    return settings_from_args(ns, env)


# ---------------------------------------------------------------------------- subcommands

def _serve_args(parser: argparse.ArgumentParser) -> None:
    add_settings_arguments(parser)


def _serve_run(ns: argparse.Namespace) -> int:
    from .app import main_serve

    return main_serve(settings_from_args(ns))


def _demo_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--app-port", type=int, default=0, help="port of the built-in demo app on "
                        "127.0.0.1 [default: any free port]")
    add_settings_arguments(parser)


def _demo_run(ns: argparse.Namespace) -> int:
    from .demo import main_demo

    return main_demo(settings_from_args(ns), app_port=ns.app_port)


# name -> (help, add_arguments, run). Other modules append here via register().
SUBCOMMANDS: dict[str, tuple[str, Callable[[argparse.ArgumentParser], None],
                             Callable[[argparse.Namespace], int]]] = {
    "serve": ("terminate TLS and forward to the app (the sidecar)", _serve_args, _serve_run),
    "demo": ("run a built-in demo app behind the proxy, with a development certificate", _demo_args,
             _demo_run),
}

# Modules that register further subcommands when imported (kept lazy-safe: each import is cheap).
_PLUGINS = ("tlsproxy.certs.cli", "tlsproxy.webhook.cli")


def register(name: str, help: str, add_arguments: Callable[[argparse.ArgumentParser], None],
             run: Callable[[argparse.Namespace], int]) -> None:
    SUBCOMMANDS[name] = (help, add_arguments, run)


def build_parser() -> argparse.ArgumentParser:
    import importlib

    for module in _PLUGINS:
        try:
            importlib.import_module(module)
        except ModuleNotFoundError as exc:
            if exc.name != module:
                raise
    parser = _Parser(prog="tlsproxy", description="A TLS 1.3 sidecar for plain-HTTP apps.")
    parser.add_argument("--version", action="version", version=f"tlsproxy {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    for name, (help_text, add_arguments, _run) in SUBCOMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        add_arguments(p)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    ns = parser.parse_args(sys.argv[1:] if argv is None else list(argv))
    if not ns.command:
        parser.print_help(sys.stderr)
        return EXIT_USAGE
    _help, _add, run = SUBCOMMANDS[ns.command]
    try:
        return run(ns)
    except ConfigError as exc:
        sys.stderr.write(f"tlsproxy: error: {exc}\n")
        return EXIT_USAGE
    except TLSProxyError as exc:
        sys.stderr.write(f"tlsproxy: error: {exc}\n")
        return EXIT_USAGE
    except KeyboardInterrupt:
        return 130


def run_cli(argv: Sequence[str]) -> Any:  # pragma: no cover - convenience for `python -m`
    return main(argv)
