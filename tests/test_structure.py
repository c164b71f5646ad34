"""The package's structure: no import cycles, dependencies pointing one way, a head-only install.

The import graph is read from the source (every ``import`` statement, function-level ones too;
not those under ``if TYPE_CHECKING:``), one node per module file: ``from pkg import name`` is an
edge to ``pkg.name`` when that is a module, else to ``pkg/__init__``.
"""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

import hsoftmax

PACKAGE = Path(hsoftmax.__file__).parent


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in PACKAGE.rglob("*.py")}


def _imports(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    is_pkg = path.name == "__init__.py"
    base = name.split(".") if is_pkg else name.split(".")[:-1]
    out = set()
    tree = ast.parse(path.read_text(), str(path))
    typing_only = {  # `if TYPE_CHECKING:` imports never run
        id(n)
        for block in ast.walk(tree)
        if isinstance(block, ast.If) and ast.unparse(block.test).endswith("TYPE_CHECKING")
        for stmt in block.body
        for n in ast.walk(stmt)
    }
    for node in ast.walk(tree):
        if id(node) in typing_only:
            continue
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                stem = base[: len(base) - node.level + 1]
                mod = ".".join(stem + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            targets = [
                f"{mod}.{a.name}" if f"{mod}.{a.name}" in modules else mod for a in node.names
            ]
        else:
            continue
        out |= {t for t in targets if t in modules and t != name}
    return out


def import_graph() -> dict[str, set[str]]:
    modules = _modules()
    graph = {
        name: _imports(name, path, modules | {"hsoftmax._C": None})
        for name, path in modules.items()
    }
    graph["hsoftmax._C"] = set()  # the compiled extension imports nothing of ours
    return graph


def _find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1 on the stack, 2 done
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt) :] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_the_cycle_finder_finds_a_cycle():
    assert _find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _find_cycle({"a": {"b"}, "b": set()}) is None


def test_no_import_cycle_inside_hsoftmax():
    graph = import_graph()
    assert "hsoftmax.ops" in graph["hsoftmax.nn.hierarchical"]  # the reader sees imports
    cycle = _find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


# Lower layers never import higher ones: kernels <- ops <- tree/trees/heads <- models <- training
# <- cli (data sits beside models: it knows no model, training or CLI).
LAYERS = {
    "hsoftmax.ops": 1,
    "hsoftmax.tree": 1,
    "hsoftmax._tables": 1,
    "hsoftmax.reference": 1,
    "hsoftmax.trees": 2,
    "hsoftmax.nn": 2,
    "hsoftmax.optim": 2,
    "hsoftmax.metrics": 2,
    "hsoftmax.data": 3,
    "hsoftmax.models": 3,
    "hsoftmax.training": 4,
    "hsoftmax.cli": 5,
}


def _layer(module: str) -> int | None:
    for prefix, layer in LAYERS.items():
        if module == prefix or module.startswith(prefix + "."):
            return layer
    return None


def test_dependencies_point_one_way():
    bad = [
        f"{src} (layer {_layer(src)}) imports {dst} (layer {_layer(dst)})"
        for src, targets in import_graph().items()
        for dst in targets
        if _layer(src) is not None and _layer(dst) is not None and _layer(dst) > _layer(src)
    ]
    assert not bad, "\n".join(bad)


def _same_hsoftmax(cwd) -> dict:
    """subprocess arguments under which a child imports the hsoftmax this test imported (the
    installed package or the source tree), whatever the working directory holds."""
    env = {**os.environ, "PYTHONPATH": str(PACKAGE.parent)}
    return {"cwd": cwd, "env": env, "capture_output": True, "text": True}


def test_the_head_imports_without_the_training_dependencies(tmp_path):
    # a head-only install has torch and numpy: block the [train] extra's packages
    code = """
import importlib.abc, importlib.machinery, sys
BLOCKED = {"pandas", "matplotlib", "sklearn", "scipy", "tqdm", "omegaconf", "yaml"}
class Block(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    # found (so probes such as torch's find_spec still work) but never importable
    def find_spec(self, name, path, target=None):
        if name.split(".")[0] in BLOCKED:
            return importlib.machinery.ModuleSpec(name, self)
    def create_module(self, spec):
        raise ImportError(f"{spec.name} is not installed (blocked by the test)")
    def exec_module(self, module):
        pass
sys.meta_path.insert(0, Block())
import torch, hsoftmax
from hsoftmax import HierarchicalSoftmax, Tree
head = HierarchicalSoftmax(8, Tree.balanced(10, 3))
loss = head(torch.randn(4, 8), torch.tensor([0, 3, 6, 9]))
loss.backward()
print(head.topk(torch.randn(2, 8), 3)[1].shape)
"""
    out = subprocess.run([sys.executable, "-c", code], timeout=120, **_same_hsoftmax(tmp_path))
    assert out.returncode == 0, out.stderr
    assert "torch.Size([2, 3])" in out.stdout


@pytest.mark.parametrize("argv", [["--help"], ["train", "--help"], ["tree", "build", "--help"]])
def test_python_dash_m_hsoftmax(argv, tmp_path):
    out = subprocess.run(
        [sys.executable, "-m", "hsoftmax", *argv], timeout=120, **_same_hsoftmax(tmp_path)
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("usage: hsoftmax")
