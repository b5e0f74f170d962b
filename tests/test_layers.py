"""Imports point down only (docs/architecture.md): a lower unit never imports a higher one."""

from __future__ import annotations

import ast
from pathlib import Path

PKG = Path(__file__).resolve().parent.parent / "tlsproxy"

# unit -> units it must never import
FORBIDDEN = {
    "errors": {"*"},
    "metrics": {"*"},
    "log": {"*"},
    "certs": {"tls", "http", "inbound", "outbound", "webhook", "admin", "app", "relay", "k8s"},
    "tls": {"http", "inbound", "outbound", "webhook", "admin", "app"},
    "http": {"tls", "inbound", "outbound", "webhook", "admin", "app"},
    "relay": {"tls", "http", "inbound", "outbound", "webhook", "admin", "app", "certs"},
    "net": {"tls", "http", "inbound", "outbound", "webhook", "admin", "app", "certs"},
    "inbound": {"outbound", "webhook", "app"},
    "outbound": {"inbound", "webhook", "app"},
    "admin": {"inbound", "outbound", "webhook", "app", "http"},
    "k8s": {"tls", "http", "inbound", "outbound", "webhook", "admin", "app", "relay", "net"},
}
# The CLI shells may reach up for a dry run (certs check builds a real TLS context).
ALLOWED = {("certs/cli.py", "tls")}


def _unit(path: Path) -> str:
    rel = path.relative_to(PKG)
    return rel.parts[0].removesuffix(".py")


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    found: set[str] = set()
    depth_of_pkg = len(path.relative_to(PKG).parts) - 1
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level:
            up = node.level - 1
            if up > depth_of_pkg:
                continue
            base = list(path.relative_to(PKG).parts[:depth_of_pkg - up])
            target = base + (node.module.split(".") if node.module else [])
            if target:
                found.add(target[0])
            else:
                found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("tlsproxy."):
            found.add(node.module.split(".")[1])
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("tlsproxy."):
                    found.add(alias.name.split(".")[1])
    return found


def test_imports_point_down_only():
    problems = []
    for path in sorted(PKG.rglob("*.py")):
        unit = _unit(path)
        forbidden = FORBIDDEN.get(unit, set())
        for target in _imports(path):
            if target == unit or target in ("__init__",):
                continue
            if ("*" in forbidden or target in forbidden) and \
                    (str(path.relative_to(PKG)), target) not in ALLOWED:
                problems.append(f"{path.relative_to(PKG)} imports {target}")
    assert not problems, "upward imports:\n" + "\n".join(problems)
