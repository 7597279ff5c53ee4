"""The package's strict layers: every import (inside functions too) points to the same layer or a lower one,
and no modules import each other in a loop. The layer map is written once, here (DESIGN.md sketches it)."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "prefalign"

# Lowest first. A module belongs to the longest prefix listed; every module must have one.
LAYERS: dict[str, int] = {
    "prefalign.errors": 0, "prefalign.config": 0, "prefalign.options": 0, "prefalign.version": 0,
    "prefalign.files": 0,
    "prefalign.losses": 1, "prefalign.data": 1, "prefalign.tasks": 1,
    "prefalign.models": 2, "prefalign.rollout": 2,
    "prefalign.rewards": 3, "prefalign.runtime": 3,
    "prefalign.evaluation": 4, "prefalign.reporting": 4,  # reporting reads run folders (runtime.run_folder)
    "prefalign.algorithms": 5,
    "prefalign.recipes": 6,
    "prefalign.commands": 7, "prefalign.cli": 7, "prefalign.__main__": 7,
    "prefalign": 8,  # the public API: `from prefalign import dpo, DPOConfig, ...`
}  # fmt: skip


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(path): path for path in PACKAGE.rglob("*.py")}


def layer_of(module: str) -> int:
    prefixes = [prefix for prefix in LAYERS if module == prefix or module.startswith(prefix + ".")]
    assert prefixes, f"{module} is in no layer: add it to LAYERS in {__file__}"
    return LAYERS[max(prefixes, key=len)]


def resolve(name: str) -> str | None:
    """The package module an imported name lives in (`prefalign.models.loading.load_causal_lm` -> its
    module)."""
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name or None


def imports_of(module: str) -> dict[str, int]:
    """Package modules `module` imports -> the line of the first such import (every import statement)."""
    tree = ast.parse(MODULES[module].read_text())
    found: dict[str, int] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            assert node.level == 0, f"{module}:{node.lineno}: use absolute imports"
            names = [f"{node.module}.{alias.name}" for alias in node.names]
        else:
            continue
        for name in names:
            target = resolve(name) if name.startswith("prefalign") else None
            if target and target != module:
                found.setdefault(target, node.lineno)
    return found


GRAPH = {module: imports_of(module) for module in MODULES}


def test_every_module_has_a_layer():
    missing = [m for m in MODULES if not any(m == p or m.startswith(p + ".") for p in LAYERS)]
    assert not missing, f"modules in no layer (add them to LAYERS in {__file__}): {missing}"


def test_no_import_points_up_the_layers():
    upward = [
        f"{module} (L{layer_of(module)}) line {line} imports {target} (L{layer_of(target)})"
        for module, targets in GRAPH.items()
        for target, line in targets.items()
        if layer_of(target) > layer_of(module)
    ]
    assert not upward, "imports that point up the layer map:\n" + "\n".join(upward)


def test_no_modules_import_each_other():
    """Same-layer imports are allowed as long as they never close a loop (lazy imports count too). A package's
    __init__ re-exporting its own submodules is the one loop allowed: it adds no dependency."""

    def edges(module: str) -> list[str]:
        is_init = MODULES[module].name == "__init__.py"
        return [t for t in GRAPH[module] if not (is_init and t.startswith(module + "."))]

    state: dict[str, int] = {}  # 1 = on the current path, 2 = done
    path: list[str] = []
    loops: list[list[str]] = []

    def visit(module: str) -> None:
        state[module] = 1
        path.append(module)
        for target in edges(module):
            if state.get(target) == 1:
                loops.append(path[path.index(target):] + [target])
            elif target not in state:
                visit(target)
        path.pop()
        state[module] = 2

    for module in sorted(MODULES):
        if module not in state:
            visit(module)
    assert not loops, "modules that import each other:\n" + "\n".join(" -> ".join(loop) for loop in loops)


def test_the_check_sees_imports_inside_functions(tmp_path):
    """The parser counts a lazy import: the circles this test guards against hid inside functions."""
    source = "def f():\n    from prefalign.commands.dpo import dpo\n"
    tree = ast.parse(source)
    lazy = [node for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)]
    assert [node.module for node in lazy] == ["prefalign.commands.dpo"]
    assert layer_of(resolve("prefalign.commands.dpo.dpo")) > layer_of("prefalign.models.loading")
