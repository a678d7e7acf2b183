"""A video or camera through an engine, pipelined: decode + preprocess | infer + encode | overlay.

Three threads with small queues between them: a reader decodes and preprocesses the next frames
while the engine runs the current one in the calling thread (ONNX Runtime, OpenVINO and TensorRT,
like OpenCV's decoder and Pillow's resize, release the GIL while they compute), and a drawer draws
the overlay of each frame the engine has finished. The engine's thread encodes the drawn frames
between two inferences: the reader's stages cost more CPU than the engine on a small model, so the
thread that waits least for its input takes the cheapest stage (measured on 2 cores, 640x480, the
default model: end to end 0.73x of `infer` alone with the drawer encoding, 0.77x with the engine's
thread encoding; medians of 8 pairs timed in turn, 7 of them in its favour). On a device with a few
cores, decoding a camera frame and resizing it cost as much as a small model's inference; in their
own thread they overlap it instead of adding to it. Decoding and resizing share one thread, so the
640x480 frame is resized while it is still in that core's cache, with one hand-over less per frame
(measured on 2 cores: about 0.3 ms less CPU per frame than with a thread each). Every stage times
itself, in wall and in CPU time, so the summary says where a frame's time goes; end-to-end frames
per second is frames over the wall time of the whole run.

On a machine with few cores the engine's own threads compete with these: an engine that keeps
every core busy for one image leaves the other stages nothing to overlap with, and their CPU
time adds to each frame's (`python -m export.bench.application` reports that ceiling). Running the
engine with one thread fewer than the cores (`--threads`) leaves them one. For the same reason
OpenCV's own thread pool is held at one thread during a run (it is process-wide: two runs at once
in one process would put it back in the wrong order): it otherwise splits each colour conversion
and each frame its built-in MJPEG writer encodes across every core, and its threads spin beside
the engine (measured on 2 cores, 640x480, the default model: 8.65 ms of process CPU per frame with
OpenCV's pool, 7.8 ms without). FFmpeg's decoding and encoding threads are not that pool's; they
are created when the video is opened and are left as FFmpeg sizes them (one decoding thread
instead made no difference that could be told from noise here).

The engine is the stage every frame waits for, so the reader and the drawer threads yield to it:
on Linux they run at a lower priority (nice +5) than the thread calling the engine. Where they
would otherwise share the cores equally, the engine's thread waited about 0.5 ms per frame to be
scheduled (measured on 2 cores, the default model: end to end 0.66x of `infer` alone with equal
priorities, 0.72x with these). +5 and not more: against other work in the same scheduling group
(the same session or service), a thread at +19 gets almost no CPU, and a camera would fall behind.
"""

from __future__ import annotations

import os
import queue
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from export.artifacts.interface import MIN_IMAGE_SIDE
from export.errors import ExportError
from export.video.frames import FrameSource, VideoSink, opencv_threads
from export.video.overlay import compose, overlay_size

STAGES = ("decode", "preprocess", "infer", "postprocess", "encode")
STAGE_NICENESS = 5  # the reader's and the drawer's priority below the engine's thread (module docstring)
QUEUE_DEPTH = 2  # frames in flight between two stages: enough to overlap them, little memory
PROGRESS_EVERY_S = 2.0
_END = object()


@dataclass
class VideoRun:
    """What one run did: frames, wall seconds, and the wall and CPU seconds each stage spent, summed over frames.

    A stage's CPU seconds are its thread's (`time.thread_time`): on a busy machine its wall time
    grows with everyone else's load, its CPU time hardly does. For `infer` it is the calling thread's
    share only; the engine's own threads are not counted.
    """

    frames: int = 0
    seconds: float = 0.0
    stage_seconds: dict[str, float] = field(default_factory=lambda: dict.fromkeys(STAGES, 0.0))
    stage_cpu_seconds: dict[str, float] = field(default_factory=lambda: dict.fromkeys(STAGES, 0.0))
    frame_times: list[float] = field(default_factory=list)  # seconds from the start to each frame written
    interrupted: bool = False

    @property
    def fps(self) -> float:
        return self.frames / self.seconds if self.seconds > 0 else 0.0

    def ms_per_frame(self, stage: str) -> float:
        return 1000 * self.stage_seconds[stage] / self.frames if self.frames else 0.0

    def cpu_ms_per_frame(self, stage: str) -> float:
        return 1000 * self.stage_cpu_seconds[stage] / self.frames if self.frames else 0.0

    def summary(self) -> str:
        stages = ", ".join(f"{stage} {self.ms_per_frame(stage):.1f} (cpu {self.cpu_ms_per_frame(stage):.1f})"
                           for stage in STAGES)
        return f"{self.frames} frames in {self.seconds:.1f} s: {self.fps:.1f} fps end to end; ms/frame: {stages}"


