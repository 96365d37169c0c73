"""The package's layering, read from the source: imports point downwards only, there is no import
circle, and no module imports another module's private names."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "seqblocks"

# Lower numbers sit lower; a module may import its own layer or any lower one.
LAYERS = {"_version": 0, "registry": 0, "config": 0, "cache": 0, "ops": 1, "parallel": 1, "layers": 2, "blocks": 3,
          "checkpoint": 3, "model_card": 3, "params": 3, "models": 4, "tasks": 4, "tokenizers": 4, "data": 4,
          "generation": 5, "beam_search": 5, "presets": 5, "interop": 5, "compat": 5, "train": 6, "serving": 6,
          "post": 6, "testing": 6, "cli": 7, "__main__": 8, "__init__": 8}


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _layer(module: str) -> int:
    parts = module.split(".")
    if len(parts) == 1:
        return LAYERS["__init__"]
    return LAYERS[parts[1]]


def _imports(path: Path) -> list[tuple[str, list[str]]]:
    """(imported seqblocks module, names imported from it) for every import in the file, lazy ones too."""
    tree = ast.parse(path.read_text())
    me = _module_name(path)
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                pkg = me.split(".") if path.name == "__init__.py" else me.split(".")[:-1]
                base = ".".join(pkg[: len(pkg) - node.level + 1] + ([base] if base else []))
            if base.split(".")[0] == "seqblocks":
                out.append((base, [a.name for a in node.names]))
        elif isinstance(node, ast.Import):
            out.extend((a.name, []) for a in node.names if a.name.split(".")[0] == "seqblocks")
    return out


FILES = sorted(ROOT.rglob("*.py"))


@pytest.mark.parametrize("path", FILES, ids=lambda p: str(p.relative_to(ROOT)))
def test_imports_point_downwards(path):
    me = _module_name(path)
    if path.name == "__init__.py" and me.count(".") >= 1:
        mine = LAYERS[me.split(".")[1]]
    else:
        mine = _layer(me)
    for target, _ in _imports(path):
        if target == "seqblocks":
            assert mine >= LAYERS["cli"], f"{me} imports the package face 'seqblocks'"
            continue
        assert _layer(target) <= mine, f"{me} (layer {mine}) imports {target} (layer {_layer(target)})"


@pytest.mark.parametrize("path", FILES, ids=lambda p: str(p.relative_to(ROOT)))
def test_no_private_names_across_modules(path):
    me = _module_name(path)
    for target, names in _imports(path):
        private = [n for n in names if n.startswith("_") and not n.startswith("__")]
        if private and target != me and not target.startswith(me + "."):
            package = target.rsplit(".", 1)[0]
            # A package's own private submodules (ops/x/_common.py) serve that package.
            own = me.startswith(package + ".") or me == package
            assert own and target.rsplit(".", 1)[-1].startswith("_"), f"{me} imports private {private} from {target}"


def test_no_import_circle():
    graph: dict[str, set[str]] = {}
    for path in FILES:
        me = _module_name(path)
        graph.setdefault(me, set()).update(t for t, _ in _imports(path) if t != me)

    def visit(node, stack, done):
        if node in stack:
            cycle = stack[stack.index(node):] + [node]
            raise AssertionError(f"import circle: {' -> '.join(cycle)}")
        if node in done or node not in graph:
            return
        stack.append(node)
        for nxt in sorted(graph[node]):
            if nxt == "seqblocks" or node == "seqblocks" or nxt.startswith(node + "."):
                continue  # the package face and a package importing its own submodules
            if node.startswith(nxt + ".") and graph.get(nxt):
                continue  # a submodule importing its package's face (ops.x -> ops)
            visit(nxt, stack, done)
        stack.pop()
        done.add(node)

    done: set[str] = set()
    for node in sorted(graph):
        visit(node, [], done)
