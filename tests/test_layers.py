"""Imports point down only (docs/architecture.md), deny-by-default.

Every unit of the package (a top-level module, or a subpackage) has an explicit list of the units
it MAY import; any other import of the package fails, and so does a unit with no list at all (a
new module is given its place in the map when it is written). The units, from the bottom up::

    errors log metrics proxyproto        leaves: import nothing of tlsproxy
    config                               frozen settings
    relay tcprelay                       two-way byte copy; one measured relay
    net                                  binding, the one serve function, dialling, streams
    certs                                certificate files: read, validate, watch, issue
    tls                                  contexts, store, reload, served identity, TLS stream
    http                                 THE forwarding engine (knows no TLS)
    admin                                admin endpoints (a local handler of the engine), readiness
    accept                               the connection handler of every TLS listener
    runtime workers                      root nursery, signals, drain; --workers N
    inbound outbound webhook             the programs' parts (never each other)
    app demo                             ``tlsproxy serve``; the demo upstream
    args firstrun                        argument helpers; the "try this" lines
    cli __main__                         the subcommand table (imports each shell explicitly)

The subcommand shells ``certs/cli.py`` and ``webhook/cli.py`` are units of the CLI layer, not of
their package: they parse arguments and call down (``certs check`` builds a real TLS context as a
dry run), and nothing below the CLI imports them. The unit graph must also have no cycle.
"""

from __future__ import annotations

import ast
from pathlib import Path

PKG = Path(__file__).resolve().parent.parent / "tlsproxy"

LEAVES: set[str] = set()
_BASE = {"errors", "log"}
_CORE = _BASE | {"config", "metrics"}

# unit -> the units it may import (deny-by-default)
ALLOWED: dict[str, set[str]] = {
    "__init__": LEAVES,
    "errors": LEAVES,
    "log": LEAVES,
    "metrics": LEAVES,
    "proxyproto": LEAVES,
    "config": {"errors"},
    "relay": _BASE,
    "tcprelay": _BASE | {"relay"},
    "net": _CORE,
    "certs": _CORE,
    "k8s": _CORE | {"certs"},                      # the Kubernetes API: Secrets, caBundle
    "tls": _CORE | {"certs", "net"},
    "http": _CORE | {"net", "relay", "tcprelay"},
    "admin": _CORE | {"certs", "http", "net", "tls"},   # its endpoints are a local handler of the engine
    "accept": _CORE | {"certs", "http", "net", "tls"},
    "runtime": _CORE | {"admin", "certs", "net", "tls"},
    "workers": _CORE | {"net"},
    "inbound": _CORE | {"accept", "certs", "http", "net", "proxyproto", "relay", "tcprelay", "tls"},
    "outbound": _CORE | {"accept", "certs", "http", "k8s", "net", "relay", "tcprelay", "tls"},
    "webhook": _CORE | {"__init__", "accept", "admin", "certs", "http", "k8s", "net", "runtime", "tls"},
    "app": _CORE | {"accept", "admin", "certs", "http", "inbound", "k8s", "net", "outbound", "runtime", "tls",
                    "workers"},
    "demo": _CORE | {"app", "http", "net", "runtime"},    # the demo app is a local handler of the engine
    # the CLI layer: argument helpers, the first-run lines, the subcommand shells, the table
    "args": {"config", "errors"},
    "firstrun": {"config", "certs"},
    "certs.cli": _CORE | {"args", "certs", "tls"},
    "webhook.cli": _CORE | {"__init__", "args", "webhook", "runtime"},
    "cli": _CORE | {"__init__", "args", "app", "demo", "firstrun", "certs.cli", "webhook.cli"},
    "__main__": {"cli"},
}

SHELLS = {"certs/cli.py": "certs.cli", "webhook/cli.py": "webhook.cli"}


def _unit(path: Path) -> str:
    rel = path.relative_to(PKG)
    return SHELLS.get(rel.as_posix()) or rel.parts[0].removesuffix(".py")


def _module_unit(parts: list[str]) -> str:
    """The unit of an imported module path (relative to the package)."""
    if not parts:
        return "__init__"
    shell = "/".join(parts[:2]) + ".py"
    if shell in SHELLS:
        return SHELLS[shell]
    head = parts[0]
    is_module = (PKG / head).is_dir() or (PKG / f"{head}.py").is_file()
    return head if is_module else "__init__"     # `from tlsproxy import __version__`