class _Stop(Exception):
    """Another stage failed or the run was stopped: leave quietly, the failure is raised elsewhere."""


class _Pipe:
    """A queue, bounded unless its depth is 0, whose waits give up when the run is stopping."""

    def __init__(self, stopping: threading.Event, depth: int = QUEUE_DEPTH):
        self.queue: queue.Queue = queue.Queue(maxsize=depth)  # 0: unbounded
        self.stopping = stopping

    def put(self, item) -> None:
        while True:
            if self.stopping.is_set():
                raise _Stop
            try:
                self.queue.put(item, timeout=0.1)
                return
            except queue.Full:
                continue

    def get(self):
        while True:
            if self.stopping.is_set():
                raise _Stop
            try:
                return self.queue.get(timeout=0.1)
            except queue.Empty:
                continue

    def ready(self) -> list:
        """The items waiting now, without waiting for more."""
        items = []
        while True:
            try:
                items.append(self.queue.get_nowait())
            except queue.Empty:
                return items


def video_engine_threads() -> int:
    """The engine's threads for a video or camera run when none are asked for: one core fewer than this
    process may use. Decoding, preprocessing, drawing and encoding need a core of their own to overlap with
    inference; an engine that takes every core leaves them to pre-empt it (measured on 2 cores, 640x480,
    the default model: 7.0 ms per frame with 2 engine threads, 4.35 ms with 1)."""
    return max(1, len(os.sched_getaffinity(0)) - 1)


def run_video(engine, source: FrameSource, sink: VideoSink, tasks: Sequence[str], *,
              max_frames: int | None = None, say: Callable[[str], None] = lambda _line: None) -> VideoRun:
    """Every frame of `source` (or the first `max_frames`) through `engine` for `tasks`, into `sink`.

    The sink is published only when the run ends well (a camera stopped with Ctrl-C ends well); any
    failure discards it. A source without a single frame is an error.
    """
    with opencv_threads(1):  # each stage is one thread; the engine has the other cores (module docstring)
        return _pipelined(engine, source, sink, tasks, max_frames, say)


