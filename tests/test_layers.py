"""The package's layers import one way, down: core < kernels < data < model < search < evaluation
< training < the commands (cli, pipeline). The kernels import only torch, the standard library
and themselves; the reference model modules import no kernel."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "seq2seq"
# each layer may import itself and the layers before it
LAYERS = ["core", "kernels", "data", "model", "search", "evaluation", "training"]
COMMANDS = {"cli", "pipeline"}
# the model modules a newcomer reads as the textbook model: no kernel in them
REFERENCE = ["encoder", "attention", "decoder", "network", "losses"]


def _modules() -> list[Path]:
    return sorted(p for p in PACKAGE.rglob("*.py"))


def _imports(path: Path) -> list[str]:
    """Every module name an ``import`` or ``from ... import`` in ``path`` names (at any depth)."""
    names = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.append(node.module)
            names += [f"{node.module}.{a.name}" for a in node.names if node.module == "seq2seq"]
    return names


def _layer(path: Path) -> str:
    rel = path.relative_to(PACKAGE)
    return rel.parts[0] if len(rel.parts) > 1 else rel.stem


def test_every_module_sits_in_a_layer():
    for path in _modules():
        layer = _layer(path)
        assert layer in LAYERS or layer in COMMANDS or layer == "__init__", f"{path}: in no layer"


@pytest.mark.parametrize("path", _modules(), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_imports_run_down_the_layers(path):
    layer = _layer(path)
    if layer in COMMANDS or layer == "__init__":
        return
    allowed = set(LAYERS[: LAYERS.index(layer) + 1])
    for name in _imports(path):
        parts = name.split(".")
        if parts[0] != "seq2seq":
            continue
        assert len(parts) > 1 and parts[1] in allowed, f"{path.relative_to(PACKAGE)} imports {name} (layer {layer})"


@pytest.mark.parametrize("path", sorted((PACKAGE / "kernels").glob("*.py")), ids=lambda p: p.name)
def test_kernels_import_only_torch_the_standard_library_and_themselves(path):
    for name in _imports(path):
        top = name.split(".")[0]
        if top == "seq2seq":
            assert name.startswith("seq2seq.kernels"), f"kernels/{path.name} imports {name}"
        else:
            assert top == "torch" or top in sys.stdlib_module_names, f"kernels/{path.name} imports {name}"


@pytest.mark.parametrize("name", REFERENCE)
def test_the_reference_model_modules_use_no_kernel(name):
    imported = _imports(PACKAGE / "model" / f"{name}.py")
    assert not [n for n in imported if n.startswith("seq2seq.kernels")], f"model/{name}.py imports a kernel"
