"""Post-training int8 quantization of the exported U-Net, for onnxruntime on the CPU.

`quantize_int8` turns the float32 export into `<name>.int8.onnx` with onnxruntime's static QDQ
quantization: the convolutions get int8 weights (one scale per output channel) and uint8
activations (one scale per tensor), which onnxruntime's CPU provider runs as integer convolutions
(AVX-512 VNNI where the CPU has it). GroupNorm, attention, the time embedding and the additions stay
float32. The activation ranges (MinMax) are calibrated on what the float32 model itself is fed
along DDIM trajectories from noise (`calibration_feeds`): a diffusion U-Net's activations depend on
t, so the calibration covers every timestep that a sampler visits.

The first convolution (the noisy image in) and the last (the prediction out) stay float32. On the
default MNIST U-Net trained for 6,000 steps, 500 DDIM-50 images from the same noise scored FID
36.4 in float32, 39.8 with every convolution quantized and 38.0 with these two kept
(bench/int8_quality.py, BENCHMARKS.md). Samples change: the int8 model is a different, slightly
worse network, so `ddpm.export` gates it on samples, not on the float32 parity bound.

Measured on a CPU with AVX-512 VNNI. Without VNNI (AVX2, AVX-512 without VNNI) onnxruntime's
u8 x s8 kernels can saturate their int16 intermediate sums, and its documentation advises
`reduce_range`; that case was not measured, so the export records whether the CPU that checked the
model had an int8 dot-product instruction (`cpu_int8_dot_product` in its metadata's int8_check).
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import onnx

from ddpm.errors import ExportRejected
from ddpm.onnx_model import OnnxDenoiser
from ddpm.onnx_sampler import class_labels, ddim_sample_loop

Feeds = dict[str, np.ndarray]


def cpu_int8_dot_product() -> bool | None:
    """Whether this CPU has an int8 dot-product instruction (x86 AVX-512 VNNI or AVX-VNNI); None if unknown."""
    try:
        flags = next(line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags"))
    except (OSError, StopIteration):
        return None
    return bool({"avx512_vnni", "avx_vnni"} & set(flags.split()))


def int8_path(out_path: str | Path) -> Path:
    """model.onnx -> model.int8.onnx"""
    p = Path(out_path)
    return p.with_name(f"{p.stem}.int8{p.suffix}")


def calibration_feeds(den: OnnxDenoiser, images: int, steps: int, seed: int = 0) -> list[Feeds]:
    """The network's inputs along `steps`-step DDIM (eta 0) from `images` noise images: one feed dict per call.

    A class-conditional model gets its classes and the null class in turn, so that the
    unconditional branch of classifier-free guidance is calibrated too.
    """
    feeds: list[Feeds] = []

    def record(x: np.ndarray, t: np.ndarray, labels: np.ndarray | None = None) -> np.ndarray:
        feeds.append({k: v.copy() for k, v in den.feeds(x, t, labels).items()})
        return den(x, t, labels)

    x_T = np.random.default_rng(seed).standard_normal((images, *den.image_shape), dtype=np.float32)
    labels = class_labels(images, None, den.num_classes + 1) if den.class_conditional else None
    ddim_sample_loop(record, den.schedule, x_T, labels=labels, prediction=den.prediction, steps=steps)
    return feeds


class _Reader:
    """onnxruntime.quantization's CalibrationDataReader protocol over a list of feed dicts."""

    def __init__(self, feeds: list[Feeds]):
        self._it = iter(feeds)

    def get_next(self) -> Feeds | None:
        return next(self._it, None)


def quantize_int8(fp32_path: str | Path, out_path: str | Path, feeds: list[Feeds],
                  op_types: tuple[str, ...] | None = ("Conv",), keep_image_convs: bool = True) -> Path:
    """Write the int8 twin of the float32 model at `fp32_path` to `out_path`; returns out_path.

    `feeds`: calibration inputs (calibration_feeds). `op_types`: the operators to quantize (None:
    every operator onnxruntime can quantize);
    `keep_image_convs`: leave the first and the last convolution in float32 (the defaults are what
    `ddpm export` uses; the others exist to measure why, bench/int8_quality.py). The preprocessed
    model goes to a temporary folder beside `out_path`, removed whatever happens; onnxruntime puts
    its own intermediate models (about the model's size) in the system's temporary folder. The
    model's metadata is copied as it is; the caller sets its precision.
    """
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    if not feeds:
        raise ValueError("quantize_int8 needs at least one calibration feed")
    out = Path(out_path)
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=f".{out.name}.tmp-") as tmp:
        pre = Path(tmp) / "preprocessed.onnx"
        # Shape inference and onnxruntime's graph optimisations first, as onnxruntime's documentation advises.
        quant_pre_process(str(fp32_path), str(pre), skip_symbolic_shape=True)
        convs = [n.name for n in onnx.load(str(pre), load_external_data=False).graph.node if n.op_type == "Conv"]
        if keep_image_convs and len(convs) < 3:
            raise ExportRejected(f"{fp32_path}: {len(convs)} convolutions; int8 quantization keeps the first and "
                                 f"the last in float32 and needs at least one more")
        kept = [convs[0], convs[-1]] if keep_image_convs else []
        quantize_static(str(pre), str(out), _Reader(feeds), quant_format=QuantFormat.QDQ, per_channel=True,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                        op_types_to_quantize=None if op_types is None else list(op_types), nodes_to_exclude=kept,
                        calibrate_method=CalibrationMethod.MinMax)
    return out