def _from_unit(module: list[str], name: str) -> str:
    """The unit of ``from <module> import <name>``: the shell itself when ``name`` is one."""
    shell = "/".join(module + [name]) + ".py"
    return SHELLS[shell] if shell in SHELLS else _module_unit(module)


def _imports(path: Path) -> set[str]:
    return _imports_of(path.read_text(), list(path.relative_to(PKG).parts))


def _imports_of(source: str, rel_parts: list[str]) -> set[str]:
    """The units imported by ``source``, a module at ``rel_parts`` inside the package."""
    tree = ast.parse(source)
    found: set[str] = set()
    depth_of_pkg = len(rel_parts) - 1
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level:
            up = node.level - 1
            assert up <= depth_of_pkg, f"{'/'.join(rel_parts)}: relative import above the package"
            base = rel_parts[:depth_of_pkg - up]
            target = base + (node.module.split(".") if node.module else [])
            if node.module:
                found.update(_from_unit(target, alias.name) for alias in node.names)
            else:
                found.update(_module_unit(target + [alias.name]) for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and \
                (node.module == "tlsproxy" or node.module.startswith("tlsproxy.")):
            parts = node.module.split(".")[1:]
            if parts:
                found.update(_from_unit(parts, alias.name) for alias in node.names)
            else:
                found.update(_module_unit([alias.name]) for alias in node.names)
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("tlsproxy."):
                    found.add(_module_unit(alias.name.split(".")[1:]))
    return found


def _graph() -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {}
    for path in sorted(PKG.rglob("*.py")):
        unit = _unit(path)
        graph.setdefault(unit, set()).update(t for t in _imports(path) if t != unit)
    return graph


def test_every_unit_has_rules():
    missing = sorted(set(_graph()) - set(ALLOWED))
    assert not missing, f"units with no import rules (add them to ALLOWED in {__file__}): {missing}"


def test_imports_point_down_only():
    problems = [f"{unit} imports {target}" for unit, targets in sorted(_graph().items())
                for target in sorted(targets) if target not in ALLOWED.get(unit, set())]
    assert not problems, "imports outside the allowed lists:\n" + "\n".join(problems)


def test_no_import_cycles():
    graph = _graph()
    state: dict[str, int] = {}     # 1 visiting, 2 done

    def visit(unit: str, trail: list[str]) -> None:
        state[unit] = 1
        for nxt in sorted(graph.get(unit, ())):
            if state.get(nxt) == 1:
                raise AssertionError("import cycle: " + " -> ".join([*trail, unit, nxt]))
            if nxt not in state:
                visit(nxt, [*trail, unit])
        state[unit] = 2

    for unit in sorted(graph):
        if unit not in state:
            visit(unit, [])


def test_the_rules_themselves_have_no_cycle():
    """The allowed lists form a layering (no two units may import each other, even indirectly)."""
    state: dict[str, int] = {}

    def visit(unit: str) -> None:
        state[unit] = 1
        for nxt in sorted(ALLOWED.get(unit, ())):
            if nxt == "cli" and unit in ("certs.cli", "webhook.cli"):
                continue   # the helpers of cli.py (see ALLOWED); the real graph is checked above
            assert state.get(nxt) != 1, f"the rules allow a cycle through {unit} -> {nxt}"
            if nxt not in state:
                visit(nxt)
        state[unit] = 2

    for unit in sorted(ALLOWED):
        if unit not in state:
            visit(unit)


def test_the_scanner_sees_an_upward_import():
    """A new upward import fails: relative and absolute forms resolve to their units."""
    source = ("from ..http import forward\nimport tlsproxy.app\nfrom .. import net, __version__\n"
              "from ..certs.cli import main\nfrom .bundle import Bundle\n")
    found = _imports_of(source, ["certs", "new.py"])
    assert found == {"http", "app", "net", "__init__", "certs.cli", "certs"}
    assert sorted(found - ALLOWED["certs"] - {"certs"}) == ["__init__", "app", "certs.cli", "http", "net"]
