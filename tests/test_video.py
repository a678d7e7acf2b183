"""`mtlora-export run --video / --camera`: a generated clip through a real engine, end to end."""

from __future__ import annotations

import os
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from export import open_engine
from export.checking.visualize import denormalize, render_output
from export.cli import main as export_cli
from tests.conftest import invoke

cv2 = pytest.importorskip("cv2")

FRAMES = 6


def write_clip(path: Path, frames: int, size: int = 64, height: int | None = None) -> Path:
    """A clip whose frames all differ: a moving disc on a background that brightens."""
    codec = "MJPG" if path.suffix in (".avi", ".mkv") else "mp4v"
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*codec), 10.0, (size, height or size))
    for i in range(frames):
        frame = np.full((height or size, size, 3), (30 * i) % 256, np.uint8)
        cv2.circle(frame, ((12 + 6 * i) % size, size // 2), 10, (0, 200, 255), -1)
        writer.write(frame)
    writer.release()
    return path


def read_frames(path: Path) -> list[np.ndarray]:
    """Every frame of a video, RGB."""
    capture, frames = cv2.VideoCapture(str(path)), []
    while True:
        ok, frame = capture.read()
        if not ok:
            break
        frames.append(frame[..., ::-1])
    capture.release()
    return frames


@pytest.fixture(scope="module")
def clip(tmp_path_factory) -> Path:
    return write_clip(tmp_path_factory.mktemp("clip") / "clip.mp4", FRAMES)


def test_every_frame_read_is_written_with_the_chosen_tasks_beside_it(ort_build, clip, tmp_path):
    engine_dir = ort_build / "engines" / "onnxruntime-fp32"
    out = tmp_path / "overlay.mp4"
    code, output = invoke(export_cli, "run", engine_dir, "--video", clip, "--out", out, "--tasks", "semseg,sal,normals")
    assert code == 0, output
    summary = output.strip().splitlines()[-1]
    # No --threads: the engine leaves a core to the pipeline's other stages.
    assert f"({max(1, len(os.sched_getaffinity(0)) - 1)} engine thread(s))" in summary
    assert f"{FRAMES} frames in" in summary and "fps end to end" in summary
    for stage in ("decode", "preprocess", "infer", "postprocess", "encode"):
        assert f"{stage} " in summary
    written, read = read_frames(out), read_frames(clip)
    assert len(written) == len(read) == FRAMES
    assert written[0].shape == (64, 4 * 64, 3)  # input | semseg | sal | normals
    with open_engine(engine_dir, threads=1) as engine:
        for frame_in, frame_out in zip(read, written, strict=True):
            outputs = engine.predict(np.ascontiguousarray(frame_in), tasks=["semseg", "sal", "normals"])
            expected = [denormalize(engine.interface.preprocess(np.ascontiguousarray(frame_in)), engine.interface.mean,
                                    engine.interface.std)]
            expected += [render_output(t, v, engine.interface.kind(t)) for t, v in outputs.items()]
            panels = np.split(frame_out.astype(np.float64), 4, axis=1)
            for panel, want in zip(panels, expected, strict=True):
                # mp4v is lossy: each panel is its picture up to codec noise, far from another frame's
                assert np.abs(panel - want).mean() < 12
    assert not [p for p in tmp_path.iterdir() if p.name != "overlay.mp4"]  # no staging file left



class StillCamera:
    """What a camera's capture gives: one frame in the camera's own layout, again and again."""

    def __init__(self, frame: np.ndarray):
        self.frame = frame

    def read(self):
        return True, self.frame.copy()

    def get(self, _prop):
        return 0.0

    def release(self):
        pass


BGR_PIXEL = (10, 120, 250)  # blue, green, red as OpenCV stores them
CAMERA_LAYOUTS = {
    "bgr": (np.full((4, 6, 3), BGR_PIXEL, np.uint8), (250, 120, 10)),
    "bgra": (np.full((4, 6, 4), (*BGR_PIXEL, 7), np.uint8), (250, 120, 10)),
    "grey": (np.full((4, 6), 99, np.uint8), (99, 99, 99)),
    "grey_one_channel": (np.full((4, 6, 1), 99, np.uint8), (99, 99, 99)),
}


@pytest.mark.parametrize("layout", CAMERA_LAYOUTS)
def test_frames_come_out_as_rgb_whatever_the_camera_gives(layout):
    from export.video.frames import FrameSource

    frame, rgb = CAMERA_LAYOUTS[layout]
    got = FrameSource(StillCamera(frame), "--camera 0", live=True).read()
    assert got.shape == (4, 6, 3) and got.dtype == np.uint8 and got.flags.c_contiguous
    assert (got == np.asarray(rgb, np.uint8)).all()


def test_a_camera_stops_at_max_frames_and_keeps_what_it_wrote(ort_build, clip, tmp_path):
    """A live source (a camera: no end, no frame count), here a capture of the clip, stopped by --max-frames."""
    from export.video.frames import FrameSource, VideoSink
    from export.video.overlay import overlay_size
    from export.video.pipeline import run_video

    with open_engine(ort_build / "engines" / "onnxruntime-fp32", threads=1) as engine:
        source = FrameSource(cv2.VideoCapture(str(clip)), "--camera 0", live=True)
        sink = VideoSink(tmp_path / "cam.avi", source.fps, overlay_size(engine.interface, ("sal",)))
        run = run_video(engine, source, sink, ("sal",), max_frames=3)
        sink.publish()
        source.close()
    assert run.frames == 3 and len(read_frames(tmp_path / "cam.avi")) == 3


class SlowSource:
    """A real decoder that takes `delay` seconds more per frame, like a camera or a large video would."""

    def __init__(self, source, delay: float):
        self.source, self.delay = source, delay
        self.name, self.live, self.fps, self.frame_count = source.name, False, source.fps, None

    def read(self):
        time.sleep(self.delay)
        return self.source.read()


class SlowEngine:
    """A real engine whose every call takes `delay` seconds more."""

    def __init__(self, engine, delay: float):
        self.engine, self.delay, self.interface = engine, delay, engine.interface

    def infer(self, batch, tasks):
        time.sleep(self.delay)
        return self.engine.infer(batch, tasks)


def test_decoding_overlaps_inference(ort_build, tmp_path):
    from export.video.frames import FrameSource, VideoSink
    from export.video.overlay import overlay_size
    from export.video.pipeline import run_video

    clip = write_clip(tmp_path / "long.avi", 12)
    with open_engine(ort_build / "engines" / "onnxruntime-fp32", threads=1) as engine:
        source = FrameSource.video(clip)
        sink = VideoSink(tmp_path / "out.avi", source.fps, overlay_size(engine.interface, ("sal",)))
        run = run_video(SlowEngine(engine, 0.05), SlowSource(source, 0.05), sink, ("sal",))
        sink.publish()
        source.close()
    stages = run.stage_seconds
    serial = stages["decode"] + stages["preprocess"] + stages["infer"] + stages["postprocess"] + stages["encode"]
    assert run.frames == 12
    # One after the other this takes `serial`; overlapped, about the slower of decoding and inference.
    assert run.seconds < 0.8 * serial, (run.seconds, stages)


class CountingThreads:
    """A real decoder that notes OpenCV's thread count, and its own thread's priority, as each frame is read."""

    def __init__(self, source):
        self.source, self.seen, self.niceness = source, [], []
        self.name, self.live, self.fps, self.frame_count = source.name, False, source.fps, source.frame_count

    def read(self):
        self.seen.append(cv2.getNumThreads())
        self.niceness.append(os.getpriority(os.PRIO_PROCESS, threading.get_native_id()))
        return self.source.read()


@pytest.mark.parametrize("fails", [False, True])
def test_opencv_runs_on_one_thread_during_a_run_and_is_put_back_after(ort_build, clip, tmp_path, fails):
    """OpenCV's pool would spread every conversion and encoded frame over all cores, beside the engine."""
    from export.video.frames import FrameSource, VideoSink
    from export.video.overlay import overlay_size
    from export.video.pipeline import run_video

    before = cv2.getNumThreads()
    cv2.setNumThreads(2)
    try:
        with open_engine(ort_build / "engines" / "onnxruntime-fp32", threads=1) as engine:
            source = CountingThreads(FrameSource.video(clip))
            sink = VideoSink(tmp_path / "out.avi", source.fps, overlay_size(engine.interface, ("sal",)))
            if fails:
                with pytest.raises(KeyboardInterrupt):
                    run_video(InterruptedEngine(engine, 2), source, sink, ("sal",))
            else:
                assert run_video(engine, source, sink, ("sal",)).frames == FRAMES
            source.source.close()
        assert source.seen and set(source.seen) == {1}
        assert cv2.getNumThreads() == 2
    finally:
        cv2.setNumThreads(before)


class PriorityNotingSink:
    """A real video writer that notes its thread, and that thread's priority, as each frame is written."""

    def __init__(self, sink):
        self.sink, self.niceness, self.threads = sink, [], []

    def write(self, frame):
        self.threads.append(threading.get_native_id())
        self.niceness.append(os.getpriority(os.PRIO_PROCESS, threading.get_native_id()))
        self.sink.write(frame)

    def discard(self):
        self.sink.discard()


def _may_lower_own_priority() -> bool:
    """Whether this sandbox lets a stage's thread lower its priority (the pipeline carries on where it may
    not), asked on a thread of its own that then ends."""
    from export.video.pipeline import _yield_to_engine

    allowed = []
    thread = threading.Thread(target=lambda: allowed.append(_yield_to_engine()))
    thread.start()
    thread.join()
    return allowed[0]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="a thread's own priority is Linux's")
def test_reader_and_drawer_yield_to_the_engine_whose_thread_encodes_at_the_callers_priority(
        ort_build, clip, tmp_path, monkeypatch):
    """The engine is the stage every frame waits for: the reader and the drawer run below it; the caller's
    thread, which runs the engine and encodes, keeps its priority."""
    import export.video.pipeline as pipeline
    from export.video.frames import FrameSource, VideoSink
    from export.video.overlay import overlay_size

    if not _may_lower_own_priority():
        pytest.skip("this sandbox forbids setpriority")
    caller_thread = threading.get_native_id()
    caller = os.getpriority(os.PRIO_PROCESS, caller_thread)
    drawing, compose = [], pipeline.compose

    def noting_compose(*args):
        drawing.append((threading.get_native_id(), os.getpriority(os.PRIO_PROCESS, threading.get_native_id())))
        return compose(*args)

    monkeypatch.setattr(pipeline, "compose", noting_compose)
    with open_engine(ort_build / "engines" / "onnxruntime-fp32", threads=1) as engine:
        source = CountingThreads(FrameSource.video(clip))
        sink = PriorityNotingSink(VideoSink(tmp_path / "out.avi", source.fps,
                                            overlay_size(engine.interface, ("sal",))))
        try:
            assert pipeline.run_video(engine, source, sink, ("sal",)).frames == FRAMES
        finally:
            source.source.close()
            sink.discard()
    lowered = min(19, caller + pipeline.STAGE_NICENESS)
    assert set(source.niceness) == {lowered} and {p for _, p in drawing} == {lowered}
    assert set(sink.niceness) == {caller} and set(sink.threads) == {caller_thread}
    assert caller_thread not in {t for t, _ in drawing}
    assert os.getpriority(os.PRIO_PROCESS, caller_thread) == caller


class FailingSink:
    """A real video writer that fails at its `at`-th frame, as a full disk would."""

    def __init__(self, sink, at: int):
        self.sink, self.at, self.written = sink, at, 0

    def write(self, frame):
        if self.written + 1 == self.at:
            raise OSError(28, "No space left on device")
        self.sink.write(frame)
        self.written += 1

    def discard(self):
        self.sink.discard()


@pytest.mark.parametrize("stage", ["draw", "encode"])
def test_a_stage_that_fails_mid_run_raises_its_error_and_leaves_no_video(ort_build, clip, tmp_path, monkeypatch, stage):
    """The drawer fails in its own thread, encoding in the engine's: either way the run ends with that error,
    every thread stopped and the staged video gone."""
    import export.video.pipeline as pipeline
    from export.video.frames import FrameSource, VideoSink
    from export.video.overlay import overlay_size

    drawn, compose = [], pipeline.compose

    def failing_compose(*args):
        drawn.append(1)
        if len(drawn) == 3:
            raise RuntimeError("drawing failed")
        return compose(*args)

    if stage == "draw":
        monkeypatch.setattr(pipeline, "compose", failing_compose)
    threads_before = threading.active_count()
    with open_engine(ort_build / "engines" / "onnxruntime-fp32", threads=1) as engine:
        source = FrameSource.video(clip)
        sink = VideoSink(tmp_path / "out.avi", source.fps, overlay_size(engine.interface, ("sal",)))
        try:
            with pytest.raises(RuntimeError if stage == "draw" else OSError,
                               match="drawing failed" if stage == "draw" else "No space left"):
                pipeline.run_video(engine, source, sink if stage == "draw" else FailingSink(sink, 3), ("sal",))
        finally:
            source.close()
    assert list(tmp_path.iterdir()) == []
    assert threading.active_count() == threads_before


def _not_a_video(f, t):
    (t / "text.mp4").write_text("not a video")
    return ["--video", t / "text.mp4", "--out", t / "o.mp4"]


def _no_frames(f, t):
    return ["--video", write_clip(t / "empty.avi", 0), "--out", t / "o.mp4"]


def _out_under_a_file(f, t):
    (t / "file").write_text("")
    return ["--video", f, "--out", t / "file" / "o.mp4"]


def _out_is_a_directory(f, t):
    (t / "dir.mp4").mkdir()
    return ["--video", f, "--out", t / "dir.mp4"]


BAD_INPUT = {
    "missing_video": (lambda f, t: ["--video", t / "absent.mp4", "--out", t / "o.mp4"], "no such file"),
    "not_a_video": (_not_a_video, "cannot be read as a video"),
    "zero_frames": (_no_frames, "no frame could be decoded"),
    "out_under_a_file": (_out_under_a_file, "is a file, not a directory"),
    "out_is_a_directory": (_out_is_a_directory, "is a directory"),
    "camera_that_does_not_open": (lambda f, t: ["--camera", "57", "--out", t / "o.mp4"], "camera 57 does not open"),
}


@pytest.mark.parametrize("case", BAD_INPUT)
def test_bad_video_input_is_one_line_and_writes_nothing(ort_build, clip, tmp_path, case):
    make, message = BAD_INPUT[case]
    args = make(clip, tmp_path)
    before = {p.name for p in tmp_path.rglob("*")}
    code, output = invoke(export_cli, "run", ort_build / "engines" / "onnxruntime-fp32", *args)
    assert code == 1, output
    assert output.startswith("Error: ") and len(output.strip().splitlines()) == 1, output
    assert message in output
    assert {p.name for p in tmp_path.rglob("*")} == before  # no video, no staging file


USAGE = {
    "unknown_task": (["--tasks", "depth"], "o.mp4", "Invalid value for --tasks: unknown task(s) depth; this engine has:"),
    "not_a_video_suffix": ([], "o.npz", "Invalid value for --out: a video needs one of the suffixes .mp4"),
    "no_out": ([], None, "Invalid value for --out: name the overlay video to write"),
    "max_frames_zero": (["--max-frames", "0"], "o.mp4", "Invalid value for '--max-frames'"),
}


@pytest.mark.parametrize("case", USAGE)
def test_bad_video_flags_are_usage_errors(ort_build, clip, tmp_path, case):
    extra, out, message = USAGE[case]
    args = ["--video", clip, *extra, *(["--out", tmp_path / out] if out else [])]
    code, output = invoke(export_cli, "run", ort_build / "engines" / "onnxruntime-fp32", *args)
    assert code == 2 and message in output, output
    assert list(tmp_path.iterdir()) == []


def test_without_opencv_the_error_names_the_extra(ort_build, clip, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "cv2", None)  # `import cv2` now fails as if it were not installed
    code, output = invoke(export_cli, "run", ort_build / "engines" / "onnxruntime-fp32", "--video", clip,
                          "--out", tmp_path / "o.mp4")
    assert code == 1 and len(output.strip().splitlines()) == 1
    assert "pip install 'mtlora-export[video]'" in output


class InterruptedEngine:
    """A real engine; Ctrl-C arrives (in the main thread, as a signal does) during call `at`."""

    def __init__(self, engine, at: int):
        self.engine, self.at, self.calls, self.interface = engine, at, 0, engine.interface

    def infer(self, batch, tasks):
        self.calls += 1
        if self.calls == self.at:
            time.sleep(0.3)  # let the drawer catch up, as a person pressing Ctrl-C would
            raise KeyboardInterrupt
        return self.engine.infer(batch, tasks)


@pytest.mark.parametrize("live", [True, False])
def test_ctrl_c_ends_a_camera_run_and_keeps_its_video_but_not_a_file_run(ort_build, clip, tmp_path, live):
    from export.video.frames import FrameSource, VideoSink
    from export.video.overlay import overlay_size
    from export.video.pipeline import run_video

    with open_engine(ort_build / "engines" / "onnxruntime-fp32", threads=1) as engine:
        source = FrameSource(cv2.VideoCapture(str(clip)), "--camera 0" if live else f"--video {clip}", live=live)
        sink = VideoSink(tmp_path / "out.avi", source.fps, overlay_size(engine.interface, ("sal",)))
        try:
            if live:
                run = run_video(InterruptedEngine(engine, 4), source, sink, ("sal",))
                sink.publish()
            else:
                with pytest.raises(KeyboardInterrupt):
                    run_video(InterruptedEngine(engine, 4), source, sink, ("sal",))
        finally:
            source.close()
    if live:
        assert run.interrupted and run.frames == 3
        assert len(read_frames(tmp_path / "out.avi")) == 3
    assert [p.name for p in tmp_path.iterdir()] == (["out.avi"] if live else [])


# ----------------------------------------------------------------------------- the overlay is not the input


def _same_path(t, clip):
    return clip, clip


def _relative_path(t, clip):
    return clip, Path(os.path.relpath(clip.parent / "x" / ".." / clip.name))


def _symbolic_link(t, clip):
    (t / "link.avi").symlink_to(clip)
    return t / "link.avi", clip


def _link_as_out(t, clip):
    (t / "link.avi").symlink_to(clip)
    return clip, t / "link.avi"


def _hard_link(t, clip):
    os.link(clip, t / "hard.avi")
    return clip, t / "hard.avi"


@pytest.mark.parametrize("spelling", [_same_path, _relative_path, _symbolic_link, _link_as_out, _hard_link])
def test_out_that_is_the_input_video_is_refused(ort_build, tmp_path, spelling):
    clip = write_clip(tmp_path / "clip.avi", 3)
    video, out = spelling(tmp_path, clip)
    before = clip.read_bytes()
    listing = sorted(tmp_path.iterdir())
    code, output = invoke(export_cli, "run", ort_build / "engines" / "onnxruntime-fp32", "--video", video,
                          "--out", out)
    assert code == 2, output
    assert f"Invalid value for --out: {out} is the input video; name another file" in output, output
    assert clip.read_bytes() == before and sorted(tmp_path.iterdir()) == listing


def test_an_out_beside_the_input_is_not_the_input(ort_build, tmp_path):
    clip = write_clip(tmp_path / "clip.avi", 3)
    code, output = invoke(export_cli, "run", ort_build / "engines" / "onnxruntime-fp32", "--video", clip,
                          "--out", tmp_path / "clip.mp4")
    assert code == 0, output


# ----------------------------------------------------------------------------- frames too small, frames missing


@pytest.mark.parametrize("name, width, height", [("four.mp4", 4, 4), ("six.avi", 6, 6), ("flat.mp4", 64, 4),
                                                 ("narrow.mkv", 6, 64)])
def test_frames_smaller_than_an_image_may_be_are_refused(ort_build, tmp_path, name, width, height):
    """As `run --image` refuses an image under 8x8: one line, no overlay, no staging file."""
    clip = write_clip(tmp_path / name, 3, width, height)
    got = read_frames(clip)[0].shape[:2]
    code, output = invoke(export_cli, "run", ort_build / "engines" / "onnxruntime-fp32", "--video", clip,
                          "--out", tmp_path / "out" / "o.mp4")
    assert code == 1, output
    assert output.startswith("Error: ") and len(output.strip().splitlines()) == 1, output
    assert f"--video {clip}: its {got[1]}x{got[0]} frames are too small to run on (at least 8x8" in output
    assert list((tmp_path / "out").iterdir()) == []


def test_a_camera_with_frames_too_small_is_refused(ort_build, tmp_path):
    from export.errors import ExportError
    from export.video.frames import FrameSource
    from export.video.pipeline import video_to_file

    frame, _ = CAMERA_LAYOUTS["bgr"]  # 6x4
    with open_engine(ort_build / "engines" / "onnxruntime-fp32", threads=1) as engine:
        source = FrameSource(StillCamera(frame), "--camera 0", live=True)
        with pytest.raises(ExportError, match=r"^--camera 0: its 6x4 frames are too small to run on \(at least 8x8"):
            video_to_file(engine, source, tmp_path / "cam.avi", ("sal",), max_frames=3)
    assert list(tmp_path.iterdir()) == []


def test_eight_pixels_is_enough(ort_build, tmp_path):
    clip = write_clip(tmp_path / "eight.avi", 2, 8)
    code, output = invoke(export_cli, "run", ort_build / "engines" / "onnxruntime-fp32", "--video", clip,
                          "--out", tmp_path / "o.avi")
    assert code == 0, output


@pytest.mark.parametrize("suffix", [".avi", ".mkv"])
def test_a_truncated_video_says_fewer_frames_were_read_than_announced(ort_build, tmp_path, suffix):
    full = write_clip(tmp_path / f"full{suffix}", 30)
    clip = tmp_path / f"cut{suffix}"
    clip.write_bytes(full.read_bytes()[: full.stat().st_size // 2])
    decoded = len(read_frames(clip))
    assert 0 < decoded < 30
    code, output = invoke(export_cli, "run", ort_build / "engines" / "onnxruntime-fp32", "--video", clip,
                          "--out", tmp_path / "o.avi", "--tasks", "sal")
    assert code == 0, output
    notice = [line for line in output.splitlines() if "announces" in line]
    assert notice == [f"[video] --video {clip}: its container announces 30 frames, but only {decoded} could be "
                      f"decoded (a truncated or damaged file?); the overlay has those {decoded}"], output
    assert len(read_frames(tmp_path / "o.avi")) == decoded


@pytest.mark.parametrize("max_frames", [None, 3, 6, 50])
def test_a_whole_video_says_nothing_of_missing_frames(ort_build, clip, tmp_path, max_frames):
    extra = [] if max_frames is None else ["--max-frames", max_frames]
    code, output = invoke(export_cli, "run", ort_build / "engines" / "onnxruntime-fp32", "--video", clip,
                          "--out", tmp_path / "o.avi", "--tasks", "sal", *extra)
    assert code == 0, output
    assert "announces" not in output
    assert len(read_frames(tmp_path / "o.avi")) == min(FRAMES, max_frames or FRAMES)
