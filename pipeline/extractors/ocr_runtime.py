"""easyocr's own two networks run by ONNX Runtime or OpenVINO instead of torch, on the CPU.

easyocr reads in two steps: CRAFT finds text regions in the whole image (about 85% of the time on a
poster) and a small CRNN reads each region. Both are exported here from easyocr's own weights files
(no other weights, no download) into ONNX graphs on first use, and run by the chosen runtime. The
easyocr Reader keeps everything else (resizing, box grouping, decoding): only the two forward passes
change hands, so a float graph gives the reads of easyocr's torch path.

Precisions (`ocr.precision`):

- `easyocr` (default): the detector in float32 and the recogniser exactly as easyocr runs it on the CPU
  (torch, its weights dynamically quantised to int8 by easyocr). The reads equal easyocr's own.
- `fp32`: both networks in float32 in the runtime. The recogniser is no longer quantised, so some texts
  change (float reads are, if anything, the better ones; they are easyocr's reads on a GPU).
- `bf16`: both networks in bfloat16 (OpenVINO on a CPU with AVX512-BF16 or AMX).
- `int8`: the detector statically quantised to int8 by ONNX Runtime (calibrated on fixed images that
  ship with scikit-image), the recogniser as in `easyocr`.

Exported graphs live in `<folder>/<weights sha256>-<export tag>/` (the folder: the extraction cache's
`ocr-onnx/`, else the user's cache), written aside and renamed, each with a `.sha256` beside it that
is checked on every load: a damaged or half-written graph is exported again.
"""

from __future__ import annotations

import logging
import os
import socket
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.features import file_sha256, json_sha256

log = logging.getLogger(__name__)

RUNTIMES = ("torch", "onnxruntime", "openvino")
PRECISIONS = ("easyocr", "fp32", "bf16", "int8")
OPSET = 17
EXPORT_FORMAT = 1  # raise when the export code below changes what it writes
_EXPORT_LOCK = threading.RLock()  # re-entered by the fallback folder


def runtime_version(runtime: str) -> str:
    """The installed version of a runtime's Python package (torch's for `torch`), as the cache keys see it."""
    from pipeline import cache

    found = cache.installed_version(runtime)
    if found == "absent":
        raise ValueError(
            f"ocr.runtime {runtime!r} needs the Python package {runtime!r}, which is not installed "
            f"(pip install {runtime}), or choose ocr.runtime: torch"
        )
    return found


