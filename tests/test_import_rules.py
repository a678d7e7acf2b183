"""The package layout's import rules, read from the source with `ast` (so lazy imports inside
functions count too): `export -> mtlora, calibration, engines`; `calibration -> engines`; `engines`
and `mtlora` import nothing of ours but the shared base `mtlora_base`, which imports nothing of ours;
torch only where the PyTorch side lives; inside export, its layers point down."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
OURS = ("mtlora", "export", "calibration", "engines", "mtlora_base")
BASE = "mtlora_base"  # atomic files, the CLIs' click group: below every other package
ALLOWED = {"mtlora": {"mtlora", BASE}, "engines": {"engines", BASE}, "calibration": {"calibration", "engines", BASE},
           "export": set(OURS), BASE: {BASE}}
# The only modules of export/, engines/ and calibration/ that may import torch (all of mtlora may).
TORCH_MODULES = ("export/onnx/", "export/pipeline/original_model.py", "export/pipeline/sources.py",
                 "export/bench/plain_backbone.py", "export/bench/model.py", "export/bench/page.py",
                 "export/bench/worker.py")
TORCH_PACKAGES = ("torch", "torchvision", "timm", "safetensors")


def imports(path: Path) -> list[tuple[str, int]]:
    tree = ast.parse(path.read_text(), str(path))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(alias.name, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.append((node.module, node.lineno))
    return found


def sources(package: str) -> list[Path]:
    return sorted((ROOT / package).rglob("*.py"))


@pytest.mark.parametrize("package", OURS)
def test_imports_point_one_way(package):
    wrong = []
    for path in sources(package):
        for name, line in imports(path):
            top = name.split(".")[0]
            if top in OURS and top not in ALLOWED[package]:
                wrong.append(f"{path.relative_to(ROOT)}:{line} imports {name}")
    assert not wrong, "\n".join(wrong)


@pytest.mark.parametrize("package", ("engines", "calibration", "export", BASE))
def test_torch_only_on_the_pytorch_side(package):
    wrong = []
    for path in sources(package):
        rel = path.relative_to(ROOT).as_posix()
        if rel.startswith(TORCH_MODULES):
            continue
        for name, line in imports(path):
            if name.split(".")[0] in TORCH_PACKAGES:
                wrong.append(f"{rel}:{line} imports {name}")
    assert not wrong, "\n".join(wrong)


def test_only_the_command_line_imports_the_command_line():
    """`mtlora.cli` is the top of mtlora: library code and export's commands (which share the click group
    through `mtlora_base.cli`) never reach into it."""
    wrong = []
    for package in OURS:
        for path in sources(package):
            rel = path.relative_to(ROOT).as_posix()
            if rel.startswith("mtlora/cli/"):
                continue
            wrong += [f"{rel}:{line} imports {name}" for name, line in imports(path)
                      if name == "mtlora.cli" or name.startswith("mtlora.cli.")]
    assert not wrong, "\n".join(wrong)


# The layers inside export/, top to bottom: a sub-package imports only its own layer's modules and the
# layers below it (`cli > bench > pipeline > checking, onnx > artifacts > errors`). The package's top-level
# modules (`__init__`, `demo`) stand with the CLI.
EXPORT_LAYERS = (("cli", "__init__", "__main__", "demo"), ("bench",), ("pipeline", "video"), ("checking", "onnx"),
                 ("artifacts",), ("errors",))


def export_layer(name: str) -> tuple[int, str]:
    """(layer number from the top, part) of an export/ part: `cli`, `demo`, `errors`, ..."""
    for rank, parts in enumerate(EXPORT_LAYERS):
        if name in parts:
            return rank, name
    raise AssertionError(f"export/{name} is in no layer of EXPORT_LAYERS; add it there")


def test_export_layers_point_down():
    wrong = []
    for path in sources("export"):
        rel = path.relative_to(ROOT / "export")
        rank, part = export_layer(rel.parts[0] if len(rel.parts) > 1 else rel.stem)
        for name, line in imports(path):
            words = name.split(".")
            if words[0] != "export" or len(words) < 2:
                continue
            their_rank, theirs = export_layer(words[1])
            if their_rank < rank or (their_rank == rank and theirs != part):
                wrong.append(f"export/{rel.as_posix()}:{line} ({part}) imports {name} ({theirs})")
    assert not wrong, "\n".join(wrong)


def test_the_rules_catch_a_wrong_import(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("def f():\n    from export.errors import ExportError\n    import torch.nn\n")
    assert imports(bad) == [("export.errors", 2), ("torch.nn", 3)]
    assert export_layer("onnx") == export_layer("checking")[:1] + ("onnx",)
    assert export_layer("artifacts")[0] > export_layer("checking")[0] > export_layer("bench")[0]
