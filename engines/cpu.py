"""What this CPU is and offers for low-precision arithmetic, read from the kernel (Linux: /proc/cpuinfo).

The CPUs our users build and run on differ (AVX2 only, AVX-512 with or without VNNI, AMX), and
which int8 arithmetic is exact depends on it: see `int8_saturates`. A choice made from timings is
recorded with the machine it was made on (`cpu_model`, `cpu_flags`).
"""

from __future__ import annotations

import functools
import platform
from collections.abc import Mapping, Sequence
from pathlib import Path

# The flags our choices and reports depend on.
NOTED_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "avx512_fp16", "amx_bf16", "amx_int8")
# The x86 instructions that multiply-accumulate int8 into 32 bits in one step (VPDPBUSD, AMX tiles).
INT8_DOT_PRODUCT = ("avx512_vnni", "avx_vnni", "amx_int8")
X86 = ("x86_64", "amd64", "i386", "i686", "x86")


@functools.cache
def _cpuinfo() -> dict[str, str]:
    """The first processor's fields ('model name', 'flags', ...); empty where they cannot be read. Read
    once: every session of an int8 graph asks (`int8_saturates`), and the CPU does not change."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return {}
    fields: dict[str, str] = {}
    for line in text.splitlines():
        name, _, value = line.partition(":")
        fields.setdefault(name.strip(), value.strip())
    return fields


def cpu_model() -> str:
    """The CPU's model name, or what the platform module says where /proc/cpuinfo has none."""
    return _cpuinfo().get("model name") or platform.processor() or platform.machine()


def cpu_flags(wanted: Sequence[str] = NOTED_FLAGS) -> dict[str, bool]:
    """{flag: present} for `wanted`; empty when the flags cannot be read (not Linux)."""
    info = _cpuinfo()
    if not info:
        return {}
    flags = set(info.get("flags", "").split())
    return {f: f in flags for f in wanted}


def has_int8_dot_product(flags: Mapping[str, bool]) -> bool:
    """Whether `flags` (as `cpu_flags` gives them) name an int8 dot-product instruction."""
    return any(flags.get(f) for f in INT8_DOT_PRODUCT)


def int8_saturates(flags: Mapping[str, bool] | None = None, machine: str | None = None) -> bool:
    """Whether uint8 x int8 products can saturate in this CPU's int8 kernels.

    An x86 CPU without an int8 dot product (AVX2, or AVX-512 without VNNI) multiplies uint8
    activations by int8 weights with VPMADDUBSW, which adds two products into a signed 16-bit
    lane: 255 x 127 x 2 overflows it and is clamped. ONNX Runtime's U8S8 kernels and OpenVINO's
    int8 layers use it there. Measured on an AVX2-only AMD EPYC with the tests' tiny model: ONNX
    Runtime's int8 engine 0.068 relative error to fp32 with int8 weights, 0.008 with the same
    weights held as uint8; OpenVINO 0.12 with NNCF's default overflow fix (first layer only), 0.015
    with it on every layer. With unreadable flags an x86 CPU is taken to saturate: the remedies
    are exact, only a little slower. ARM's int8 kernels widen before they add, so they never do.
    """
    machine = (machine or platform.machine()).lower()
    if machine not in X86:
        return False
    return not has_int8_dot_product(cpu_flags(INT8_DOT_PRODUCT) if flags is None else flags)
