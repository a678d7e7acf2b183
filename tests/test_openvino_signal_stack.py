"""OpenVINO's CPU plugin leaves a thread's signal stack unmapped when two Cores go in the order they came;
ours stays in place (engines.openvino.signal_stack). Run in a child: without it, the child dies of SIGSEGV."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

pytest.importorskip("openvino")
pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="alternate signal stacks: Linux")

ROOT = Path(__file__).resolve().parents[1]

SCRIPT = textwrap.dedent("""
    import gc, os, signal, subprocess, sys
    import numpy as np
    import openvino as ov
    import openvino.opset13 as ops
    from engines.openvino.signal_stack import core_with_plugins, current_signal_stack

    guarded = sys.argv[1] == "guarded"

    def compiled():
        core = core_with_plugins(ov) if guarded else ov.Core()
        parameter = ops.parameter([1, 3, 8, 8], np.float32)
        return core, core.compile_model(ov.Model([ops.relu(parameter)], [parameter]), "CPU")

    first, second = compiled(), compiled()
    del first; gc.collect()  # the first Core made goes first: not nested
    del second; gc.collect()
    mapped = any(int(a, 16) <= current_signal_stack() < int(b, 16) for a, b in
                 (line.split()[0].split("-") for line in open("/proc/self/maps")))
    print("stack mapped:", mapped, flush=True)
    # A Python handler runs on the alternate stack: a child's SIGCHLD, and a signal of our own.
    signal.signal(signal.SIGCHLD, lambda *_: None)
    signal.signal(signal.SIGUSR1, lambda *_: print("handled SIGUSR1", flush=True))
    subprocess.run(["true"], check=True)
    os.kill(os.getpid(), signal.SIGUSR1)
    print("still here", flush=True)
""")


def run(mode: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", SCRIPT, mode], cwd=ROOT, capture_output=True, text=True, timeout=120)


def test_signals_after_openvino_cores_go_out_of_order_are_handled():
    done = run("guarded")
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.splitlines() == ["stack mapped: True", "handled SIGUSR1", "still here"]


def test_without_it_the_plugin_leaves_the_stack_unmapped():
    # The upstream behaviour the module works around; should an OpenVINO release fix it, this says so
    # (and the workaround can go).
    done = run("plain")
    assert "stack mapped: False" in done.stdout, "OpenVINO no longer leaves an unmapped signal stack: " + done.stdout
    assert done.returncode == -11 and "still here" not in done.stdout
