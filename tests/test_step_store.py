"""The step store ($MTLORA_EXPORT_STEP_CACHE): a finished step is kept by key and copied into another build
directory that needs the same step; a damaged entry is a miss; a store that cannot be used changes nothing.

Steps here are hand-made directories (the store copies files, whatever a step holds); the real builds that
share the test run's store are in test_build_pipeline.py."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest

from export.artifacts.builddir import STEP_FILE, BuildDir
from export.pipeline.steps import (
    STORE_ENV,
    StepStore,
    mark_step,
    publish,
    staging_for,
    step_key,
    step_matches,
)


@pytest.fixture
def store(tmp_path, monkeypatch) -> Path:
    root = tmp_path / "store"
    monkeypatch.setenv(STORE_ENV, str(root))
    return root


def engine_step(build: Path, name: str, key: str, content: bytes = b"engine") -> Path:
    """An engine step as build.engine_step leaves it: prepared graphs, then the set staged and published."""
    graphs = BuildDir(build).graphs(name) / "qdq"
    graphs.mkdir(parents=True)
    (graphs / "model.onnx").write_bytes(b"prepared " + content)
    target = BuildDir(build).engine(name)
    staging = staging_for(target)
    (staging / "model.onnx").write_bytes(content)
    mark_step(staging, key)
    publish(staging, target)
    return target


def test_a_published_step_is_restored_in_another_build_with_its_graphs(store, tmp_path):
    key = step_key("engine", "a")
    engine_step(tmp_path / "one", "onnxruntime-int8", key)
    other = BuildDir(tmp_path / "two")
    target = other.engine("onnxruntime-int8")
    assert step_matches(target, key)
    assert (target / "model.onnx").read_bytes() == b"engine"
    assert (other.graphs("onnxruntime-int8") / "qdq" / "model.onnx").read_bytes() == b"prepared engine"
    assert not step_matches(other.engine("onnxruntime-fp32"), step_key("engine", "b"))  # another key: a miss
    assert not list(other.engines.glob(".*")) and not list(store.glob(".*")), "staging left behind"


def test_an_export_is_stored_when_marked_and_a_staged_step_only_when_published(store, tmp_path):
    export = BuildDir(tmp_path / "one").export
    export.mkdir(parents=True)
    (export / "model.onnx").write_bytes(b"graph")
    mark_step(export, step_key("export", 1))
    assert (store / step_key("export", 1) / StepStore.STEP / "model.onnx").read_bytes() == b"graph"

    staging = staging_for(BuildDir(tmp_path / "one").engine("openvino-fp32"))
    mark_step(staging, step_key("engine", 2))
    assert not (store / step_key("engine", 2)).exists()


def test_a_damaged_entry_is_a_miss_and_the_next_build_of_the_step_replaces_it(store, tmp_path):
    key = step_key("engine", "damaged")
    engine_step(tmp_path / "one", "onnxruntime-fp32", key)
    (store / key / StepStore.STEP / "model.onnx").write_bytes(b"enginf")
    assert not step_matches(BuildDir(tmp_path / "two").engine("onnxruntime-fp32"), key)
    engine_step(tmp_path / "three", "onnxruntime-fp32", key)
    target = BuildDir(tmp_path / "four").engine("onnxruntime-fp32")
    assert step_matches(target, key) and (target / "model.onnx").read_bytes() == b"engine"


def test_concurrent_builds_store_one_whole_entry(store, tmp_path):
    key = step_key("engine", "raced")
    sources = [engine_step(tmp_path / f"b{i}", "onnxruntime-fp32", step_key("engine", "own", i)) for i in range(6)]
    for source in sources:
        (source / STEP_FILE).write_text(json.dumps({"key": key}))
    threads = [threading.Thread(target=StepStore(store).save, args=(source, key)) for source in sources]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert step_matches(BuildDir(tmp_path / "after").engine("onnxruntime-fp32"), key)
    assert not list(store.glob(".*")), "staging left behind"


def test_without_the_variable_or_with_an_unusable_store_a_step_is_only_its_own_directory(tmp_path, monkeypatch):
    key = step_key("engine", "alone")
    monkeypatch.delenv(STORE_ENV, raising=False)
    engine_step(tmp_path / "one", "onnxruntime-fp32", key)
    assert not step_matches(BuildDir(tmp_path / "two").engine("onnxruntime-fp32"), key)

    blocked = tmp_path / "a-file"
    blocked.write_text("not a directory")
    monkeypatch.setenv(STORE_ENV, str(blocked))
    engine_step(tmp_path / "three", "onnxruntime-fp32", key)  # storing fails quietly: the build goes on
    assert not step_matches(BuildDir(tmp_path / "four").engine("onnxruntime-fp32"), key)
