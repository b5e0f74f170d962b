"""Command line: ``tlsproxy serve|demo|trust|certs|inject|webhook``.

Parsing happens once, here; every bad value ends as one line ``tlsproxy: error: ...`` on stderr and
exit code 2. :data:`SUBCOMMANDS` is the whole table: each entry names a small argument-definition
function and a run function. Argument definitions are cheap and imported statically; each run
function imports its implementation (the proxy runtime, the webhook, certificate tooling, YAML)
only when that command runs, so ``tlsproxy serve`` loads none of the others' code.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from . import __version__
from .args import EXIT_USAGE, Parser, add_settings_arguments, settings_from_args
from .certs import cli as certs_cli
from .config import Settings
from .errors import ConfigError, TLSProxyError
from .webhook import cli as webhook_cli

__all__ = ["EXIT_USAGE", "SUBCOMMANDS", "build_parser", "main", "parse_serve_settings",
           "settings_from_args"]


def parse_serve_settings(argv: Sequence[str], env: Mapping[str, str] | None = None) -> Settings:
    """Parse ``tlsproxy serve`` arguments into Settings (the injector's tests use this too)."""
    parser = Parser(prog="tlsproxy serve")
    add_settings_arguments(parser)
    ns = parser.parse_args(list(argv))
    return settings_from_args(ns, env)


# ---------------------------------------------------------------------------- serve and demo

def _serve_args(parser: argparse.ArgumentParser) -> None:
    add_settings_arguments(parser)


def _first_lines(settings: Settings, command: str) -> None:
    """The "try this" lines, first of all output, when a person reads it (``firstrun.py``)."""
    from . import firstrun
    from .log import resolve_format

    wanted = command == "demo" or firstrun.is_standalone(settings)
    banner = firstrun.lines(settings, command) if wanted else []
    if banner and resolve_format(settings.log_format) == "text":
        sys.stdout.write("\n".join(banner) + "\n")
        sys.stdout.flush()


def _serve_run(ns: argparse.Namespace) -> int:
    settings = settings_from_args(ns)
    _first_lines(settings, "serve")
    from .app import main_serve

    return main_serve(settings)


def _demo_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--app-port", type=int, default=0, help="port of the built-in demo app on "
                        "127.0.0.1 [default: any free port]")
    add_settings_arguments(parser)


def _demo_run(ns: argparse.Namespace) -> int:
    # A person stops the demo with Ctrl-C: no load balancer to wait for, so no drain delay unless
    # one is asked for (flag or environment).
    if not hasattr(ns, "opt:drain-delay") and "TLSPROXY_DRAIN_DELAY" not in os.environ:
        setattr(ns, "opt:drain-delay", "0")
    settings = settings_from_args(ns)
    _first_lines(settings, "demo")
    from .demo import main_demo

    return main_demo(settings, app_port=ns.app_port)


# ---------------------------------------------------------------------------- the table

@dataclass(frozen=True)
class Subcommand:
    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]


SUBCOMMANDS: dict[str, Subcommand] = {
    "serve": Subcommand("terminate TLS and forward to the app (the sidecar)", _serve_args, _serve_run),
    "demo": Subcommand("run a built-in demo app behind the proxy, with a development certificate",
                       _demo_args, _demo_run),
    "trust": Subcommand("install (or --uninstall) the development CA in the system and browser trust "
                        "stores", certs_cli.add_trust_arguments, certs_cli.run_trust),
    "certs": Subcommand("make (bootstrap), dry-run reload (check) and describe (inspect) certificates",
                        certs_cli.add_arguments, certs_cli.run),
    "inject": Subcommand("add the tlsproxy sidecar to workloads in YAML (offline, like the webhook)",
                         webhook_cli.add_inject_arguments, webhook_cli.run_inject),
    "webhook": Subcommand("serve the mutating admission webhook (/mutate, /mutate-namespace) over HTTPS",
                          webhook_cli.add_webhook_arguments, webhook_cli.run_webhook),
}


class _Version(argparse.Action):
    """``--version``: ``tlsproxy 0.1.0 (core: compiled (mypyc))`` or ``(core: pure Python)``. setup.py
    compiles the sans-IO HTTP core when it can, into an extension beside each module's .py, which
    Python imports before the .py (docs/performance.md, "mypyc"; tests/test_compiled.py holds this
    to what actually runs). A file check: the CLI does not import the http layer."""

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        import sysconfig
        from pathlib import Path

        ext = Path(__file__).parent / "http" / f"headers{sysconfig.get_config_var('EXT_SUFFIX')}"
        print(f"tlsproxy {__version__} (core: {'compiled (mypyc)' if ext.exists() else 'pure Python'})")
        parser.exit()


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="tlsproxy", description="A TLS 1.3 sidecar for plain-HTTP apps.")
    parser.add_argument("--version", action=_Version, nargs=0,
                        help="show the version and how the HTTP core runs (compiled or pure Python)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=Parser)
    for name, command in SUBCOMMANDS.items():
        command.add_arguments(sub.add_parser(name, help=command.help, description=command.help))
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    ns = parser.parse_args(sys.argv[1:] if argv is None else list(argv))
    if not ns.command:
        parser.print_help(sys.stderr)
        return EXIT_USAGE
    try:
        return SUBCOMMANDS[ns.command].run(ns)
    except (ConfigError, TLSProxyError) as exc:
        sys.stderr.write(f"tlsproxy: error: {exc}\n")
        return EXIT_USAGE
    except KeyboardInterrupt:
        return 130
