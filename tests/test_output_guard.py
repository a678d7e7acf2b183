"""An output path never costs the user files the tool did not write: `build --out`, `bundle --out`,
`onnx --out` and `merge --out` refuse an existing directory that is not their own kind (a source
tree, a folder of notes, the build being bundled) in one line before any work, and leave it as it
was. The bundle also refuses to carry a damaged graph, names the build's file (not its staging
copy), and leaves a damaged calibration cache entry behind."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from export.cli import main as export_cli
from tests.conftest import FIXTURE, invoke


def _snapshot(root: Path) -> dict[str, bytes | None]:
    return {p.relative_to(root).as_posix(): (p.read_bytes() if p.is_file() else None)
            for p in sorted(root.rglob("*"))}


def _refused_one_line(code: int, output: str, *words: str) -> str:
    lines = output.strip().splitlines()
    assert code == 1 and len(lines) == 1 and "Traceback" not in output, output
    for word in words:
        assert word in lines[0], lines[0]
    return lines[0]


def _no_partials(parent: Path) -> None:
    assert not [p.name for p in parent.iterdir() if p.name.endswith((".partial", ".tmp"))], list(parent.iterdir())


# Every kind of top-level entry a build writes, as a directory, a file, or a link, in a folder that is not a build.
@pytest.mark.parametrize("entry", ["export", "engines", "graphs", "calibration-cache", "candidates", "fallback",
                                   "report.json", "summary.md", "junit.xml", "report.html", "evalset.npz",
                                   "engines.link"])
def test_build_refuses_a_folder_whose_files_it_would_replace(entry, tmp_path):
    folder = tmp_path / "project"
    folder.mkdir()
    (folder / "Makefile").write_text("all:\n")
    if entry.endswith(".link"):  # a link to a folder of the user's: the build would write into it
        (tmp_path / "elsewhere").mkdir()
        (folder / entry.removesuffix(".link")).symlink_to(tmp_path / "elsewhere")
    elif "." in entry:
        (folder / entry).write_text("mine\n")
    else:
        (folder / entry).mkdir()
        (folder / entry / "__init__.py").write_text("# mine\n")
    before = _snapshot(folder)
    code, output = invoke(export_cli, "build", FIXTURE, "--backend", "onnxruntime", "--precision", "fp32",
                          "--out", folder)
    line = _refused_one_line(code, output, str(folder), "not a build directory", "new or empty directory")
    assert entry.removesuffix(".link") in line
    assert _snapshot(folder) == before  # not even a lock file


def test_build_into_an_earlier_build_still_reuses_it(ort_build, copy_build):
    build = copy_build(ort_build)
    (build / "notes.txt").write_text("mine\n")  # a user's file beside a build is kept, not a reason to refuse
    code, output = invoke(export_cli, "build", FIXTURE, "--backend", "onnxruntime", "--precision", "fp32",
                          "--eval-samples", "4", "--out", build)
    assert code == 0 and "[onnxruntime-fp32] reusing" in output, output
    assert (build / "notes.txt").read_text() == "mine\n"


@pytest.mark.parametrize("command", ["onnx", "merge"])
def test_onnx_and_merge_refuse_a_folder_of_someone_elses_files(command, tmp_path):
    folder = tmp_path / "out"
    folder.mkdir()
    (folder / "thesis.tex").write_text("mine\n")
    code, output = invoke(export_cli, command, FIXTURE, "--out", folder)
    _refused_one_line(code, output, str(folder), "not a", "new or empty directory")
    assert _snapshot(folder) == {"thesis.tex": b"mine\n"}
    _no_partials(tmp_path)


def test_merge_replaces_an_empty_folder_and_its_own_checkpoint(tmp_path):
    folder = tmp_path / "merged"
    folder.mkdir()
    for _ in range(2):  # empty, then a checkpoint of its own kind
        code, output = invoke(export_cli, "merge", FIXTURE, "--out", folder)
        assert code == 0, output
        assert (folder / "config.json").is_file()


def _build_without_its_qdq_graphs(build: Path) -> None:
    for graph in build.glob("graphs/*/qdq*"):
        shutil.rmtree(graph)


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 3])


@pytest.mark.parametrize("out_case", ["someone-elses", "the-build", "the-builds-parent", "empty-name", "dot",
                                      "archive-is-a-directory"])
def test_bundle_refuses_an_output_it_would_destroy_before_any_work(out_case, ort_build, tmp_path):
    parent = tmp_path / "parent"
    build = parent / "build"
    shutil.copytree(ort_build, build)
    (parent / "notes.txt").write_text("mine\n")
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("mine\n")
    out, words = {
        "someone-elses": (mine, ["is a directory that is not a bundle", "notes.txt"]),
        "the-build": (build, ["is the build directory or holds it"]),
        "the-builds-parent": (parent, ["is the build directory or holds it"]),
        "empty-name": ("", ["name the bundle directory"]),
        "dot": (".", ["name the bundle directory"]),
        "archive-is-a-directory": (tmp_path / "bundle", ["bundle.tar.gz: exists and is not a file"]),
    }[out_case]
    if out_case == "archive-is-a-directory":
        (tmp_path / "bundle.tar.gz").mkdir()
    before = _snapshot(tmp_path)
    code, output = invoke(export_cli, "bundle", build, "--out", out)
    _refused_one_line(code, output, *words)
    assert "[bundle]" not in output  # refused before the wheel or any copy
    assert _snapshot(tmp_path) == before


@pytest.mark.parametrize("damage", ["truncated-qdq", "truncated-fp16", "qdq-gone"])
def test_bundle_refuses_a_build_that_lost_or_damaged_a_graph(damage, ort_build, copy_build, tmp_path):
    build = copy_build(ort_build)
    if damage == "qdq-gone":
        _build_without_its_qdq_graphs(build)
        words = ["onnxruntime-int8", "Q/DQ graph", "re-run 'mtlora-export build'"]
    else:
        kind = damage.split("-")[1]
        # This build has no fp16 engine: a damaged fp16 graph is one it would have left (graphs/<engine>/fp16/).
        graph = build / "graphs" / f"onnxruntime-{'int8' if kind == 'qdq' else 'fp16'}" / kind / "model.onnx"
        if not graph.is_file():
            graph.parent.mkdir(parents=True)
            shutil.copy(build / "export" / "model.onnx", graph)
        _truncate(graph)
        words = [str(graph), "cannot be read", "re-run 'mtlora-export build'"]
    out = tmp_path / "bundle"
    code, output = invoke(export_cli, "bundle", build, "--out", out)
    progress = [x for x in output.splitlines() if x.startswith("[bundle]")]
    line = _refused_one_line(code, "\n".join(x for x in output.splitlines() if x not in progress), *words)
    assert ".partial" not in line
    assert not out.exists() and not out.with_name("bundle.tar.gz").exists()
    _no_partials(tmp_path)


def test_bundle_leaves_a_damaged_calibration_cache_entry_behind(ort_build, copy_build, tmp_path):
    build = copy_build(ort_build)
    entries = sorted(p for p in (build / "calibration-cache").iterdir() if p.is_dir())
    assert entries, "the build has no calibration cache to damage"
    damaged = entries[0]
    _truncate(next(p for p in damaged.iterdir() if p.name != "manifest.json"))
    out = tmp_path / "bundle"
    code, output = invoke(export_cli, "bundle", build, "--out", out)
    assert code == 0, output
    assert f"leaving out the damaged calibration cache entry {damaged}" in output
    carried = {p.name for p in (out / "calibration-cache").iterdir()} if (out / "calibration-cache").is_dir() else set()
    assert carried == {p.name for p in entries[1:]}
    files = json.loads((out / "bundle.json").read_text())["files"]
    assert not [f for f in files if damaged.name in f]


@pytest.mark.parametrize("out", ["", "  "])
def test_build_refuses_an_empty_out(out, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # an empty --out must not mean "here"
    code, output = invoke(export_cli, "build", FIXTURE, "--backend", "onnxruntime", "--precision", "fp32",
                          "--out", out)
    _refused_one_line(code, output, "--out is empty")
    assert list(tmp_path.iterdir()) == []


def test_a_build_that_fails_after_exporting_leaves_no_directory_it_made(tmp_path):
    # A precision naming a task this model lacks (it has no depth) is found once the export knows the tasks.
    out = tmp_path / "new" / "build"
    code, output = invoke(export_cli, "build", FIXTURE, "--backend", "onnxruntime", "--layout", "split",
                          "--precision", "backbone=fp32,heads=fp32,depth=fp32", "--out", out)
    assert code != 0 and "[export]" in output and "has no task depth" in output.strip().splitlines()[-1], output
    assert not out.exists()
    _no_partials(tmp_path / "new")


@pytest.mark.parametrize("beside", ["thesis.txt", "metrics.jsonl", "last"])
def test_import_upstream_replaces_only_a_checkpoint(beside, tmp_path):
    from mtlora.cli import main as mtlora_cli

    folder = tmp_path / "ck"
    folder.mkdir()
    (folder / "config.json").write_text("{}\n")  # a run directory has its model's config at the top too
    (folder / beside).mkdir() if beside == "last" else (folder / beside).write_text("mine\n")
    before = _snapshot(folder)
    code, output = invoke(mtlora_cli, "import-upstream", FIXTURE, "--out", folder)
    _refused_one_line(code, output, "is a directory that is not a checkpoint", beside)
    assert _snapshot(folder) == before
