"""Post-training int8 quantization of the exported U-Net, for onnxruntime on the CPU.

`quantize_int8` turns the float32 export into `<name>.int8.onnx` with onnxruntime's static QDQ
quantization: the convolutions get int8 weights (one scale per output channel) and uint8
activations (one scale per tensor), which onnxruntime's CPU provider runs as integer convolutions
(AVX-512 VNNI where the CPU has it). GroupNorm, attention, the time embedding and the additions stay
float32. The activation ranges (MinMax) are calibrated on what the float32 model itself is fed
along DDIM trajectories from noise (`calibration_feeds`): a diffusion U-Net's activations depend on
t, so the calibration covers every timestep that a sampler visits.

The first convolution (the noisy image in) and the last (the prediction out) stay float32. On the
default MNIST U-Net, keeping these two lost less sample quality than quantizing every convolution
(bench/int8_quality.py; bench/results/int8_quality.json, docs/experiments/2026-11-26-int8-cpu.md).
Samples change: the int8 model is a different, slightly
worse network, so `ddpm.export` gates it on samples, not on the float32 parity bound.

Schemes (`export.int8_scheme`, recorded in the model's metadata with the reason):
- `portable` (default): weights on 7 bits (`reduce_range`). On a CPU without an int8 dot-product
  instruction (AVX2 only, or AVX-512 without VNNI) onnxruntime multiplies u8 activations by s8 weights
  with VPMADDUBSW, which adds two products into a saturating int16: 255 * 127 * 2 overflows it, and
  the samples of a full-range model drift far from float32's. With |w| <= 64 the pair sum stays
  below 255 * 64 * 2 = 32,640 < 32,767, so the integer results are exact on every x86 CPU, and the
  model exported on one machine computes the same on another.
- `vnni`: weights on 8 bits, a little closer to float32, exact only where the CPU has AVX-512 VNNI
  or AVX-VNNI (32-bit accumulation). Exporting it on a CPU without them is refused (no int8 file),
  and `OnnxDenoiser` warns when such a model is loaded on one.
`DDPM_CPU_INT8_DOT_PRODUCT=0|1` overrides the CPU detection (tests, and machines whose
/proc/cpuinfo does not tell the truth, such as emulators).
"""

from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path
from typing import Any, Literal, get_args

import numpy as np
import onnx

from ddpm.errors import ExportRejected
from ddpm.onnx_model import OnnxDenoiser
from ddpm.onnx_sampler import class_labels, ddim_sample_loop
from ddpm.schedule_math import sampling_timesteps

log = logging.getLogger(__name__)
Feeds = dict[str, np.ndarray]
Int8Scheme = Literal["portable", "vnni"]
INT8_SCHEMES: tuple[str, ...] = get_args(Int8Scheme)
CPU_OVERRIDE_ENV = "DDPM_CPU_INT8_DOT_PRODUCT"


