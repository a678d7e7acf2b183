"""Errors raised by engine building and running; the CLI turns them into one line."""

from __future__ import annotations

import os
import re

# Lines OpenVINO puts before its reason that only say where in its own sources it was raised:
# "Exception from src/inference/src/cpp/core.cpp:217:", "Check 'is_valid_model' failed at src/...cpp:222:".
_SOURCE_LOCATION = re.compile(r"^(Exception from \S+:\d+:|Check '.*' failed at \S+:\d+:)$")
# ONNX Runtime's status prefix: "[ONNXRuntimeError] : 7 : INVALID_PROTOBUF : Load model from PATH failed:".
_ORT_STATUS = re.compile(r"^\[ONNXRuntimeError\] : \d+ : (\w+) : (Load model from .* failed:)?")
REASON_CHARS = 160  # a runtime's reason is a hint beside ours, not the message


class EngineError(Exception):
    """Base class: an engine could not be built, loaded or run from what we were given."""


class BackendUnavailable(EngineError):
    """The backend's SDK or device is not usable on this machine."""


def runtime_reason(exc: BaseException) -> str:
    """What a runtime's exception (or the one that caused it) says is wrong, as one short line."""
    while exc.__cause__ is not None:
        exc = exc.__cause__
    lines = (line.strip() for line in str(exc).splitlines())
    reason = next((line for line in lines if line and not _SOURCE_LOCATION.match(line)), "")
    reason = _ORT_STATUS.sub(lambda m: f"{m.group(1)}: ", reason).strip() or type(exc).__name__
    return reason if len(reason) <= REASON_CHARS else reason[: REASON_CHARS - 3] + "..."


def load_failure(path: str | os.PathLike, runtime: str, exc: BaseException) -> EngineError:
    """One line for an engine file a runtime refuses although its hashes match: it was damaged before they
    were recorded, or made by another version. The runtime's own message is several lines of its source
    locations; its first line of reason is kept."""
    return EngineError(f"{path}: {runtime} cannot load this engine file ({runtime_reason(exc)}); it is damaged "
                       "or was made by another version: rebuild the engine (mtlora-export build)")
