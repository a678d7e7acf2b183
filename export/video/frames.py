"""Frames in from a video file or a camera, frames out to a video file, through OpenCV.

OpenCV is optional (`pip install 'mtlora-export[video]'`): it is imported on first use, and its
absence is one line naming the extra. Frames cross this module as (H, W, 3) uint8 RGB, the layout
the rest of the project uses; OpenCV's BGR stays in here.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from export.errors import ExportError

# The container decides the codec OpenCV can write into it; one row per suffix.
CODECS = {".mp4": "mp4v", ".m4v": "mp4v", ".mov": "mp4v", ".avi": "MJPG", ".mkv": "MJPG"}
# A camera that reports no frame rate is written at this rate.
DEFAULT_FPS = 30.0


def opencv():
    """The cv2 module, or one line saying how to install it."""
    # OpenCV and its FFmpeg print their own warnings (a camera index that is not there, a damaged
    # container) to stderr; our one-line errors say it, so keep theirs quiet unless asked for.
    os.environ.setdefault("OPENCV_LOG_LEVEL", "ERROR")
    os.environ.setdefault("OPENCV_FFMPEG_LOGLEVEL", "-8")
    try:
        import cv2
    except ImportError:
        raise ExportError("video and camera input need OpenCV: pip install 'mtlora-export[video]' "
                          "(opencv-python-headless)") from None
    return cv2


@contextmanager
def opencv_threads(count: int) -> Iterator[None]:
    """OpenCV's own thread pool held at `count` threads for a block, then put back as it was."""
    cv2 = opencv()
    before = cv2.getNumThreads()
    cv2.setNumThreads(count)
    try:
        yield
    finally:
        cv2.setNumThreads(before)


class FrameSource:
    """Decoded frames of a video file or a camera, as RGB uint8; `read()` gives None at the end."""

    def __init__(self, capture, name: str, live: bool):
        self.capture = capture
        self.name = name  # as the command line gave it: "--video clip.mp4", "--camera 0"
        self.live = live  # a camera: no end, no frame count
        self.cv2 = cv2 = opencv()
        self.fps = float(capture.get(cv2.CAP_PROP_FPS) or 0.0) or DEFAULT_FPS
        count = int(capture.get(cv2.CAP_PROP_FRAME_COUNT) or 0)
        self.frame_count = None if live or count <= 0 else count  # what the container claims; may be off

    @classmethod
    def video(cls, path: str | os.PathLike) -> FrameSource:
        path = Path(path)
        if not path.is_file():
            raise ExportError(f"--video {path}: no such file")
        cv2 = opencv()
        capture = cv2.VideoCapture(str(path))
        if not capture.isOpened():
            capture.release()
            raise ExportError(f"--video {path}: cannot be read as a video (not a video, or a codec OpenCV "
                              "lacks); convert it to H.264 .mp4 or MJPEG .avi")
        return cls(capture, f"--video {path}", live=False)

    @classmethod
    def camera(cls, index: int) -> FrameSource:
        cv2 = opencv()
        capture = cv2.VideoCapture(int(index))
        if not capture.isOpened():
            capture.release()
            raise ExportError(f"--camera {index}: camera {index} does not open (none at that index, or "
                              "in use by another program); list cameras with `v4l2-ctl --list-devices`")
        return cls(capture, f"--camera {index}", live=True)

    def read(self) -> np.ndarray | None:
        ok, frame = self.capture.read()
        if not ok or frame is None:
            return None
        # cvtColor, not a reversed numpy view made contiguous: at 640x480 that copy costs a
        # millisecond of CPU per frame (as much as decoding), cvtColor a twentieth of it.
        cv2 = self.cv2
        if frame.ndim == 2 or frame.shape[2] == 1:  # some cameras give grey frames
            return cv2.cvtColor(frame, cv2.COLOR_GRAY2RGB)
        return cv2.cvtColor(frame, cv2.COLOR_BGRA2RGB if frame.shape[2] == 4 else cv2.COLOR_BGR2RGB)

    def close(self) -> None:
        self.capture.release()


class VideoSink:
    """An output video written beside its final name and renamed into place by `publish`: a failed
    run leaves no video, and an older video of that name stays until the new one is whole."""

    def __init__(self, path: str | os.PathLike, fps: float, size: tuple[int, int]):
        self.path = Path(path)
        codec = CODECS.get(self.path.suffix.lower())
        if codec is None:
            raise ExportError(f"--out {self.path}: a video needs one of the suffixes {', '.join(CODECS)}")
        if self.path.is_dir():
            raise ExportError(f"--out {self.path}: is a directory; name the video file, e.g. {self.path}/out.mp4")
        self.cv2 = cv2 = opencv()
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=f".{self.path.stem}.", suffix=self.path.suffix)
            os.close(fd)
        except OSError as err:
            from mtlora.fileio import why_not_writable

            raise ExportError(f"--out {self.path}: cannot write here ({why_not_writable(self.path, err)}); "
                              "choose another output path") from None
        self.staging = Path(tmp)
        self.size = size  # (width, height)
        self.writer = cv2.VideoWriter(str(self.staging), cv2.VideoWriter_fourcc(*codec), float(fps), size)
        if not self.writer.isOpened():
            self.discard()
            raise ExportError(f"--out {self.path}: OpenCV cannot write {codec} video here; "
                              "try another suffix (.avi) or output path")
        self.frames = 0

    def write(self, frame: np.ndarray) -> None:
        """One RGB uint8 frame of the sink's size."""
        self.writer.write(self.cv2.cvtColor(frame, self.cv2.COLOR_RGB2BGR))
        self.frames += 1

    def publish(self) -> Path:
        self.writer.release()
        if not self.staging.is_file() or self.staging.stat().st_size == 0:
            self.discard()
            raise ExportError(f"--out {self.path}: the video could not be written (no space left, or the "
                              "codec failed); choose another output path")
        from mtlora.fileio import publish_mode

        try:
            publish_mode(self.staging)
            os.replace(self.staging, self.path)
        except OSError as err:
            self.discard()
            raise ExportError(f"--out {self.path}: could not be written ({err.strerror or err}); "
                              "choose another output path") from None
        return self.path

    def discard(self) -> None:
        writer = getattr(self, "writer", None)
        if writer is not None:
            writer.release()
        self.staging.unlink(missing_ok=True)
