"""How a benchmark times: batch sizes, threads, runs and the time budget."""

from __future__ import annotations

from dataclasses import dataclass

from export.bench.machine import available_cpus
from export.errors import ExportOptionError


@dataclass
class BenchOptions:
    batch_sizes: tuple[int, ...] = (1, 8)
    threads: int | None = None  # None: every CPU this process may use
    runs: int = 50  # most timed runs per target and batch size
    warmup: int = 2
    budget_s: float = 10.0  # stop timing once this many seconds have passed (and MIN_RUNS are done)
    torch_eager: bool = True  # also time the PyTorch model, unmerged and merged
    matmul_size: int = 2048
    quiet_wait_s: float = 0.0  # before each format, wait up to this long for other processes to go quiet
    cuda_graph: bool = False  # TensorRT: replay the enqueue from a CUDA graph in the GPU timing (trtexec --useCudaGraph)
    runtime_rows: bool = True  # per fp32 engine set: one task at run time, and a generated video end to end

    def __post_init__(self) -> None:
        self.batch_sizes = tuple(sorted({int(b) for b in self.batch_sizes}))
        if not self.batch_sizes or self.batch_sizes[0] < 1:
            raise ExportOptionError(f"batch sizes must be positive integers, got {self.batch_sizes}")
        if self.runs < 1 or self.warmup < 0 or self.budget_s < 0:
            raise ExportOptionError("runs must be at least 1, warmup and the time budget at least 0")
        if self.threads is not None and self.threads < 1:
            raise ExportOptionError(f"threads must be at least 1, got {self.threads}")

    @property
    def thread_count(self) -> int:
        return self.threads or available_cpus()