def cpu_int8_dot_product() -> bool | None:
    """Whether this CPU has an int8 dot-product instruction (x86 AVX-512 VNNI or AVX-VNNI); None if unknown.

    DDPM_CPU_INT8_DOT_PRODUCT=0 or 1 overrides what /proc/cpuinfo says."""
    forced = os.environ.get(CPU_OVERRIDE_ENV)
    if forced is not None:
        if forced not in ("0", "1"):
            raise ValueError(f"{CPU_OVERRIDE_ENV}={forced!r}: set it to 0 or 1, or unset it")
        return forced == "1"
    try:
        flags = next(line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags"))
    except (OSError, StopIteration):
        return None
    return bool({"avx512_vnni", "avx_vnni"} & set(flags.split()))


def int8_path(out_path: str | Path) -> Path:
    """model.onnx -> model.int8.onnx"""
    p = Path(out_path)
    return p.with_name(f"{p.stem}.int8{p.suffix}")


def int8_scheme_record(scheme: Int8Scheme) -> dict[str, Any]:
    """What the int8 model's metadata says of its scheme: the name, reduce_range, the CPU that made it, and why.

    Raises ExportRejected (one line) when `scheme` needs an int8 dot-product instruction this CPU lacks."""
    if scheme not in INT8_SCHEMES:
        raise ValueError(f"int8 scheme {scheme!r}: choose one of {', '.join(INT8_SCHEMES)}")
    dot = cpu_int8_dot_product()
    if scheme == "vnni" and not dot:
        raise ExportRejected("export.int8_scheme=vnni needs a CPU with AVX-512 VNNI or AVX-VNNI and this one "
                             f"{'has neither' if dot is False else 'could not be checked'} (its int16 sums would "
                             "saturate); use export.int8_scheme=portable; no int8 model was written")
    why = ("7-bit weights: u8 x s8 products cannot saturate an int16 pair sum, so the model computes the same "
           "on every x86 CPU, with or without VNNI" if scheme == "portable" else
           "8-bit weights: exact only on CPUs with AVX-512 VNNI or AVX-VNNI, which this one has")
    return {"name": scheme, "reduce_range": scheme == "portable", "exported_on_cpu_int8_dot_product": dot,
            "why": why}


def warn_if_saturating(path: Path, meta: dict[str, Any]) -> None:
    """Log a warning when an int8 model of the `vnni` scheme is loaded on a CPU without an int8 dot product."""
    scheme = (meta.get("int8_scheme") or {}).get("name")
    if meta.get("precision") == "int8" and scheme != "portable" and cpu_int8_dot_product() is False:
        log.warning("%s: its 8-bit weights need AVX-512 VNNI or AVX-VNNI, which this CPU lacks: its int16 sums "
                    "can saturate and its samples drift; export it with export.int8_scheme=portable", path)


def _ddim(model: Any, den: OnnxDenoiser, x_T: np.ndarray, labels: np.ndarray | None, steps: int) -> np.ndarray:
    """`steps`-step DDIM (eta 0) through `model` on den's grid: a student's own (ddpm.schedule_math)."""
    seq = sampling_timesteps(den.schedule.num_timesteps, steps, den.distilled_steps)
    return ddim_sample_loop(model, den.schedule, x_T, labels=labels, prediction=den.prediction, steps=steps,
                            timesteps=seq)


def calibration_feeds(den: OnnxDenoiser, images: int, steps: int, seed: int = 0) -> list[Feeds]:
    """The network's inputs along `steps`-step DDIM (eta 0) from `images` noise images: one feed dict per call,
    on the grid the sampler visits (a distilled student's own).

    A class-conditional model gets its classes and the null class in turn, so that the
    unconditional branch of classifier-free guidance is calibrated too.
    """
    feeds: list[Feeds] = []

    def record(x: np.ndarray, t: np.ndarray, labels: np.ndarray | None = None) -> np.ndarray:
        feeds.append({k: v.copy() for k, v in den.feeds(x, t, labels).items()})
        return den(x, t, labels)

    x_T = np.random.default_rng(seed).standard_normal((images, *den.image_shape), dtype=np.float32)
    labels = class_labels(images, None, den.num_classes + 1) if den.class_conditional else None
    _ddim(record, den, x_T, labels, steps)
    return feeds


class _Reader:
    """onnxruntime.quantization's CalibrationDataReader protocol over a list of feed dicts."""

    def __init__(self, feeds: list[Feeds]):
        self._it = iter(feeds)

    def get_next(self) -> Feeds | None:
        return next(self._it, None)


def quantize_int8(fp32_path: str | Path, out_path: str | Path, feeds: list[Feeds], scheme: Int8Scheme = "portable",
                  op_types: tuple[str, ...] | None = ("Conv",), keep_image_convs: bool = True) -> Path:
    """Write the int8 twin of the float32 model at `fp32_path` to `out_path`; returns out_path.

    `feeds`: calibration inputs (calibration_feeds). `scheme`: see the module's docstring.
    `op_types`: the operators to quantize (None: every operator onnxruntime can quantize);
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
                        calibrate_method=CalibrationMethod.MinMax, reduce_range=scheme == "portable")
    return out


def int8_check_images(den: OnnxDenoiser, n: int, steps: int, seed: int = 0) -> np.ndarray:
    """The images int8_check compares: DDIM (`steps`, eta 0, a student's own grid) from n noise images seeded by
    `seed`, in [-1, 1]."""
    x_T = np.random.default_rng(seed).standard_normal((n, *den.image_shape), dtype=np.float32)
    labels = class_labels(n, None, den.num_classes) if den.class_conditional else None
    return np.clip(_ddim(den, den, x_T, labels, steps), -1, 1)


def int8_check(den32: OnnxDenoiser, den8: OnnxDenoiser, n: int, steps: int, mean_atol: float,
               seed: int = 0, reference: np.ndarray | None = None) -> dict[str, Any]:
    """DDIM (`steps`, eta 0) from the same n noise images with the float32 and the int8 model.

    Returns the mean and max |x_int8 - x_fp32| in [-1, 1]; raises ExportRejected when the mean
    exceeds `mean_atol`. The max is reported, not gated: a few images may settle on another mode
    (another digit) from the same noise, while the mean measures how far the int8 model drifts.
    `reference`: the float32 model's images (int8_check_images of den32), when already computed.
    """
    a = int8_check_images(den8, n, steps, seed)
    b = int8_check_images(den32, n, steps, seed) if reference is None else reference
    diff = np.abs(a - b)
    check = {"n": n, "steps": steps, "mean_abs_diff": float(diff.mean()), "max_abs_diff": float(diff.max()),
             "cpu_int8_dot_product": cpu_int8_dot_product()}
    if not check["mean_abs_diff"] <= mean_atol:
        raise ExportRejected(f"{den8.path.name}: its DDIM samples differ from the float32 model's by "
                             f"{check['mean_abs_diff']:.3g} on average (max {check['max_abs_diff']:.3g}), more than "
                             f"export.int8_mean_atol = {mean_atol:.3g}; no int8 model was written")
    return check
