"""The application's view, measured as two ratios in one run (issue targets; `python -m export.bench.application`).

1. End-to-end frames per second of `run --video` (a generated clip, decode to encoded overlay, pipelined)
   over the same engine's `infer`-only images per second at batch 1 (target: at least 0.85).
2. One task at run time over all tasks on a split build (target: at most 0.85 of the time).

Each pair is timed in turn, round after round (a busy spell of a shared machine slows both alike), and
the ratio of the medians is reported.

Ratio 1 has a ceiling set by the machine, reported beside it. Every frame costs the engine's CPU
time per image (`infer_cpu_ms`, measured on the `infer`-only runs: on a CPU backend at batch 1 the
engine keeps every core busy) plus the CPU time of decoding, preprocessing, drawing and encoding it
(`other_cpu_ms`, the stages' thread CPU time in the video runs). On `cores` cores a frame cannot take
less wall time than their sum over `cores`, nor less than an `infer` call, so

    ratio <= ceiling_on_this_machine = min(1, cores * infer_ms / (infer_cpu_ms + other_cpu_ms))

however well the stages overlap. The ceiling is optimistic: an engine whose threads are pre-empted
by the other stages takes more CPU per image than it does alone. CPU time, unlike wall time, hardly
grows with other processes' load, so the stage costs stay readable on a shared machine.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from export.bench.targets import VIDEO_FRAME_SIZE
from export.bench.timing import interleaved_latency, timed_call
from export.bench.worker import write_clip


def video_vs_infer(engine_dir: Path, frames: int, rounds: int, threads: int | None,
                   frame_size: tuple[int, int] = VIDEO_FRAME_SIZE) -> dict:
    """Frames per second end to end, and `infer`-only images per second over as many calls, in turn;
    with each stage's CPU milliseconds per frame and the ceiling they set on the ratio (module docstring)."""
    from export.artifacts.engineset import open_engine
    from export.video.frames import FrameSource
    from export.video.pipeline import STAGES, video_engine_threads, video_to_file

    threads = threads or video_engine_threads()  # as `run --video` runs it, for both timings
    stage_cpu: dict[str, list[float]] = {stage: [] for stage in STAGES}
    stage_wall: dict[str, list[float]] = {stage: [] for stage in STAGES}
    process_cpu: dict[str, list[float]] = {"infer": [], "video": []}
    with tempfile.TemporaryDirectory(prefix="mtlora-app-") as tmp, open_engine(engine_dir, threads) as engine:
        clip = write_clip(Path(tmp) / "clip.avi", frames, frame_size)
        image = np.random.default_rng(0).standard_normal((1, 3, engine.interface.size, engine.interface.size),
                                                         dtype=np.float32)

        def infer_only():
            for _ in range(frames):
                engine.infer(image)

        def end_to_end():
            run, _ = video_to_file(engine, FrameSource.video(clip), Path(tmp) / "out.avi", engine.tasks)
            for stage in STAGES:
                stage_cpu[stage].append(run.cpu_ms_per_frame(stage))
                stage_wall[stage].append(run.ms_per_frame(stage))

        names = {infer_only: "infer", end_to_end: "video"}

        def timer(call):
            timing = timed_call(call)
            process_cpu[names[call]].append(timing.own_cpu_s)
            return timing

        timed = interleaved_latency({"infer": infer_only, "video": end_to_end}, rounds=rounds, timer=timer)
    infer_fps = frames / statistics.median(timed["seconds"]["infer"])
    video_fps = frames / statistics.median(timed["seconds"]["video"])
    cpu_ms = {stage: statistics.median(values) for stage, values in stage_cpu.items()}
    other_cpu_ms = sum(cpu_ms[stage] for stage in STAGES if stage != "infer")
    infer_cpu_ms = 1000 * statistics.median(process_cpu["infer"]) / frames
    infer_ms = 1000 / infer_fps
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    ceiling = min(1.0, cores * infer_ms / (infer_cpu_ms + other_cpu_ms))
    return {"engine": str(engine_dir), "threads": threads, "frames": frames, "frame_size": list(frame_size),
            "infer_images_per_s": infer_fps, "video_frames_per_s": video_fps, "ratio": video_fps / infer_fps,
            "cores": cores, "infer_ms": infer_ms, "infer_cpu_ms": infer_cpu_ms, "other_cpu_ms": other_cpu_ms,
            "video_cpu_ms": 1000 * statistics.median(process_cpu["video"]) / frames,
            "ceiling_on_this_machine": ceiling,
            "stage_ms_per_frame": {stage: statistics.median(values) for stage, values in stage_wall.items()},
            "stage_cpu_ms_per_frame": cpu_ms, "rounds": timed["rounds_kept"], "contended": timed["contended"]}


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


