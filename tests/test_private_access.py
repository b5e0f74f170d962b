"""No module of the package reaches into another library's private names (issue 15).

A private attribute read for speed is a breakage waiting for the next release of that library (h11
was pinned below 0.17 for exactly that). The scan walks every module's AST and flags:

* ``x._name`` (or ``getattr(x, "_name")``) where ``x`` is not ``self``/``cls`` nor a module of this
  package;
* an import of a private module (``h11._headers``, ``trio._core``, ``from ssl import _ssl``).

Names with a leading underscore that are public API by their library's own documentation are listed
in ``PUBLIC``. ``ALLOWED`` would list a reviewed exception with its reason; it is empty, and a new
entry needs one.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "tlsproxy"

PUBLIC = {
    "_exit",                                   # os._exit: documented, for a forked child
    "_replace", "_asdict", "_fields", "_make",  # namedtuple's documented methods
}

ALLOWED: dict[tuple[str, str], str] = {}


def _package_modules(tree: ast.Module) -> set[str]:
    """Names bound to modules of this package in ``tree`` (``from . import headers as hdr``)."""
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.level or (node.module or "").startswith("tlsproxy")):
            for alias in node.names:
                names.add(alias.asname or alias.name)
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("tlsproxy"):
                    names.add(alias.asname or alias.name.split(".")[0])
    return names


def _private(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__") and name not in PUBLIC


def _is_super(node: ast.expr) -> bool:
    return isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "super"


_OWN: set[str] = set()


def _own_methods() -> set[str]:
    """Names of the methods this package's own classes define."""
    if not _OWN:
        for path in PACKAGE.rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.ClassDef):
                    _OWN.update(f.name for f in node.body
                                if isinstance(f, ast.FunctionDef | ast.AsyncFunctionDef))
    return _OWN


def violations(source: str, rel: str) -> list[tuple[str, int, str]]:
    tree = ast.parse(source, rel)
    ours = _package_modules(tree) | {"self", "cls"}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and _private(node.attr):
            base = node.value
            if isinstance(base, ast.Name) and base.id in ours:
                continue
            if _is_super(base) and node.attr in _own_methods():
                continue        # super()._x where one of our own classes defines _x
            found.append((rel, node.lineno, node.attr))
        elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Name)
              and node.func.id in ("getattr", "hasattr", "setattr") and len(node.args) >= 2
              and isinstance(node.args[1], ast.Constant) and isinstance(node.args[1].value, str)
              and _private(node.args[1].value)):
            base = node.args[0]
            if not (isinstance(base, ast.Name) and base.id in ours):
                found.append((rel, node.lineno, node.args[1].value))
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            module = node.module or ""
            if module.startswith("tlsproxy"):
                continue
            parts = module.split(".")
            found += [(rel, node.lineno, p) for p in parts if _private(p)]
            found += [(rel, node.lineno, a.name) for a in node.names if _private(a.name)]
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if not alias.name.startswith("tlsproxy"):
                    found += [(rel, node.lineno, p) for p in alias.name.split(".") if _private(p)]
    return [v for v in found if (v[0], v[2]) not in ALLOWED]


def test_no_private_access_to_other_libraries():
    found = [v for path in sorted(PACKAGE.rglob("*.py"))
             for v in violations(path.read_text(), path.relative_to(PACKAGE).as_posix())]
    assert not found, "private attributes of other libraries:\n" + "\n".join(
        f"  tlsproxy/{rel}:{line}: {name}" for rel, line, name in found)


def test_the_scan_sees_what_it_must():
    """The scanner itself: each kind of access is caught, our own names and public ones are not."""
    probe = ("import h11\nimport os\nfrom h11._headers import Headers\nimport trio._core\n"
             "from ssl import _ssl\nfrom . import headers as hdr\n"
             "def f(conn, self):\n    conn._reader\n    self._ok\n    hdr._ours\n    os._exit(1)\n"
             "    h11.Request._full_items\n    getattr(conn, '_receive_buffer', None)\n")
    names = sorted(name for _, _, name in violations(probe, "http/probe.py"))
    assert names == ["_core", "_full_items", "_headers", "_reader", "_receive_buffer", "_ssl"]
