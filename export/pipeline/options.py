"""What a build is asked to do, checked once before any work: options, backends, precisions.

Precision names and what each backend builds come from the backend table
(`engines.registry`); this is the one place they are checked against it. Every
later step takes the resolved (backend, precision) pairs as given.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, fields

from engines.registry import BACKENDS, choose_backend
from export.errors import ExportError

Say = Callable[[str], None]

# What `--precision all` builds (bf16 only when asked for by name: few devices run it natively).
ALL_PRECISIONS = ("fp32", "fp16", "int8")
LAYOUTS = ("single", "split")


@dataclass
class BuildOptions:
    checkpoint: str | None = None
    from_bundle: str | None = None
    precisions: tuple[str, ...] = ("fp16",)
    backends: tuple[str, ...] = ("auto",)
    layout: str = "single"
    postprocess: bool = False  # outputs post-processed in the graph (class ids, probabilities, unit normals)
    tasks: tuple[str, ...] | None = None
    img_size: int | None = None
    calib_data: str | None = None
    calib_samples: int = 256
    calib_method: str = "percentile"
    eval_data: str | None = None
    eval_samples: int = 32
    batch_size: int = 4
    keep_fp32: tuple[str, ...] = ()
    tolerances: str | None = None
    threads: int | None = None
    max_batch: int | None = None  # TensorRT: the largest batch of the optimisation profile
    report_samples: int = 3
    out: str = "build"

    @classmethod
    def names(cls) -> set[str]:
        return {f.name for f in fields(cls)}

    @classmethod
    def from_record(cls, options: dict, where: str) -> BuildOptions:
        """Options as build.json recorded them (lists back to tuples)."""
        try:
            return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in options.items()})
        except TypeError as err:
            raise ExportError(f"{where}: not a build record of this version ({err})") from None


def resolve_precisions(requested: tuple[str, ...]) -> tuple[str, ...]:
    return ALL_PRECISIONS if "all" in requested else tuple(dict.fromkeys(requested))


def resolve_backends(requested: tuple[str, ...], say: Say) -> list[str]:
    """'auto' and 'all' resolved against what is usable here, each choice said in one line."""
    chosen = []
    for name in requested:
        if name == "all":
            for candidate, spec in BACKENDS.items():
                ok, reason = spec.available()
                if ok:
                    chosen.append(candidate)
                else:
                    say(f"skipping {candidate}: {reason}")
            continue
        resolved, notice = choose_backend(name)
        say(notice)
        chosen.append(resolved)
    return list(dict.fromkeys(chosen))


def engine_plan(opts: BuildOptions, say: Say) -> list[tuple[str, str]]:
    """The (backend, precision) pairs to build, each checked against the backend table."""
    precisions = resolve_precisions(opts.precisions)
    pairs = [(backend, precision) for backend in resolve_backends(opts.backends, say) for precision in precisions]
    for backend, precision in pairs:
        BACKENDS[backend].check_precision(precision)
    return pairs