# Issue #20's targets, and the restatement its measurements propose (see `verdict_rows`).
VIDEO_VS_INFER = 0.85  # end-to-end frames/s at least this share of the same engine's infer-only images/s
OF_CEILING = 0.85  # restated: at least this share of what this machine's CPU allows (the ceiling)
ONE_TASK_VS_ALL = 0.85  # one task at run time (split layout) at most this share of the all-tasks time


def measure(video_engines: dict[str, tuple[Path, int, int]], split_engine: Path | None, threads: int | None,
            say=lambda line: None) -> dict:
    """The application's two ratios for the page: {label: (engine set, frames, rounds)} end to end against
    `infer`, each engine as `run --video` runs it; and one task against all on `split_engine`."""
    result: dict = {"video": {}}
    for label, (engine_dir, frames, rounds) in video_engines.items():
        say(f"[bench-docs] video end to end against infer, in turn: {label} ({frames} frames x {rounds} rounds)")
        result["video"][label] = video_vs_infer(engine_dir, frames, rounds, None)
    if split_engine is not None:
        say("[bench-docs] one task against all at run time, split layout, in turn")
        result["one_vs_all"] = one_vs_all(split_engine, None, 3, 5, threads)
    return result


def verdict_rows(application: dict) -> list[list[str]]:
    """Issue #20's targets as rows of the verdict table. The video ratio is also judged against this machine's
    ceiling (module docstring): where decoding a camera frame costs more CPU than the engine does, no
    pipelining reaches 0.85x on a machine whose every core the engine already uses."""
    rows = []
    for label, v in (application.get("video") or {}).items():
        ratio, ceiling = v["ratio"], v["ceiling_on_this_machine"]
        width, height = v["frame_size"]
        verdict = "PASS" if ratio >= VIDEO_VS_INFER else "MISS"
        if verdict == "MISS":
            restated = "PASS" if ratio >= OF_CEILING * ceiling else "MISS"
            verdict += f"; restated (at least {OF_CEILING} of the ceiling): {restated}"
        rows.append([f"`run --video` end to end at least {VIDEO_VS_INFER}x the same engine's `infer`-only images/s at "
                     f"batch 1 ({label}, {width}x{height} clip, {v['threads']} engine thread(s))",
                     f"{ratio:.2f}x ({v['video_frames_per_s']:.1f} vs {v['infer_images_per_s']:.1f} per s); ceiling "
                     f"{ceiling:.2f}x, so {ratio / ceiling:.2f} of it", verdict])
    one = application.get("one_vs_all")
    if one:
        verdict = "PASS" if one["ratio"] <= ONE_TASK_VS_ALL else "MISS"
        rows.append([f"one task ({one['task']}) at run time at most {ONE_TASK_VS_ALL}x the all-tasks time "
                     f"({Path(one['engine']).name}, {one['layout']} layout)",
                     f"{one['ratio']:.2f}x ({one['one_task_ms']:.1f} vs {one['all_tasks_ms']:.1f} ms)", verdict])
    return rows


def stage_lines(application: dict) -> list[str]:
    """Where each video's frame time goes: CPU ms per frame by stage, and the ceiling they set."""
    lines = []
    for label, v in (application.get("video") or {}).items():
        stages = ", ".join(f"{stage} {ms:.1f}" for stage, ms in v["stage_cpu_ms_per_frame"].items())
        lines.append(f"- {label}: CPU ms per frame {stages}; `infer` alone {v['infer_ms']:.1f} ms wall and "
                     f"{v['infer_cpu_ms']:.1f} ms CPU per image; ceiling = min(1, {v['cores']} cores x "
                     f"{v['infer_ms']:.1f} / ({v['infer_cpu_ms']:.1f} + {v['other_cpu_ms']:.1f})) = "
                     f"{v['ceiling_on_this_machine']:.2f}; {v['rounds']} rounds"
                     + (" (contended throughout)" if v["contended"] else ""))
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m export.bench.application", description=__doc__.splitlines()[0])
    parser.add_argument("--video-engine", type=Path, required=True, help="engine set for ratio 1 (e.g. fp32, single)")
    parser.add_argument("--split-engine", type=Path,
                        help="engine set of a split build for ratio 2 (left out: ratio 1 alone)")
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
                                                tuple(args.frame_size))}
    if args.split_engine is not None:
        result["one_vs_all"] = one_vs_all(args.split_engine, args.task, args.frames, args.rounds, args.threads)
    result["command"] = " ".join(["python -m export.bench.application", *(argv or sys.argv[1:])])
    result["seconds"] = time.perf_counter() - started
    text = json.dumps(result, indent=2)
    print(text)
    if args.json:
        args.json.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
