"""Every TensorRT Python name the backend touches, read from its source with `ast`: what the API
contract test checks against the names each supported TensorRT release defines.

The names of a release are read once from its bindings wheel (``tools/tensorrt_api_names.py``) and
stored in ``tests/data/tensorrt_api/``; a TensorRT that renames or removes something the backend
calls then fails that test here, not on a Jetson.

What counts as a use, in ``engines/tensorrt/{build,runner,timing}.py``:

- an attribute chain on the module object, which the backend always calls ``trt``:
  ``trt.Builder`` (a module name), ``trt.BuilderFlag.TF32`` (a member of a class);
- an attribute of a TensorRT object, which the backend names consistently (`OBJECT_NAMES`):
  ``builder.create_network``, ``self._context.set_input_shape``, ``context.engine``;
- ``getattr(trt.BuilderFlag, flag)`` with a computed name: a dynamic use of that class, whose names
  come from `plan_precision` (the test runs it for each release's features).

A use is *guarded* when it is feature-detected: the name inside ``hasattr(X, "name")``, and any use
of that name in the body of an ``if`` (or the right side of an ``and``) whose test is that
``hasattr``. A guarded name need exist only where its code path runs; an unguarded one everywhere.
"""

from __future__ import annotations

import ast
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

BACKEND_FILES = ("build.py", "runner.py", "timing.py")
MODULE = "trt"

# What the backend's names for TensorRT objects hold (a variable, or the last attribute of self.x).
OBJECT_NAMES = {
    "builder": "Builder",
    "network": "INetworkDefinition",
    "network_layer": "ILayer",
    "parser": "OnnxParser",
    "config": "IBuilderConfig",
    "optimization_profile": "IOptimizationProfile",
    "runtime": "Runtime",
    "engine": "ICudaEngine",
    "_engine": "ICudaEngine",
    "context": "IExecutionContext",
    "_context": "IExecutionContext",
    "inspector": "EngineInspector",
    "logger": "ILogger",
}


@dataclass(frozen=True)
class Use:
    """One TensorRT name the backend uses: ``Builder`` (module level) or ``BuilderFlag.TF32`` (a member)."""

    name: str
    file: str
    line: int
    guarded: bool = False
    dynamic: bool = False  # getattr(trt.X, <computed>): `name` is the class

    @property
    def where(self) -> str:
        return f"engines/tensorrt/{self.file}:{self.line}"


def backend_sources(root: Path | None = None) -> dict[str, str]:
    root = root or Path(__file__).parent
    return {name: (root / name).read_text() for name in BACKEND_FILES}


def collect_uses(sources: dict[str, str] | None = None) -> list[Use]:
    """Every TensorRT name the backend's source uses, in file and line order."""
    uses: list[Use] = []
    for file, text in (sources or backend_sources()).items():
        tree = ast.parse(text)
        guards = _guarded_nodes(tree)
        for node in ast.walk(tree):
            uses.extend(_uses_at(node, file, guards))
    return sorted(set(uses), key=lambda u: (u.file, u.line, u.name))


def used_classes(uses: Iterable[Use] | None = None) -> list[str]:
    """The TensorRT classes whose members the backend uses (what the stored API data keeps)."""
    classes = set(OBJECT_NAMES.values())
    for use in uses if uses is not None else collect_uses():
        owner, _, member = use.name.partition(".")
        if member or use.dynamic:
            classes.add(owner)
    return sorted(classes)


# ----------------------------------------------------------------------------- reading the source


def _chain(node: ast.AST) -> list[str] | None:
    """['trt', 'BuilderFlag', 'TF32'] for trt.BuilderFlag.TF32, ['self', '_context', 'x'] for self._context.x."""
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if isinstance(node, ast.Name):
        parts.append(node.id)
        return parts[::-1]
    return None


def _api_name(chain: list[str]) -> str | None:
    """The TensorRT name an attribute chain denotes, or None when it is not one."""
    if chain[0] == MODULE and len(chain) >= 2:
        return ".".join(chain[1:3])
    # The deepest TensorRT object in the chain decides: self._poly_runner.context.engine is
    # IExecutionContext.engine (Polygraphy's runner holds a TensorRT execution context).
    for i in range(len(chain) - 2, -1, -1):
        if chain[i] in OBJECT_NAMES and (i > 0 or chain[i] not in ("self",)):
            return f"{OBJECT_NAMES[chain[i]]}.{chain[i + 1]}"
    return None


def _hasattr_name(call: ast.AST) -> str | None:
    """The TensorRT name a ``hasattr(X, "name")`` call tests, or None."""
    if not (isinstance(call, ast.Call) and isinstance(call.func, ast.Name) and call.func.id == "hasattr"):
        return None
    if len(call.args) != 2 or not isinstance(call.args[1], ast.Constant) or not isinstance(call.args[1].value, str):
        return None
    chain = _chain(call.args[0])
    return _api_name([*chain, call.args[1].value]) if chain else None


def _guarded_nodes(tree: ast.AST) -> dict[int, set[str]]:
    """id(node) -> the TensorRT names feature-detected around it (if-bodies and and-chains of hasattr)."""
    guarded: dict[int, set[str]] = {}

    def mark(nodes: Iterable[ast.AST], names: set[str]) -> None:
        for top in nodes:
            for inner in ast.walk(top):
                guarded.setdefault(id(inner), set()).update(names)

    for node in ast.walk(tree):
        if isinstance(node, (ast.If, ast.IfExp)):
            names = {n for test in ast.walk(node.test) if (n := _hasattr_name(test))}
            if names:
                mark(node.body if isinstance(node, ast.If) else [node.body], names)
        elif isinstance(node, ast.BoolOp) and isinstance(node.op, ast.And):
            names: set[str] = set()
            for value in node.values:
                if names:
                    mark([value], set(names))
                names |= {n for test in ast.walk(value) if (n := _hasattr_name(test))}
    return guarded


def _uses_at(node: ast.AST, file: str, guards: dict[int, set[str]]) -> list[Use]:
    line = getattr(node, "lineno", 0)
    tested = _hasattr_name(node)
    if tested:
        return [Use(tested, file, line, guarded=True)]
    if (
        isinstance(node, ast.Call)
        and isinstance(node.func, ast.Name)
        and node.func.id == "getattr"
        and len(node.args) >= 2
        and not isinstance(node.args[1], ast.Constant)
    ):
        chain = _chain(node.args[0])
        name = _api_name(chain) if chain else None
        return [Use(name, file, line, dynamic=True)] if name else []
    if not isinstance(node, ast.Attribute):
        return []
    chain = _chain(node)
    if chain is None:
        return []
    uses = []
    # Each prefix of the chain that names something: trt.BuilderFlag.TF32 uses BuilderFlag and BuilderFlag.TF32.
    for end in range(2, len(chain) + 1):
        name = _api_name(chain[:end])
        if name and (chain[0] == MODULE or end == len(chain)):
            uses.append(Use(name, file, line, guarded=name in guards.get(id(node), set())))
    return uses
