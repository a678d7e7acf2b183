"""`--keep-fp32` globs checked against the graphs they name: one that matches no node is a typo, and a typo
here would silently quantize the layer the user meant to protect.

A glob matches a node's name or op type (`calibration.fp16.match_nodes`); OpenVINO engines match it
against OpenVINO's own names and op types too (`calibration.nncf_quant.ignored_scope_for`), so those
count when an OpenVINO engine is built.
"""

from __future__ import annotations

import difflib
import fnmatch
from collections.abc import Iterable, Mapping
from pathlib import Path

from export.errors import ExportOptionError

# How many near names an error offers.
CLOSEST = 3


def _onnx_names(path: Path) -> set[str]:
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph
    return {n.name for n in graph.node if n.name} | {n.op_type for n in graph.node}


def _openvino_names(path: Path) -> set[str]:
    import openvino as ov

    model = ov.Core().read_model(str(path))
    return {op.get_friendly_name() for op in model.get_ops()} | {op.get_type_name() for op in model.get_ops()}


def _matches(glob: str, names: Iterable[str]) -> bool:
    return any(fnmatch.fnmatchcase(name, glob) for name in names)


def _closest(glob: str, names: Iterable[str]) -> list[str]:
    """The node names nearest to a glob's literal text (its wildcards left out)."""
    literal = glob.translate(str.maketrans("", "", "*?[]"))
    return difflib.get_close_matches(literal, sorted(names), n=CLOSEST, cutoff=0.0)


def check_keep_fp32_matches(globs: Iterable[str], role_globs: Mapping[str, Iterable[str]],
                            graph_files: Mapping[str, Path], openvino: bool = False) -> None:
    """Refuse a glob that matches no node: `globs` apply to every graph, `role_globs[role]` to that graph
    only. `graph_files` maps a role ("model", "backbone", "head_<task>") to its ONNX file."""
    wanted = [(glob, tuple(graph_files)) for glob in globs]
    wanted += [(glob, (role,)) for role, listed in role_globs.items() for glob in listed if role in graph_files]
    if not wanted:
        return
    names = {role: _onnx_names(path) for role, path in graph_files.items()}
    for glob, roles in wanted:
        pool = set().union(*(names[r] for r in roles))
        if _matches(glob, pool):
            continue
        if openvino:
            for role in roles:
                names[role] |= _openvino_names(graph_files[role])
            pool = set().union(*(names[r] for r in roles))
            if _matches(glob, pool):
                continue
        where = ", ".join(Path(graph_files[r]).name for r in roles)
        near = ", ".join(repr(n) for n in _closest(glob, pool))
        raise ExportOptionError(f"--keep-fp32 {glob!r} matches no node name or op type in {where}; the closest "
                                f"node names: {near}")