def _pipelined(engine, source: FrameSource, sink: VideoSink, tasks: Sequence[str], max_frames: int | None,
               say: Callable[[str], None]) -> VideoRun:
    interface = engine.interface
    run = VideoRun()
    stopping = threading.Event()
    # Drawn frames go back to the engine's thread to be encoded between two inferences (module docstring).
    # That pipe is unbounded: the engine's thread waits on `inferred` while the drawer fills it, so a bound
    # on both could leave each waiting for the other. It holds a frame or two: the engine's thread empties it
    # after every inference, and the drawer draws no more frames than `inferred` lets through.
    decoded, inferred, drawn = _Pipe(stopping), _Pipe(stopping), _Pipe(stopping, depth=0)
    failures: list[BaseException] = []

    def timed(name: str, work: Callable, *args):
        """work(*args), its wall and CPU time added to stage `name` (each stage runs in one thread)."""
        wall, cpu = time.perf_counter(), time.thread_time()
        value = work(*args)
        run.stage_cpu_seconds[name] += time.thread_time() - cpu
        run.stage_seconds[name] += time.perf_counter() - wall
        return value

    def guarded(work: Callable[[], None]) -> Callable[[], None]:
        """A stage's loop in its thread: its failure goes to the main thread, which raises it."""
        def loop() -> None:
            try:
                _yield_to_engine()
                work()
            except _Stop:
                pass
            except BaseException as err:  # noqa: BLE001
                failures.append(err)
                stopping.set()
        return loop

    def read() -> None:
        count = 0
        while max_frames is None or count < max_frames:
            frame = timed("decode", source.read)
            if frame is None:
                break
            if min(frame.shape[:2]) < MIN_IMAGE_SIDE:  # as `run --image` refuses such an image
                height, width = frame.shape[:2]
                raise ExportError(f"{source.name}: its {width}x{height} frames are too small to run on (at least "
                                  f"{MIN_IMAGE_SIDE}x{MIN_IMAGE_SIDE}; the model's input is {interface.size}x"
                                  f"{interface.size}); nothing was written")
            decoded.put(timed("preprocess", interface.preprocess, frame))
            count += 1
        decoded.put(_END)

    def draw() -> None:
        while (item := inferred.get()) is not _END:
            drawn.put(timed("postprocess", compose, interface, *item))
        drawn.put(_END)

    def encode(frame) -> None:
        timed("encode", sink.write, frame)
        run.frame_times.append(time.perf_counter() - started)
        run.frames += 1

    def abandon() -> None:
        """Every thread stopped and the sink discarded: the run failed, or a file run was interrupted."""
        _stop(workers, stopping)
        sink.discard()

    workers = [threading.Thread(target=guarded(work), name=work.__name__, daemon=True)
               for work in (read, draw)]
    started = time.perf_counter()
    last_progress = started
    total = max_frames if source.frame_count is None else min(source.frame_count, max_frames or source.frame_count)
    for worker in workers:
        worker.start()
    try:
        sent = 0
        while (model_input := decoded.get()) is not _END:
            outputs = timed("infer", engine.infer, model_input[None], tasks)
            inferred.put((model_input, {t: v[0] for t, v in outputs.items()}))
            for frame in drawn.ready():  # the drawer's end comes only after `inferred`'s, below
                encode(frame)
            sent += 1
            if time.perf_counter() - last_progress >= PROGRESS_EVERY_S:
                last_progress = time.perf_counter()
                of = f"/{total}" if total else ""
                say(f"[video] {sent}{of} frames, {sent / (last_progress - started):.1f} fps")
        inferred.put(_END)
        while (frame := drawn.get()) is not _END:
            encode(frame)
        workers[-1].join()
    except _Stop:  # a worker failed; its error is in `failures`
        pass
    except KeyboardInterrupt:
        if not source.live:
            abandon()
            raise
        run.interrupted = True  # Ctrl-C is how a camera run ends: keep the frames written so far
        try:  # and those drawn already; the few still being decoded or run are dropped
            for frame in drawn.ready():
                if frame is not _END:
                    encode(frame)
        except BaseException:
            abandon()
            raise
    except BaseException:
        abandon()
        raise
    _stop(workers, stopping)
    run.seconds = time.perf_counter() - started
    if failures:
        sink.discard()
        raise failures[0]
    if run.frames == 0 and run.interrupted:
        sink.discard()
        raise ExportError(f"{source.name}: stopped before a frame was written; nothing was written")
    if run.frames == 0:
        sink.discard()
        raise ExportError(f"{source.name}: no frame could be decoded (an empty or damaged video, or a camera "
                          "that gives no picture); check that it plays, or re-encode it")
    announced = source.frame_count  # None for a camera, or a container that does not say
    if announced and run.frames < min(announced, max_frames or announced):
        say(f"[video] {source.name}: its container announces {announced} frames, but only {run.frames} could be "
            f"decoded (a truncated or damaged file?); the overlay has those {run.frames}")
    return run


def _yield_to_engine() -> bool:
    """The calling thread, a stage's, at STAGE_NICENESS below the engine's; whether it could be. Linux only:
    there a thread has a priority of its own, which `setpriority` sets by thread id; elsewhere that id may
    name a process."""
    if not sys.platform.startswith("linux"):
        return False
    thread = threading.get_native_id()
    try:
        os.setpriority(os.PRIO_PROCESS, thread, min(19, os.getpriority(os.PRIO_PROCESS, thread) + STAGE_NICENESS))
    except OSError:  # a sandbox that forbids it: the stages then share the cores equally, as before
        return False
    return True


def _stop(workers: list[threading.Thread], stopping: threading.Event) -> None:
    stopping.set()
    for worker in workers:
        worker.join()


def video_to_file(engine, source: FrameSource, out, tasks: Sequence[str], *, max_frames: int | None = None,
                  say: Callable[[str], None] = lambda _line: None):
    """`run_video` into a new overlay video at `out`: (the run, the published path). The video is
    published only when the run ends well, and nothing half-written stays otherwise; `source` is closed."""
    sink = None
    try:
        sink = VideoSink(out, source.fps, overlay_size(engine.interface, tasks))
        run = run_video(engine, source, sink, tasks, max_frames=max_frames, say=say)
        return run, sink.publish()
    except BaseException:
        if sink is not None:
            sink.discard()
        raise
    finally:
        source.close()
