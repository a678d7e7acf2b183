"""A signal stack that outlives OpenVINO's, so that a signal after OpenVINO work is a signal, not a crash.

OpenVINO's CPU plugin (2026.4), when a Core loads it, gives the calling thread an alternate signal
stack of its own (room for AMX's large signal frames) and, when that Core goes, puts back the stack it
found if its own is still in place, then unmaps its own. With two Cores whose lives overlap without
nesting (the first made is the first to go), the second one puts back the first one's stack, which is
unmapped by then. The next signal with a Python handler on that thread (Python runs every handler on
the alternate stack: Ctrl-C, our SIGTERM, the SIGCHLD of a PyTorch DataLoader when a child process
ends) finds no stack to run on, and the kernel kills the process with SIGSEGV: no traceback, no
clean-up. It happened to the test suite's workers, at a `subprocess.run` after OpenVINO builds.

`steady_signal_stack` gives the thread a stack of ours that is never freed, right after anything that
may load the plugin (`core_with_plugins`); every plugin then finds ours in place, saves it, and when its
Core goes finds its own no longer current and leaves ours alone. NNCF makes Cores of its own: after a
quantization, collect them and call `steady_signal_stack` again.
"""

from __future__ import annotations

import ctypes
import sys

SIZE = 1 << 16  # far more than the largest signal frame (AMX's tile state included: about 11 KiB)

# The stack's address: memory from C's malloc, never freed. A Python object's memory would be freed as the
# interpreter shuts down, while the thread still uses it, and a signal then (a child ending) would crash.
_stack: int | None = None


class _StackT(ctypes.Structure):
    _fields_ = [("ss_sp", ctypes.c_void_p), ("ss_flags", ctypes.c_int), ("ss_size", ctypes.c_size_t)]


def _libc():
    return ctypes.CDLL(None, use_errno=True)


def steady_signal_stack() -> bool:
    """This thread's alternate signal stack becomes ours (made once, never freed); False where that cannot
    be done (not Linux, or the kernel refused), in which case nothing changed."""
    global _stack
    if not sys.platform.startswith("linux"):
        return False
    libc = _libc()
    if _stack is None:
        libc.malloc.restype = ctypes.c_void_p
        _stack = libc.malloc(ctypes.c_size_t(SIZE))
        if not _stack:
            return False
    return libc.sigaltstack(ctypes.byref(_StackT(_stack, 0, SIZE)), None) == 0


def current_signal_stack() -> int | None:
    """The address of this thread's alternate signal stack (None without one, or off Linux)."""
    if not sys.platform.startswith("linux"):
        return None
    current = _StackT()
    if _libc().sigaltstack(None, ctypes.byref(current)) != 0 or not current.ss_sp:
        return None
    return current.ss_sp


def core_with_plugins(ov):
    """A new `ov.Core` whose device plugins are loaded, with this thread's signal stack ours again."""
    core = ov.Core()
    core.available_devices  # noqa: B018 - listing the devices loads their plugins (and their signal stacks)
    steady_signal_stack()
    return core
