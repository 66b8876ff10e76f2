"""The import rules docs/architecture.md states, checked on the source (ast; nothing is imported)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[2] / "src" / "vimgtools"


def module_name(path: Path) -> str:
    parts = path.relative_to(PKG.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULE_FILES = {module_name(p) for p in PKG.rglob("*.py")}


def imports(path: Path) -> list[tuple[str, bool]]:
    """(module imported, at module level and not under TYPE_CHECKING) for each import in ``path``."""
    tree = ast.parse(path.read_text())
    typing_only = {
        id(n)
        for node in ast.walk(tree)
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.dump(node.test)
        for n in ast.walk(node)
    }
    top = {id(n) for n in tree.body}
    me = module_name(path)
    out = []
    for node in ast.walk(tree):
        if id(node) in typing_only:
            continue
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: resolve against this package
                pkg = me.split(".") if path.name == "__init__.py" else me.split(".")[:-1]
                base = ".".join(pkg[: len(pkg) - node.level + 1] + ([base] if base else []))
            # ``from pkg import mod`` depends on mod; ``from mod import name`` on mod.
            subs = [f"{base}.{a.name}" for a in node.names]
            names = [base, *subs] if not all(n in MODULE_FILES for n in subs) else subs
        else:
            continue
        out += [(n, id(node) in top) for n in names]
    return out


MODULES = {module_name(p): p for p in PKG.rglob("*.py")}


def graph() -> dict[str, set[str]]:
    return {m: {n for n, top in imports(p) if top and n in MODULES and n != m} for m, p in MODULES.items()}


def test_no_import_cycles() -> None:
    g = graph()
    state: dict[str, int] = {}

    def visit(m: str, path: list[str]) -> None:
        state[m] = 1
        for n in sorted(g[m]):
            if state.get(n) == 1:
                pytest.fail("import cycle: " + " -> ".join([*path[path.index(n) :], n]))
            if n not in state:
                visit(n, [*path, n])
        state[m] = 2

    for m in sorted(g):
        if m not in state:
            visit(m, [m])


def test_sync_has_no_function_level_imports_and_its_init_only_reexports() -> None:
    for m, p in MODULES.items():
        if m.startswith("vimgtools.sync"):
            late = [n for n, top in imports(p) if not top and n.startswith("vimgtools")]
            assert not late, f"{p}: imports inside a function: {late}"
    tree = ast.parse((PKG / "sync" / "__init__.py").read_text())
    kinds = {type(n).__name__ for n in tree.body}
    assert kinds <= {"Expr", "ImportFrom", "Assign"}, kinds


@pytest.mark.parametrize(
    "layer, forbidden",
    [
        ("vimgtools.sync", ("vimgtools.guest", "vimgtools.boot", "vimgtools.rekernel", "vimgtools.drill")),
        ("vimgtools.guest", ("vimgtools.sync", "vimgtools.rekernel")),
        ("vimgtools.boot", ("vimgtools.sync", "vimgtools.rekernel")),
        ("vimgtools.kernel", ("vimgtools.sync", "vimgtools.rekernel")),
        ("vimgtools.journal", ("vimgtools.sync", "vimgtools.rekernel")),
        ("vimgtools.image", ("vimgtools.sync", "vimgtools.rekernel")),
    ],
)
def test_layers_point_down(layer: str, forbidden: tuple[str, ...]) -> None:
    for m, p in MODULES.items():
        if m == layer or m.startswith(layer + "."):
            bad = [n for n, _ in imports(p) if n.startswith(forbidden)]
            assert not bad, f"{p} imports {bad}"


def test_only_clis_import_cli_and_only_the_named_modules_import_the_bindings() -> None:
    for m, p in MODULES.items():
        names = [n for n, _ in imports(p)]
        if "vimgtools._cli" in names:
            assert m.endswith("__main__"), f"{p} imports _cli"
        if any(n == "vimgtools._blockdiff" or n.startswith("vimgtools._blockdiff.") for n in names):
            assert m in ("vimgtools", "vimgtools.blocks"), f"{p} imports the native module"
        if "vimgtools._linux" in names:
            assert m in ("vimgtools.image", "vimgtools.children"), f"{p} imports the Linux calls"
        if "guestfs" in names:
            assert m == "vimgtools.guest.bindings", f"{p} imports guestfs"