def _cpu_flags() -> set[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    return {f for line in text.splitlines() if line.startswith("flags") for f in line.split(":", 1)[1].split()}


def cpu_has_bf16() -> bool:
    """Whether this CPU computes bfloat16 natively (AVX512-BF16 or AMX), read from /proc/cpuinfo."""
    return bool({"avx512_bf16", "amx_bf16"} & _cpu_flags())


def cpu_has_vnni() -> bool:
    """Whether this CPU has int8 dot-product instructions (VNNI): ONNX Runtime's int8 kernels give other
    (saturating) results without them."""
    return bool({"avx512_vnni", "avx_vnni", "amx_int8"} & _cpu_flags())


def check(runtime: str, precision: str, where: str = "extract.modalities.ocr") -> None:
    """Refuse a runtime/precision pair that cannot run here, with what to choose instead."""
    if runtime not in RUNTIMES:
        raise ValueError(f"{where}.runtime: {runtime!r} is not one of {list(RUNTIMES)}")
    if precision not in PRECISIONS:
        raise ValueError(f"{where}.precision: {precision!r} is not one of {list(PRECISIONS)}")
    if runtime == "torch" and precision != "easyocr":
        raise ValueError(f"{where}: runtime torch runs easyocr's own precision only; not {precision!r}")
    if precision == "bf16" and runtime != "openvino":
        raise ValueError(f"{where}: precision bf16 needs runtime openvino")
    if precision == "bf16" and not cpu_has_bf16():
        raise ValueError(f"{where}: precision bf16 needs a CPU with AVX512-BF16 or AMX; this one has neither")
    if precision == "int8" and runtime != "onnxruntime":
        raise ValueError(f"{where}: precision int8 needs runtime onnxruntime")
    runtime_version(runtime)


def describe(runtime: str, precision: str) -> dict[str, str]:
    """What runs each network, as the cache key and the workers' check see it."""
    detector = f"{runtime} {runtime_version(runtime)}"
    if runtime == "torch":
        return {"detector": f"{detector} fp32", "recogniser": f"{detector} easyocr-dynamic-int8"}
    torch_v = f"torch {runtime_version('torch')}"
    # the lossy precisions compute differently on CPUs without the instructions they use: the CPU is named
    det_precision = {
        "easyocr": "fp32",
        "fp32": "fp32",
        "bf16": "bf16 (native)",
        "int8": f"int8-static ({'vnni' if cpu_has_vnni() else 'no vnni'})",
    }[precision]
    recogniser = f"{detector} {det_precision}" if precision in ("fp32", "bf16") else f"{torch_v} easyocr-dynamic-int8"
    return {
        "detector": f"{detector} {det_precision} (onnx opset {OPSET}, export {EXPORT_FORMAT}, {torch_v})",
        "recogniser": recogniser,
    }


def default_folder() -> Path:
    """Where graphs go when the job has no extraction cache: the user's cache folder."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "dmms" / "ocr-onnx"


# --------------------------------------------------------------------------------------------
# Export (torch -> ONNX), once per weights file, exporter and precision
# --------------------------------------------------------------------------------------------


def _write_aside(path: Path, write: Callable[[Path], None]) -> None:
    """Write `path` through a private file beside it, then its checksum, then rename both into place."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{socket.gethostname()}.{os.getpid()}.{threading.get_ident()}.partial")
    try:
        write(tmp)
        digest = file_sha256(tmp)
        sidecar = tmp.with_name(tmp.name + ".sha256")
        sidecar.write_text(digest + "\n")
        os.replace(tmp, path)
        os.replace(sidecar, path.with_name(path.name + ".sha256"))
    finally:
        for leftover in (tmp, tmp.with_name(tmp.name + ".sha256")):
            leftover.unlink(missing_ok=True)


def _remove_stale_partials(path: Path, age_s: float = 3600.0) -> None:
    """Files written aside by exports killed an hour ago or more (an export takes seconds)."""
    import time

    for leftover in path.parent.glob(f".{path.name}.*.partial*") if path.parent.is_dir() else []:
        try:
            if time.time() - leftover.stat().st_mtime > age_s:
                leftover.unlink()
        except OSError:
            pass  # another process removed or renamed it


def is_intact(path: Path) -> bool:
    """The graph and its checksum are both there and agree."""
    sidecar = path.with_name(path.name + ".sha256")
    try:
        return path.is_file() and sidecar.read_text().strip() == file_sha256(path)
    except OSError:
        return False


def _to_onnx(module: Any, example: Any, out: Path, outputs: list[str], dynamic_axes: dict[str, dict[int, str]]) -> None:
    """A torch module as an ONNX graph with input "image" (the TorchScript exporter: the dynamo one needs
    onnxscript)."""
    import torch

    with torch.no_grad():
        torch.onnx.export(
            module,
            (example,),
            str(out),
            input_names=["image"],
            output_names=outputs,
            dynamic_axes=dynamic_axes,
            opset_version=OPSET,
            dynamo=False,
        )


def export_detector(weights: Path, out: Path) -> None:
    """CRAFT in float32 from easyocr's weights file, with dynamic batch, height and width."""
    import torch
    from easyocr.detection import get_detector

    net = get_detector(str(weights), device="cpu", quantize=False).eval()
    axes = {"image": {0: "n", 2: "h", 3: "w"}, "maps": {0: "n", 1: "h2", 2: "w2"}}
    _to_onnx(net, torch.zeros(1, 3, 320, 480), out, ["maps", "feature"], axes)


