"""The command line: one explicit table of subcommands, no import cycle, and each command loads only
what it needs (issue 15 item 7, issue 19 start-up)."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

PKG = Path(__file__).resolve().parent.parent / "tlsproxy"


def _imported(path: Path) -> set[str]:
    """Absolute names of everything ``path`` imports (relative imports resolved; ``from X import y``
    counts as X and X.y), at any depth in the module, so lazy imports are seen too."""
    package = ["tlsproxy", *path.relative_to(PKG).parent.parts]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = package[:len(package) - node.level + 1] if node.level else []
            module = ".".join(base + (node.module.split(".") if node.module else []))
            found.add(module)
            found.update(f"{module}.{a.name}" for a in node.names)
    return found


def test_nothing_imports_the_cli_back():
    """cli.py imports the subcommand modules; none of them, nor anything but __main__, imports
    cli.py: the table is the one registration, and an import scan sees every edge."""
    offenders = [str(p.relative_to(PKG)) for p in PKG.rglob("*.py")
                 if p.name != "__main__.py" and "tlsproxy.cli" in _imported(p)]
    assert not offenders, offenders
    cli = _imported(PKG / "cli.py")
    assert {"tlsproxy.certs.cli", "tlsproxy.webhook.cli", "tlsproxy.app", "tlsproxy.demo"} <= cli
    source = (PKG / "cli.py").read_text()
    assert "importlib" not in source and "register(" not in source and "run_cli" not in source


def test_every_subcommand_is_in_the_table_and_parses():
    from tlsproxy.cli import SUBCOMMANDS, build_parser

    assert list(SUBCOMMANDS) == ["serve", "demo", "trust", "certs", "inject", "webhook"]
    parser = build_parser()
    assert parser.parse_args(["trust", "--print"]).print_only
    assert parser.parse_args(["certs", "inspect", "x.pem"]).certs_action == "inspect"
    assert parser.parse_args(["inject", "-f", "-"]).filename == "-"


def _modules_after(argv: list[str]) -> set[str]:
    """Modules loaded by parsing ``argv`` and importing what its run function imports first."""
    code = (
        "import sys\n"
        "from tlsproxy.cli import SUBCOMMANDS, build_parser\n"
        f"ns = build_parser().parse_args({argv!r})\n"
        "print(' '.join(sorted(sys.modules)))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                         check=True).stdout
    return set(out.split())


def test_parsing_any_command_loads_no_implementation():
    heavy = {"yaml", "cryptography", "prometheus_client", "trio", "h11", "watchfiles",
             "tlsproxy.app", "tlsproxy.webhook.injector", "tlsproxy.webhook.server",
             "tlsproxy.certs.bootstrap", "tlsproxy.certs.inspect", "tlsproxy.certs.trust", "bench"}
    for argv in (["serve"], ["demo"], ["trust", "--print"], ["certs", "inspect", "x"],
                 ["inject", "-f", "-"], ["webhook"]):
        loaded = _modules_after(argv)
        assert not heavy & loaded, f"{argv}: {sorted(heavy & loaded)}"


def test_serve_runtime_loads_no_yaml_webhook_or_certs_tooling():
    """What ``tlsproxy serve`` (with a certificate directory, no --config) imports in full."""
    code = ("import sys\nimport tlsproxy.cli, tlsproxy.app\n"
            "print(' '.join(sorted(sys.modules)))\n")
    loaded = set(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                                timeout=60, check=True).stdout.split())
    unwanted = {"yaml", "tlsproxy.webhook.injector", "tlsproxy.webhook.k8s_yaml",
                "tlsproxy.webhook.review", "tlsproxy.webhook.server", "tlsproxy.certs.bootstrap",
                "tlsproxy.certs.inspect", "tlsproxy.certs.trust", "bench"}
    assert not unwanted & loaded, sorted(unwanted & loaded)


def test_help_defaults_match_the_implementations():
    from tlsproxy import __version__
    from tlsproxy.certs import bootstrap
    from tlsproxy.certs import cli as certs_cli
    from tlsproxy.webhook.injector import default_image

    assert certs_cli.DEFAULT_DAYS == bootstrap.DEFAULT_DAYS
    assert certs_cli.MAX_DAYS == bootstrap.MAX_DAYS
    assert default_image() == f"tlsproxy:{__version__}"


def test_small_modules_stay_small():
    """What the command line and the serve path lean on imports little of tlsproxy (and der.py and
    trust.py no third-party code), so they stay cheap to load."""
    allowed = {
        "args.py": {"tlsproxy.config", "tlsproxy.errors"},
        "firstrun.py": {"tlsproxy.config", "tlsproxy.certs.devca"},
        "certs/der.py": set(),
        "certs/trust.py": {"tlsproxy.errors"},
    }
    for rel, ok in allowed.items():
        mine = {m for m in _imported(PKG / rel) if m.startswith("tlsproxy")}
        names = {m.rsplit(".", 1)[0] if m.rsplit(".", 1)[0] in ok else m for m in mine}
        assert names <= ok | {"tlsproxy"}, f"{rel}: {sorted(names - ok)}"
    for rel in ("certs/der.py", "certs/trust.py", "args.py", "firstrun.py"):
        third = {m.split(".")[0] for m in _imported(PKG / rel) if not m.startswith("tlsproxy")}
        assert not third & {"cryptography", "trio", "yaml", "prometheus_client", "h11", "watchfiles"}, rel
