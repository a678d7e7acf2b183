"""The TensorRT API contract: every TensorRT name the backend touches exists in every supported release.

The names of each release were read from its real bindings wheel (tensorrt-cu12-bindings, x86_64)
by tools/tensorrt_api_names.py and stored in tests/data/tensorrt_api/; the backend's uses are read
from its source (engines.tensorrt.api_contract). Nothing here needs TensorRT or a GPU.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from engines.errors import EngineError
from engines.tensorrt.api_contract import backend_sources, collect_uses, used_classes
from engines.tensorrt.build import TYPINGS, plan_precision
from engines.tensorrt.runner import polygraphy_problem, trt_features

DATA = Path(__file__).parent / "data" / "tensorrt_api"
RELEASES = {
    api["tensorrt_version"]: api
    for api in (json.loads(path.read_text()) for path in sorted(DATA.glob("tensorrt-*.json")))
}


def major_minor(version: str) -> str:
    return ".".join(version.split(".")[:2])


def has(api: dict, name: str) -> bool:
    owner, _, member = name.partition(".")
    if not member:
        return owner in api["module"]
    return member in api["classes"].get(owner, ())


def missing(uses, api: dict) -> list[str]:
    return [f"{use.name} ({use.where})" for use in uses if not use.guarded and not use.dynamic and not has(api, use.name)]


def as_module(api: dict) -> SimpleNamespace:
    """The tensorrt module as its stored names describe it: enough for the backend's hasattr-based
    feature detection, which is what decides the code paths (nothing is called on it)."""
    module = SimpleNamespace(__version__=api["tensorrt_version"])
    for name in api["module"]:
        members = api["classes"].get(name, ())
        setattr(module, name, SimpleNamespace(**{m: m for m in members if m.isidentifier()}))
    return module


def test_the_supported_releases_are_stored():
    lines = {major_minor(v) for v in RELEASES}
    assert {"10.3", "10.13", "11.0"} <= lines, sorted(RELEASES)
    assert any(v.startswith("11.") and major_minor(v) != "11.0" for v in RELEASES)  # a later 11.x too
    for version, api in RELEASES.items():
        assert api["wheel"].startswith("tensorrt_cu12_bindings-" + version) and len(api["wheel_sha256"]) == 64


def test_extracted_names_agree_with_what_is_known_about_each_release():
    # Facts from NVIDIA's release notes and headers, to show the extraction reads the right classes.
    for version, api in RELEASES.items():
        assert has(api, "Builder.build_serialized_network") and has(api, "NetworkDefinitionCreationFlag.STRONGLY_TYPED")
        assert has(api, "BuilderFlag.TF32") and has(api, "IExecutionContext.execute_async_v3")
        is_11 = version.startswith("11.")
        # TensorRT 11 removed weak typing (the FP16/INT8 builder flags) and implicit batch.
        assert has(api, "BuilderFlag.FP16") is not is_11, version
        assert has(api, "BuilderFlag.INT8") is not is_11, version
        assert has(api, "NetworkDefinitionCreationFlag.EXPLICIT_BATCH") is not is_11, version
        assert not has(api, "BuilderFlag.NOT_A_FLAG")


def test_the_backend_uses_names_the_collector_sees():
    uses = collect_uses()
    names = {u.name for u in uses}
    # A few the backend certainly calls; if these vanish the collector (not TensorRT) broke.
    assert {"Builder.build_serialized_network", "IExecutionContext.set_input_shape", "BuilderFlag.TF32",
            "ICudaEngine.get_tensor_profile_shape", "IExecutionContext.engine", "nptype"} <= names
    assert any(u.dynamic and u.name == "BuilderFlag" for u in uses)
    assert {u.name for u in uses if u.guarded} >= {"BuilderFlag.FP16", "BuilderFlag.INT8", "init_libnvinfer_plugins"}


@pytest.mark.parametrize("version", sorted(RELEASES))
def test_every_unguarded_name_exists(version):
    assert missing(collect_uses(), RELEASES[version]) == []


def test_every_guarded_name_exists_in_some_release():
    # A feature-detected name no release has is a typo: the path it guards would never run.
    for use in collect_uses():
        if use.guarded:
            assert any(has(api, use.name) for api in RELEASES.values()), use


@pytest.mark.parametrize("version", sorted(RELEASES))
def test_feature_detected_paths_use_only_what_the_release_has(version):
    api = RELEASES[version]
    features = trt_features(as_module(api))
    assert features["strongly_typed"] and features["tf32_flag"]
    built = 0
    for precision in ("fp32", "fp16", "int8"):
        for typing in TYPINGS:
            try:
                plan = plan_precision(precision, features, typing)
            except EngineError:
                assert version.startswith("11.") and typing == "weak" and precision != "fp32"
                continue
            built += 1
            # getattr(trt.BuilderFlag, flag) for every flag the plan names; TF32 cleared in every plan.
            assert all(has(api, f"BuilderFlag.{flag}") for flag in plan["flags"]), (precision, typing, plan)
            assert plan["clear_tf32"] and has(api, "BuilderFlag.TF32")
            if plan["strongly_typed"]:
                assert has(api, "NetworkDefinitionCreationFlag.STRONGLY_TYPED")
    assert built >= 6
    # Polygraphy 0.49.0 sets EXPLICIT_BATCH unconditionally: refused exactly where the flag is gone.
    assert bool(polygraphy_problem("0.49.0", features)) is version.startswith("11.")
    assert polygraphy_problem("0.53.6", features) == ""


def test_a_removed_name_fails_the_contract():
    sources = backend_sources()
    sources["build.py"] += "\n\ndef _old(trt):\n    return trt.NetworkDefinitionCreationFlag.EXPLICIT_BATCH\n"
    sources["runner.py"] += "\n\ndef _older(engine):\n    return engine.get_binding_index('x')\n"
    uses = collect_uses(sources)
    for version, api in RELEASES.items():
        gone = missing(uses, api)
        assert any("ICudaEngine.get_binding_index" in g for g in gone), version  # removed in TensorRT 10
        assert any("EXPLICIT_BATCH" in g for g in gone) is version.startswith("11."), version


def test_a_guard_makes_a_name_optional():
    guarded = "\n\ndef _maybe(trt):\n    if hasattr(trt.BuilderFlag, 'FP16'):\n        return trt.BuilderFlag.FP16\n"
    unguarded = "\n\ndef _surely(trt):\n    return trt.BuilderFlag.FP16\n"
    for extra, fails_on_11 in ((guarded, False), (unguarded, True)):
        sources = backend_sources()
        sources["runner.py"] += extra
        gone = missing(collect_uses(sources), RELEASES[max(RELEASES, key=lambda v: tuple(map(int, v.split("."))))])
        assert any("BuilderFlag.FP16" in g for g in gone) is fails_on_11


def test_the_stored_classes_cover_what_the_backend_uses():
    # When the backend starts using a new class, regenerate the data (tools/tensorrt_api_names.py).
    for version, api in RELEASES.items():
        for name in used_classes():
            assert name in api["classes"], (version, name)


def test_the_extraction_tool_reads_pybind11_symbols():
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
    try:
        import tensorrt_api_names as tool
    finally:
        sys.path.pop(0)
    # Symbol names as they appear in the 11.4 module's symbol table.
    assert tool.pybind_owner(
        "_ZN8pybind116class_IN8nvinfer18IBuilderEJEE3defIMS2_DoFPNS1_11ICudaEngineERNS1_18INetworkDefinitionERNS1_"
        "14IBuilderConfigEEJNS_3argESD_PKcNS_10call_guardIJNS_18gil_scoped_releaseEEEEEEERS3_SF_OT_DpRKT0_.constprop.0.isra.0"
    ) == ("class_", "nvinfer1::IBuilder", "def")
    assert tool.pybind_owner(
        "_ZN8pybind116class_IN12nvonnxparser12IParserErrorEJSt10unique_ptrIS2_NS_8nodeleteEEEE13init_instanceIS5_Li0EEEvPNS_6detail8instanceEPKv"
    ) == ("class_", "nvonnxparser::IParserError", "init_instance")
    assert tool.pybind_owner("_ZN8pybind115enum_IN8nvinfer111BuilderFlagEE5valueEPKcS2_S5_") == ("enum_", "nvinfer1::BuilderFlag", "value")
    assert tool.pybind_owner("_ZN8nvinfer111ICudaEngine22createExecutionContextENS_34ExecutionContextAllocationStrategyE") is None
    classes: dict[str, set[str]] = {"Severity": {"WARNING", "ERROR"}}
    names, version = tool.init_names(
        "__version__ = '9.9'\nLogger.Severity = ILogger.Severity\n"
        "for a, v in ILogger.Severity.__members__.items():\n    setattr(Logger, a, v)\ndef nptype(t):\n    pass\n",
        classes,
    )
    assert version == "9.9" and {"nptype", "__version__"} <= names
    assert classes["Logger"] == {"Severity", "WARNING", "ERROR"}
