"""INT8 calibration data for a build: which images, how many, and the feeds of a split head."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from engines.files import sha256_file
from export.artifacts.evalset import EvalSet
from export.artifacts.interface import ModelInterface
from export.errors import ExportError
from export.pipeline.data import DataSpec, count_samples, image_files, iter_samples, parse_spec
from export.pipeline.options import BuildOptions, Say


def calibration_spec(opts: BuildOptions) -> DataSpec:
    # An empty value is refused (data.check_data), never taken for "not given".
    text = next((t for t in (opts.calib_data, opts.eval_data) if t is not None), "synthetic")
    spec = parse_spec(text)
    if spec.kind in ("evalset", "images"):
        return spec
    return DataSpec(spec.kind, spec.root, spec.split or "train")


def check_calibration_data(opts: BuildOptions) -> int:
    """The number of calibration samples the build will use; refuses too few before any work is done."""
    from calibration.data import MIN_SAMPLES

    spec = calibration_spec(opts)
    count = count_samples(spec, limit=opts.calib_samples, default_split="train")
    if count < MIN_SAMPLES:
        more = (f"--calib-samples {opts.calib_samples}" if count == opts.calib_samples
                else f"{spec.describe()} holds {count}")
        raise ExportError(f"int8 calibration needs at least {MIN_SAMPLES} samples, got {count} ({more}); "
                          "int8 ranges from fewer swing with every image")
    if spec.kind == "images":
        # Unreadable files are skipped when calibrating; a directory with too few readable ones is refused
        # now, not after the export. Reading stops at the fewest that will do.
        good, skipped = readable_images(image_files(spec.root), MIN_SAMPLES, say=None)
        _enough_readable(spec.root, good, skipped)
    return count


def calibration_set(opts: BuildOptions, interface: ModelInterface, say: Say):
    """The calibration images as a re-iterable stream of feeds: one image is in memory at a time."""
    from calibration.data import CalibrationSet

    spec = calibration_spec(opts)
    if spec.kind == "evalset":
        images = EvalSet.read(spec.root).images
        return CalibrationSet.from_arrays(images[: opts.calib_samples].astype(np.float32), input_name="image")
    count = check_calibration_data(opts)
    if spec.kind == "images":
        calibration = own_images(spec.root, opts.calib_samples, interface, say)
        calibration.progress = say
        return calibration
    say(f"[calibrate] {count} samples from {spec.describe()}")

    def iterate():
        for sample in iter_samples(spec, task_channels={}, size=interface.size, mean=interface.mean,
                                   std=interface.std, limit=opts.calib_samples, default_split="train"):
            yield {"image": sample.image[None].astype(np.float32)}

    calibration = CalibrationSet.from_source(iterate, num_samples=count, input_names=["image"])
    calibration.progress = say  # 100,000 samples take minutes: say how far, and how long is left
    return calibration


# Named one by one up to this many; more are counted.
SKIPPED_NAMED = 20


def readable_images(paths: list[Path], wanted: int, say: Say) -> tuple[list[Path], list[tuple[Path, str]]]:
    """The first `wanted` images of `paths` that read as images, and the ones skipped with why."""
    from calibration.progress import with_progress
    from mtlora.data.preprocess import load_image
    from mtlora.errors import MTLoRAError

    good, skipped = [], []
    for path in with_progress(paths, total=len(paths), what="checking the images", say=say):
        if len(good) == wanted:
            break
        try:
            load_image(path)
        except MTLoRAError as err:  # load_image's one-line reasons: empty, truncated, not an image, too large
            skipped.append((path, str(err)))
        else:
            good.append(path)
    return good, skipped


def _enough_readable(root: Path, good: list[Path], skipped: list) -> None:
    from calibration.data import MIN_SAMPLES

    if len(good) < MIN_SAMPLES:
        raise ExportError(f"--calib-data {root}: only {len(good)} readable images ({len(skipped)} unreadable); "
                          f"int8 calibration needs at least {MIN_SAMPLES}, and a few hundred give stable ranges")


def own_images(root: Path, wanted: int, interface: ModelInterface, say: Say):
    """A directory of the user's images as calibration data: unreadable files are skipped and named, and
    the count found is said before calibrating. The fingerprint hashes the files, not the decoded pixels."""
    from calibration.data import CalibrationSet

    files = image_files(root)
    good, skipped = readable_images(files, wanted, say)
    for path, why in skipped[:SKIPPED_NAMED]:
        say(f"[calibrate] skipped {why}" if str(path) in why else f"[calibrate] skipped {path}: {why}")
    if len(skipped) > SKIPPED_NAMED:
        say(f"[calibrate] skipped {len(skipped) - SKIPPED_NAMED} more unreadable files")
    _enough_readable(root, good, skipped)
    unused = len(files) - len(good) - len(skipped)
    say(f"[calibrate] {len(good)} images from {root}" + (f", {len(skipped)} unreadable skipped" if skipped else "")
        + (f" ({unused} more not used: --calib-samples {wanted})" if unused else ""))

    def iterate():
        for path in good:
            yield {"image": preprocess_file(path, interface)[None]}

    def digest_items():
        # The preprocessing is fixed by the interface (in the settings), so the files' bytes identify the feeds.
        for path in good:
            yield path.read_bytes()

    settings = {"images": [p.relative_to(root).as_posix() for p in good], "size": interface.size, "mean": list(interface.mean),
                "std": list(interface.std)}
    return CalibrationSet.from_source(iterate, num_samples=len(good), input_names=["image"], settings=settings,
                                      digest_items=digest_items)


def preprocess_file(path: Path, interface: ModelInterface) -> np.ndarray:
    """One calibration image file -> model input (3, size, size), exactly as at inference."""
    from mtlora.data.preprocess import load_image

    return interface.preprocess(load_image(path))


def graph_inputs(path: Path) -> list[str]:
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    initializers = {i.name for i in model.graph.initializer}
    return [i.name for i in model.graph.input if i.name not in initializers]


def head_calibration(backbone_onnx: Path, calibration, head_inputs: list[str]):
    """Feeds for a split head: the backbone's real outputs on the calibration images (ONNX Runtime fp32),
    computed on the fly, one image at a time."""
    import onnxruntime as ort

    from calibration.data import CalibrationSet
    from engines.errors import EngineError

    try:
        session = ort.InferenceSession(str(backbone_onnx), providers=["CPUExecutionProvider"])
    except Exception as err:  # ONNX Runtime's own error types: a graph it cannot load
        raise EngineError(f"{backbone_onnx}: ONNX Runtime cannot load the backbone to calibrate the heads "
                          f"({type(err).__name__}); re-run the export") from None
    names = [o.name for o in session.get_outputs()]

    def iterate():
        for feed in calibration:
            outputs = dict(zip(names, session.run(None, feed), strict=True))
            yield {n: outputs[n].astype(np.float32) for n in head_inputs}

    def digest_items():
        # The feeds are a pure function of the backbone and its calibration images.
        yield calibration.fingerprint().encode()
        yield sha256_file(backbone_onnx).encode()
        yield f"onnxruntime {ort.__version__}".encode()

    return CalibrationSet.from_source(iterate, num_samples=len(calibration), input_names=head_inputs,
                                      settings={"head_inputs": head_inputs}, digest_items=digest_items,
                                      min_samples=1)
