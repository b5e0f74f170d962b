"""Argument helpers shared by every subcommand's argument definitions (``cli.py`` and the ``cli.py``
modules of ``certs/`` and ``webhook/``).

A leaf of the command line: it imports only ``config`` and ``errors``, and nothing imports the
top-level ``cli`` module back, so the command table in ``cli.py`` is the one place that knows every
subcommand.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Mapping, Sequence
from typing import Any

from .config import Settings, build_settings, options

EXIT_USAGE = 2


class Parser(argparse.ArgumentParser):
    """argparse that reports errors as one line and exit code 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        sys.stderr.write(f"tlsproxy: error: {message}\n")
        raise SystemExit(EXIT_USAGE)


def add_settings_arguments(parser: argparse.ArgumentParser, groups: Sequence[str] | None = None,
                           flags: Sequence[str] | None = None) -> None:
    """Add every setting of the table as a flag (or only those of ``groups``, or only ``flags``).
    Values stay raw strings; ``build_settings`` parses."""
    seen: dict[str, Any] = {}   # group name -> argparse argument group
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