def export_recogniser(model: Any, out: Path) -> None:
    """easyocr's float recogniser (eval mode) with dynamic batch and width, as a one-input graph: its text
    argument is unused by its forward, and its AdaptiveAvgPool2d((None, 1)) (which does not export with a
    dynamic width) becomes the equal mean over the last axis."""
    import torch

    class Mean(torch.nn.Module):
        def forward(self, x):
            return x.mean(dim=3, keepdim=True)

    class ImageOnly(torch.nn.Module):
        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, image):
            return self.m(image, None)

    model.AdaptiveAvgPool = Mean()
    axes = {"image": {0: "n", 3: "w"}, "logits": {0: "n", 1: "t"}}
    _to_onnx(ImageOnly(model).eval(), torch.zeros(2, 1, 64, 256), out, ["logits"], axes)


def calibration_images() -> list[np.ndarray]:
    """Fixed images for the int8 detector's calibration: printed text, photographs and a face that ship
    with scikit-image (the same on every machine, so the int8 graph is a function of the weights)."""
    from skimage import data

    out = []
    for name in ("page", "text", "astronaut", "coffee", "camera", "rocket"):
        img = np.asarray(getattr(data, name)())
        if img.ndim == 2:
            img = np.repeat(img[:, :, None], 3, axis=2)
        out.append(img[:, :, :3].astype(np.uint8))
    return out


def quantise_detector(float_graph: Path, out: Path, canvas_size: int) -> None:
    """The float detector statically quantised to int8 (QDQ, per-channel weights, MinMax calibration)."""
    import cv2
    from easyocr.imgproc import normalizeMeanVariance, resize_aspect_ratio
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Reader(CalibrationDataReader):
        def __init__(self):
            batches = []
            for img in calibration_images():
                resized, _, _ = resize_aspect_ratio(img, canvas_size, interpolation=cv2.INTER_LINEAR, mag_ratio=1.0)
                batches.append(
                    {"image": np.transpose(normalizeMeanVariance(resized), (2, 0, 1))[None].astype(np.float32)}
                )
            self.it = iter(batches)

        def get_next(self):
            return next(self.it, None)

    pre = out.with_name(out.name + ".pre.onnx")
    try:
        quant_pre_process(str(float_graph), str(pre), skip_symbolic_shape=True)
        quantize_static(
            str(pre),
            str(out),
            Reader(),
            quant_format=QuantFormat.QDQ,
            per_channel=True,
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
        )
    finally:
        pre.unlink(missing_ok=True)


def graph(folder: Path, weights: Path, name: str, build: Callable[[Path], None]) -> Path:
    """The exported graph `name` for this weights file, exported (aside, then renamed) when it is missing
    or damaged. Two processes racing here both export and the last rename wins: the same content."""
    path = folder / export_tag(weights) / name
    with _EXPORT_LOCK:
        if is_intact(path):
            return path
        if path.exists():
            log.warning("OCR graph %s is damaged (checksum); exporting it again", path)
        _remove_stale_partials(path)
        log.info("exporting %s from %s to %s (once per weights file and exporter)", name, weights.name, path)
        try:
            _write_aside(path, build)
        except OSError as exc:  # a read-only or full cache folder: export where this process can write
            fallback = default_folder() if folder != default_folder() else Path(tempfile.mkdtemp(prefix="dmms-ocr-"))
            log.warning("could not write %s (%s); exporting to %s instead", path, exc, fallback)
            return graph(fallback, weights, name, build)
    return path


# what shapes an exported graph besides the weights: the export and quantisation code here, the exporter
# (torch), easyocr's network code, and for int8 the quantiser, the calibration images and their resizing
EXPORT_LIBRARIES = ("torch", "easyocr", "onnx", "onnxruntime", "scikit-image", "opencv-python-headless", "numpy")


def export_tag(weights: Path) -> str:
    """The folder name of the graphs exported from `weights`: its sha256 and a digest of everything else
    that shapes them (so an upgrade exports again instead of reusing a graph another exporter wrote)."""
    from pipeline import cache

    inputs = {
        "opset": OPSET,
        "export_format": EXPORT_FORMAT,
        "code": cache.code_digest(("pipeline.extractors.ocr_runtime",)),
        "libraries": {d: cache.installed_version(d) for d in EXPORT_LIBRARIES},
    }
    return f"{file_sha256(weights)[:32]}-{json_sha256(inputs)[:16]}"


