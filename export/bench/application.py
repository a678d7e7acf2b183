"""The application's view, measured as two ratios in one run (issue targets; `python -m export.bench.application`).

1. End-to-end frames per second of `run --video` (a generated clip, decode to encoded overlay, pipelined)
   over the same engine's `infer`-only images per second at batch 1 (target: at least 0.85).
2. One task at run time over all tasks on a split build (target: at most 0.85 of the time).

Each pair is timed in turn, round after round (a busy spell of a shared machine slows both alike), and
the ratio of the medians is reported.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from export.bench.targets import VIDEO_FRAME_SIZE
from export.bench.timing import interleaved_latency
from export.bench.worker import write_clip


def video_vs_infer(engine_dir: Path, frames: int, rounds: int, threads: int | None,
                   frame_size: tuple[int, int] = VIDEO_FRAME_SIZE) -> dict:
    """Frames per second end to end, and `infer`-only images per second over as many calls, in turn."""
    from export.artifacts.engineset import open_engine
    from export.video.frames import FrameSource
    from export.video.pipeline import STAGES, video_to_file

    stages = []
    with tempfile.TemporaryDirectory(prefix="mtlora-app-") as tmp, open_engine(engine_dir, threads) as engine:
        clip = write_clip(Path(tmp) / "clip.avi", frames, frame_size)
        image = np.random.default_rng(0).standard_normal((1, 3, engine.interface.size, engine.interface.size),
                                                         dtype=np.float32)

        def infer_only():
            for _ in range(frames):
                engine.infer(image)

        def end_to_end():
            run, _ = video_to_file(engine, FrameSource.video(clip), Path(tmp) / "out.avi", engine.tasks)
            stages.append({s: run.ms_per_frame(s) for s in STAGES})

        timed = interleaved_latency({"infer": infer_only, "video": end_to_end}, rounds=rounds)
    infer_fps = frames / statistics.median(timed["seconds"]["infer"])
    video_fps = frames / statistics.median(timed["seconds"]["video"])
    return {"engine": str(engine_dir), "frames": frames, "frame_size": list(frame_size),
            "infer_images_per_s": infer_fps, "video_frames_per_s": video_fps, "ratio": video_fps / infer_fps,
            "stage_ms_per_frame": stages[-1], "rounds": timed["rounds_kept"], "contended": timed["contended"]}


def one_vs_all(engine_dir: Path, task: str | None, calls: int, rounds: int, threads: int | None) -> dict:
    """Seconds per image for all tasks and for one task at run time, in turn."""
    from export.artifacts.engineset import open_engine

    with open_engine(engine_dir, threads) as engine:
        task = task or engine.tasks[0]
        image = np.random.default_rng(0).standard_normal((1, 3, engine.interface.size, engine.interface.size),
                                                         dtype=np.float32)

        def run(tasks):
            def calls_of():
                for _ in range(calls):
                    engine.infer(image, tasks)
            return calls_of

        timed = interleaved_latency({"all": run(None), "one": run([task])}, rounds=rounds)
        layout = engine.entry.layout
    all_ms = 1000 * statistics.median(timed["seconds"]["all"]) / calls
    one_ms = 1000 * statistics.median(timed["seconds"]["one"]) / calls
    return {"engine": str(engine_dir), "layout": layout, "task": task, "all_tasks_ms": all_ms, "one_task_ms": one_ms,
            "ratio": one_ms / all_ms, "rounds": timed["rounds_kept"], "contended": timed["contended"]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m export.bench.application", description=__doc__.splitlines()[0])
    parser.add_argument("--video-engine", type=Path, required=True, help="engine set for ratio 1 (e.g. fp32, single)")
    parser.add_argument("--split-engine", type=Path, required=True, help="engine set of a split build for ratio 2")
    parser.add_argument("--task", help="the one task of ratio 2 (default: the first)")
    parser.add_argument("--frames", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int)
    parser.add_argument("--frame-size", type=int, nargs=2, default=VIDEO_FRAME_SIZE, metavar=("WIDTH", "HEIGHT"),
                        help="the generated clip's frames (default: a 640x480 camera frame)")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    started = time.perf_counter()
    result = {"video_vs_infer": video_vs_infer(args.video_engine, args.frames, args.rounds, args.threads,
                                                tuple(args.frame_size)),
              "one_vs_all": one_vs_all(args.split_engine, args.task, args.frames, args.rounds, args.threads),
              "command": " ".join(["python -m export.bench.application", *(argv or sys.argv[1:])])}
    result["seconds"] = time.perf_counter() - started
    text = json.dumps(result, indent=2)
    print(text)
    if args.json:
        args.json.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
