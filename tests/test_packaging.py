"""What the wheel declares: its dependencies are exactly what the package imports, and it ships a
license and type information. (.ci/wheel_smoke.sh installs the built wheel alone and trains with it.)"""

from __future__ import annotations

import ast
import importlib.metadata
import re
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "seqblocks"
tomllib = pytest.importorskip("tomllib")  # Python >= 3.11


def _pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def _requirement(text: str) -> tuple[str, set[str]]:
    """``"safetensors[torch]>=0.4"`` -> ``("safetensors", {"torch"})``, names normalised."""
    match = re.match(r"\s*([A-Za-z0-9_.-]+)\s*(?:\[([^\]]*)\])?", text)
    assert match, text
    extras = {e.strip() for e in (match.group(2) or "").split(",") if e.strip()}
    return re.sub(r"[-_.]+", "-", match.group(1)).lower(), extras


_DISTRIBUTIONS = {"yaml": "pyyaml"}


def _third_party_imports() -> dict[str, list[str]]:
    """{distribution: [files importing it]} over every module of the package."""
    found: dict[str, list[str]] = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            for name in names:
                top = name.split(".")[0]
                if top in sys.stdlib_module_names or top in ("seqblocks", "__future__"):
                    continue
                # Every import name of ours is its distribution's name too, but PyYAML's.
                top = _DISTRIBUTIONS.get(top, top)
                found.setdefault(re.sub(r"[-_.]+", "-", top).lower(), []).append(str(path.relative_to(ROOT)))
    return found


def test_dependencies_are_exactly_what_the_package_imports():
    project = _pyproject()["project"]
    runtime = dict(_requirement(r) for r in project["dependencies"])
    extras = {name: {_requirement(r)[0] for r in reqs} for name, reqs in project["optional-dependencies"].items()}
    imported = _third_party_imports()
    # The optional imports (Triton kernels, matplotlib plots, the HTTP server, ...) live behind the user
    # extras (every extra but "dev") and are guarded.
    optional = set().union(*(pkgs for name, pkgs in extras.items() if name != "dev"))
    assert {"triton", "matplotlib"} <= optional
    # the test environment (dev) installs every extra but wandb, whose logger is tested with a stand-in module
    assert optional - {"wandb"} <= extras["dev"] | extras["triton"], "dev must install every extra but wandb"
    # tensorboard is imported through torch.utils.tensorboard.
    imported.setdefault("tensorboard", []).append("seqblocks/train/logging.py")
    assert not optional & set(runtime), "an optional package is declared as a runtime dependency"
    assert set(imported) == set(runtime) | optional, (
        f"imported {sorted(imported)} vs declared {sorted(runtime)} + extras {sorted(optional)}")
    # Test tools are development extras, never runtime dependencies.
    assert not {"pytest", "hypothesis", "ruff"} & set(runtime)


def test_checkpoint_writer_pulls_numpy():
    """safetensors.torch needs numpy to write a checkpoint, and safetensors declares it only in its
    "torch" extra: the wheel must ask for that extra, or the first checkpoint of a run fails."""
    runtime = dict(_requirement(r) for r in _pyproject()["project"]["dependencies"])
    assert "torch" in runtime["safetensors"]

    def extra(name: str) -> list[str]:
        return [r.split(";")[0].strip() for r in importlib.metadata.requires("safetensors") or []
                if re.search(rf"extra\s*==\s*['\"]{name}['\"]", r)]

    torch_extra = extra("torch")
    pulled = torch_extra + (extra("numpy") if any(r.startswith("safetensors[numpy]") for r in torch_extra) else [])
    assert any(r.startswith("numpy") for r in pulled), f"safetensors[torch] requires {torch_extra}"


def test_license_and_type_marker_ship_with_the_package():
    project = _pyproject()
    assert project["project"]["license"] == "Apache-2.0"
    assert project["project"]["license-files"] == ["LICENSE"]
    text = (ROOT / "LICENSE").read_text()
    assert "Apache License" in text and "Version 2.0, January 2004" in text and "END OF TERMS AND CONDITIONS" in text
    assert (PACKAGE / "py.typed").is_file()
    assert "py.typed" in project["tool"]["setuptools"]["package-data"]["seqblocks"]