# --------------------------------------------------------------------------------------------
# Running a graph in place of a torch module
# --------------------------------------------------------------------------------------------


class _Session:
    """One compiled graph: numpy in, numpy outputs out; safe to call from `copies` threads at once.

    Everything a call needs is created and run once here, in the loading thread: OpenVINO's Python
    binding initialises statics on its first inference, and two threads doing that at once deadlock
    (seen with two images read in parallel)."""

    def __init__(self, runtime: str, path: Path, precision: str, threads: int, copies: int, probe: tuple[int, ...]):
        import queue

        self.runtime = runtime
        if runtime == "onnxruntime":
            import onnxruntime as ort

            opts = ort.SessionOptions()
            opts.intra_op_num_threads = threads
            opts.inter_op_num_threads = 1
            opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
            # spinning threads fight torch's (the recogniser, the text encoder) for the same cores
            opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
            self.session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])  # thread-safe
            self.input = self.session.get_inputs()[0].name
        else:
            import openvino as ov

            hint = "bf16" if precision == "bf16" else "f32"
            self.compiled = ov.Core().compile_model(
                str(path), "CPU", {"INFERENCE_PRECISION_HINT": hint, "INFERENCE_NUM_THREADS": threads}
            )
            self.requests: queue.SimpleQueue = queue.SimpleQueue()  # an infer request serves one call at a time
            for _ in range(max(1, copies)):
                self.requests.put(self.compiled.create_infer_request())
        for _ in range(max(1, copies) if runtime == "openvino" else 1):
            self(np.zeros(probe, dtype=np.float32))

    def __call__(self, x: np.ndarray) -> list[np.ndarray]:
        x = np.ascontiguousarray(x, dtype=np.float32)
        if self.runtime == "onnxruntime":
            return self.session.run(None, {self.input: x})
        request = self.requests.get()
        try:
            result = request.infer({0: x})
            return [np.array(result[o]) for o in self.compiled.outputs]  # copies: the request reuses its buffers
        finally:
            self.requests.put(request)


class GraphModule:
    """Stands in for a torch module inside easyocr: called with a torch tensor (and, for the recogniser,
    the unused text argument), returns torch tensors the way the module would."""

    def __init__(self, session: _Session, outputs: int):
        self.session, self.outputs = session, outputs

    def eval(self) -> GraphModule:
        return self

    def __call__(self, x: Any, *unused: Any) -> Any:
        import torch

        out = [torch.from_numpy(np.asarray(o)) for o in self.session(x.detach().cpu().numpy())]
        return tuple(out[: self.outputs]) if self.outputs > 1 else out[0]


def install(reader: Any, weights_dir: Path, folder: Path, cfg: Any, threads: int, parallel: int = 1) -> None:
    """Put the runtime's graphs in place of the Reader's torch networks (the detector always; the
    recogniser in `fp32` and `bf16`), each callable from `parallel` threads at once with `threads`
    threads per call. `cfg` is the modality's OcrConfig (runtime, precision, canvas_size). The Reader
    must have been built with quantize=False for `fp32` and `bf16`."""
    runtime, precision, canvas_size = cfg.runtime, cfg.precision, cfg.canvas_size
    det_weights = weights_dir / "craft_mlt_25k.pth"
    detector = graph(folder, det_weights, "detector.onnx", lambda p: export_detector(det_weights, p))
    if precision == "int8":
        detector = graph(
            folder,
            det_weights,
            f"detector-int8-canvas{canvas_size}.onnx",
            lambda p: quantise_detector(detector, p, canvas_size),
        )
    reader.detector = GraphModule(_Session(runtime, detector, precision, threads, parallel, (1, 3, 64, 64)), outputs=2)
    if precision in ("fp32", "bf16"):
        rec_weights = weights_dir / "english_g2.pth"
        model = reader.recognizer
        recogniser = graph(folder, rec_weights, "recogniser.onnx", lambda p: export_recogniser(model, p))
        session = _Session(runtime, recogniser, precision, threads, parallel, (1, 1, 64, 64))
        reader.recognizer = GraphModule(session, outputs=1)
