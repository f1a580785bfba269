"""What int8 quantization (ddpm.quantize) costs in sample quality and buys in CPU speed, on a trained model.

    python bench/int8_quality.py --checkpoint runs/q8/ema.pt --out bench/results/int8_quality.json \
        [--n 500] [--variants shipped all-convs all-ops]
    python bench/int8_quality.py --smoke --out /tmp/int8_smoke.json [--data-root DIR]   # seconds, CPU

With --smoke a small model (bench.smoke) is trained for a few steps in a temporary folder and 32
images are sampled by 5-step DDIM, scored with the pinned feature net.

Exports the checkpoint's EMA U-Net to float32 ONNX, quantizes it per variant with the calibration
of `ddpm export` (export.int8_calibration_images/steps), then samples n images by DDIM-50 from the
same noise (seed 0) with onnxruntime on the CPU in float32 and with each int8 model, and scores
every set with the evaluation's metrics (FID against the test set in our feature net's space,
precision, recall; ddpm.evaluate.score_images). It also times one network call at batch 16 per
model (2 threads, best of 5). Variants:

  shipped    convolutions quantized, the first and the last kept float32 (what `ddpm export` writes)
  all-convs  every convolution quantized
  all-ops    every operator onnxruntime can quantize (convolutions, matmuls, additions, ...), every conv

FID at n = 500 is biased upwards (the real-vs-real floor at this n is printed beside it); the
variants are compared with each other at the same n and the same noise.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
import onnxruntime as ort
import torch

from bench import harness as H
from bench.smoke import SMOKE_DDIM_STEPS, SMOKE_OVERRIDES, tiny_checkpoint
from ddpm.config import ExportConfig, load_config
from ddpm.evaluate import score_images
from ddpm.export import export_onnx
from ddpm.onnx_model import OnnxDenoiser, no_spin_options
from ddpm.onnx_sampler import sample_model_range, to_uint8
from ddpm.quantize import calibration_feeds, quantize_int8

VARIANTS = {"shipped": dict(), "all-convs": dict(keep_image_convs=False),
            "all-ops": dict(op_types=None, keep_image_convs=False)}


def options(threads: int) -> ort.SessionOptions:
    o = no_spin_options()
    o.intra_op_num_threads = threads
    return o


def network_ms(den: OnnxDenoiser, batch: int = 16) -> float:
    """Best of 5 single calls at `batch` at the middle timestep (500 of 1000), after one warm-up call."""
    rng = np.random.default_rng(1)
    t = np.full(batch, den.schedule.num_timesteps // 2, np.int64)
    x = rng.standard_normal((batch, *den.image_shape), dtype=np.float32)
    den(x, t)
    return 1e3 * H.time_windows(lambda: den(x, t), lambda: None, iters=1, windows=5).min_s


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", default=None, help="(required; --smoke trains its own)")
    p.add_argument("--out", required=True)
    p.add_argument("--n", type=int, default=None, help="images per model (default: 500; with --smoke: 32)")
    p.add_argument("--steps", type=int, default=50, help="DDIM steps (default: %(default)s)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--feature-net", default=None, help="(default: runs/features/mnist.pt; with --smoke: pinned)")
    p.add_argument("--data-root", default=None, help="where the dataset is (default: data.root)")
    p.add_argument("--variants", nargs="+", default=["shipped"], choices=list(VARIANTS))
    p.add_argument("--smoke", action="store_true", help="a small model trained here for a few steps, in seconds")
    args = p.parse_args(argv)
    if args.smoke == (args.checkpoint is not None):
        p.error("give --checkpoint, or --smoke (which trains a small model)")
    args.n = args.n or (32 if args.smoke else 500)
    args.steps = SMOKE_DDIM_STEPS if args.smoke else args.steps
    args.feature_net = args.feature_net or ("pinned" if args.smoke else "runs/features/mnist.pt")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    work = Path(tempfile.mkdtemp(prefix="int8-quality-"))
    data_root = [f"data.root={args.data_root}"] if args.data_root else []
    cfg = load_config("params.yaml", None, ["runtime.device=cpu", "sampler.steps=50", *data_root,
                                            *(SMOKE_OVERRIDES if args.smoke else ())])
    if args.smoke:
        args.checkpoint = str(tiny_checkpoint(work / "run", args.data_root or cfg.data.root))
    ec = cfg.export
    fp32 = export_onnx(args.checkpoint, work / "model.onnx", ExportConfig())
    den32 = OnnxDenoiser(fp32, "cpu", session_options=options(args.threads))
    calibration_steps = den32.distilled_steps or cfg.sampler.steps  # a student's own, as ddpm export
    feeds = calibration_feeds(den32, ec.int8_calibration_images, calibration_steps)
    x_T = np.random.default_rng(0).standard_normal((args.n, *den32.image_shape), dtype=np.float32)
    result: dict = {"checkpoint": args.checkpoint, "n": args.n, "sampler": "ddim", "steps": args.steps,
                    "calibration": {"images": ec.int8_calibration_images, "ddim_steps": calibration_steps},
                    "env": {"python": platform.python_version(), "torch": torch.__version__,
                            "onnxruntime": ort.__version__, "platform": platform.platform(),
                            "threads": args.threads, "argv": sys.argv}, "models": {}}

    def run(name: str, den: OnnxDenoiser, ref: np.ndarray | None) -> np.ndarray:
        t0 = time.perf_counter()
        x = sample_model_range(den, args.n, "ddim", args.steps, x_T=x_T, batch_size=250)
        sample_s = time.perf_counter() - t0
        scores = score_images(to_uint8(x), cfg, args.feature_net, "cpu")
        row = {k: scores[k] for k in ("fid", "fid_floor", "precision", "recall")}
        row.update(sample_s=sample_s, network_ms_batch16=network_ms(den))
        if ref is not None:
            diff = np.abs(np.clip(x, -1, 1) - np.clip(ref, -1, 1))
            row.update(mean_abs_diff=float(diff.mean()), max_abs_diff=float(diff.max()),
                       images_max_diff_over_0_5=int((diff.reshape(args.n, -1).max(1) > 0.5).sum()))
        result["models"][name] = row
        print(name, json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in row.items()}), flush=True)
        Path(args.out).write_text(json.dumps(result, indent=1))
        return x

    ref = run("float32", den32, None)
    for v in args.variants:
        path = quantize_int8(fp32, work / f"model.{v}.int8.onnx", feeds, **VARIANTS[v])
        run(f"int8 {v}", OnnxDenoiser(path, "cpu", session_options=options(args.threads)), ref)


if __name__ == "__main__":
    main()
