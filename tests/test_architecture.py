"""The package's shape, read from its source: imports run one way, no circles, small functions.

Every module has a rank (lowest first). A module may import modules of its own rank or below, never
above; the import graph has no cycle. Imports inside functions count too: a lazy import that reaches
up is still a dependency that reaches up. A new subpackage needs a line in RANKS.
"""
from __future__ import annotations

import ast
import importlib
import pathlib

import pytest

SRC = pathlib.Path(__file__).resolve().parents[1] / "src"
PKG = SRC / "lorakit"

#: module prefix -> rank; the longest matching prefix decides. cli -> train -> {eval, data} -> model ->
#: {loss, peft_format, plan, targets, config, layers} -> kernels, with errors/constants under everything.
RANKS = {
    "lorakit.errors": 0,
    "lorakit.io": 0,
    "lorakit.undo": 0,
    "lorakit.constants": 0,
    "lorakit.kernels": 1,
    "lorakit.config": 2,
    "lorakit.peft_fields": 2,
    "lorakit.targets": 2,
    "lorakit.layers": 2,
    "lorakit.hf.quant": 2,
    "lorakit.hf.compat": 3,
    "lorakit.hf.signature": 2,
    "lorakit.models": 2,
    "lorakit.precision": 2,
    "lorakit.recipes": 2,
    "lorakit.hf": 2,
    "lorakit.plan": 3,
    "lorakit.loss": 3,
    "lorakit.peft_format": 3,
    "lorakit.optim": 3,
    "lorakit.combine": 3,
    "lorakit.merging": 2,
    "lorakit.variants": 3,
    "lorakit.variants_plan": 3,
    "lorakit.init_conversion": 3,
    "lorakit.loftq": 3,
    "lorakit.status": 3,
    "lorakit.dryrun": 3,
    "lorakit.model": 4,
    "lorakit.hf.peft_api": 5,
    "lorakit.hf.trainer": 5,
    "lorakit.data": 5,
    "lorakit.eval": 6,
    "lorakit.train": 7,
    "lorakit.export": 8,
    "lorakit.serve": 8,
    "lorakit.cli": 9,
}

MAX_FUNCTION_LINES = 80


def _module_name(path: pathlib.Path) -> str:
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _modules() -> dict[str, pathlib.Path]:
    return {_module_name(p): p for p in sorted(PKG.rglob("*.py"))}


MODULES = _modules()


def _rank(module: str) -> int | None:
    best = None
    for prefix, rank in RANKS.items():
        if (module == prefix or module.startswith(prefix + ".")) and (best is None or len(prefix) > len(best[0])):
            best = (prefix, rank)
    return None if best is None else best[1]


def _resolve(importer: str, node: ast.ImportFrom) -> str:
    if not node.level:
        return node.module or ""
    is_pkg = MODULES[importer].name == "__init__.py"
    base = importer.split(".")
    base = base[: len(base) - node.level + (1 if is_pkg else 0)]
    return ".".join(base + ([node.module] if node.module else []))


def _public_api_target(name: str) -> str:
    """``from lorakit import X``: the module that really defines X (the package root is lazy)."""
    lorakit = importlib.import_module("lorakit")
    return "lorakit." + lorakit._EXPORTS[name] if name in lorakit._EXPORTS else "lorakit"


def imports_of(module: str) -> set[str]:
    """lorakit modules ``module`` imports, resolved to submodules where a name is one."""
    tree = ast.parse(MODULES[module].read_text())
    out: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names if a.name.split(".")[0] == "lorakit")
        elif isinstance(node, ast.ImportFrom):
            target = _resolve(module, node)
            if target.split(".")[0] != "lorakit":
                continue
            for alias in node.names:
                sub = f"{target}.{alias.name}"
                if sub in MODULES:
                    out.add(sub)
                elif target == "lorakit":
                    out.add(_public_api_target(alias.name))
                else:
                    out.add(target)
    out.discard(module)
    return out


def _graph() -> dict[str, set[str]]:
    return {m: imports_of(m) for m in MODULES}


def test_every_module_has_a_rank():
    missing = [m for m in MODULES if m != "lorakit" and _rank(m) is None]
    assert not missing, f"add these modules' packages to RANKS in {__file__}: {missing}"


def test_no_upward_imports():
    upward = []
    for module, targets in _graph().items():
        if module == "lorakit":
            continue  # the public API re-exports from every layer, lazily
        for target in targets:
            if target == "lorakit" or module.startswith(target + "."):
                continue  # a package's own __init__ (relative imports of siblings)
            if _rank(target) is not None and _rank(target) > _rank(module):
                upward.append(f"{module} (rank {_rank(module)}) imports {target} (rank {_rank(target)})")
    assert not upward, "imports that reach up:\n" + "\n".join(sorted(upward))


def test_no_import_cycles():
    graph = {m: {t for t in ts if not m.startswith(t + ".") and t != "lorakit"} for m, ts in _graph().items()}
    graph.pop("lorakit", None)
    state: dict[str, int] = {}
    cycles: list[list[str]] = []

    def visit(node: str, stack: list[str]) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                cycles.append(stack[stack.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt, stack)
        stack.pop()
        state[node] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module, [])
    assert not cycles, "import cycles:\n" + "\n".join(" -> ".join(c) for c in cycles)


def test_the_checks_catch_what_they_claim(tmp_path):
    """The rank test is not vacuous: model really sits above layers, and cli above train."""
    assert _rank("lorakit.model") > _rank("lorakit.layers") > _rank("lorakit.kernels")
    assert "lorakit.layers.base" in imports_of("lorakit.model") or "lorakit.layers" in imports_of("lorakit.model")
    assert _rank("lorakit.cli.main") > _rank("lorakit.train.loop")


@pytest.mark.parametrize("path", sorted(PKG.rglob("*.py")), ids=lambda p: str(p.relative_to(PKG)))
def test_functions_are_short(path):
    long = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            n = node.end_lineno - node.lineno + 1
            if n > MAX_FUNCTION_LINES:
                long.append(f"{node.name}: {n} lines")
    assert not long, f"{path.name}: split these into named steps (<= {MAX_FUNCTION_LINES} lines): {long}"


def test_model_module_holds_only_the_lifecycle():
    lines = (PKG / "model.py").read_text().count("\n")
    assert lines <= 450, f"model.py has {lines} lines; move what is not LoraModel's lifecycle out"
