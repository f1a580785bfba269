"""Sampling throughput: onnxruntime (ddpm.onnx_sampler) against PyTorch (ddpm.samplers), in images/s.

Each case runs the real sampling loop (network + the sampler's update) for its first `k` steps,
after a warm-up, and stops it there; images/s is then batch / (seconds per step * all steps of
the sampler), i.e. extrapolated from k timed steps (the per-step cost does not depend on t). The
table says how many steps were timed. DDPM takes T steps (1000 by default), DDIM 50.

  CPU (default): torch eager float32 vs onnxruntime CPUExecutionProvider float32 (and, with
          --int8, the int8 model of ddpm.quantize, calibrated as `ddpm export` does with
          export.int8; only its speed is measured here, the export's sample gate is not applied).
  --cuda: torch eager on the GPU (float32 with PyTorch's default TF32 convolutions, and bf16
          autocast, ddpm.generate's precision, without its CUDA graphs); onnxruntime's
          CUDAExecutionProvider with IO binding in float32 and float16 (the sampler's arithmetic
          on the host in numpy); and the network alone with inputs and output resident on the
          GPU, to show what the host round trip costs.

Without --checkpoint it builds the default U-Net (params.yaml's base model section: base 64,
mult (1, 2, 2), 2 res blocks, attention at level 2; MNIST 28x28; T = 1000) with random weights,
the layers zeroed at init re-initialised so that eps is not identically 0.

    python bench/bench_onnx_sampling.py --out /tmp/onnx_bench.json                 # CPU, small
    python bench/bench_onnx_sampling.py --cuda --skip-cpu --gpu-batch 256,1024 --out $OUT/onnx_bench.json
    python bench/bench_onnx_sampling.py --smoke --out /tmp/onnx_smoke.json                 # CPU, seconds
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # before onnxruntime: it loads the CUDA and cuDNN libraries that the CUDA provider needs

import numpy as np
import onnxruntime as ort
from torch import nn

from bench.models import randomize_zero_layers
from bench.smoke import SMOKE_OVERRIDES  # --smoke: a CPU runs every CPU case in seconds
from ddpm.checkpoint import load_model, save_checkpoint
from ddpm.config import ExportConfig, config_from_dict, image_shape
from ddpm.export import export_onnx, fp16_path
from ddpm.onnx_model import OnnxDenoiser
from ddpm.onnx_sampler import ddim_sample_loop as ort_ddim
from ddpm.onnx_sampler import p_sample_loop as ort_ddpm
from ddpm.quantize import calibration_feeds, int8_path, quantize_int8
from ddpm.samplers import ddim_sample_loop, p_sample_loop
from ddpm.schedule import Schedule

DDIM_STEPS = 50


class _Stop(Exception):
    """Raised by the counting wrapper to end a sampling loop after its timed steps."""


def counting(fn: Callable[..., Any], limit: int, calls: list[int]) -> Callable[..., Any]:
    """`fn`, but the (limit+1)-th call raises _Stop; calls[0] counts the calls that ran."""
    def wrapped(*args: Any, **kwargs: Any) -> Any:
        if calls[0] >= limit:
            raise _Stop
        calls[0] += 1
        return fn(*args, **kwargs)
    wrapped.num_classes = getattr(fn, "num_classes", None)  # type: ignore[attr-defined]
    return wrapped


def time_steps(run: Callable[[Callable[..., Any]], Any], model: Callable[..., Any], steps: int,
               sync: Callable[[], None], warmup: int = 2) -> tuple[float, int]:
    """Seconds per sampler step over `steps` steps of `run(model)`, after `warmup` steps; (s/step, steps timed)."""
    for n in (warmup, steps):
        calls = [0]
        sync()
        t0 = time.perf_counter()
        try:
            run(counting(model, n, calls))
        except _Stop:
            pass
        sync()
        elapsed = time.perf_counter() - t0
    return elapsed / max(calls[0], 1), calls[0]


def random_checkpoint(path: Path, seed: int = 0, overrides: tuple[str, ...] = ()) -> Path:
    """The default config's U-Net (with `overrides`) with random weights (none left at zero), saved as a checkpoint."""
    cfg = config_from_dict({}, overrides=overrides)
    torch.manual_seed(seed)
    from ddpm.unet import build_unet
    net = randomize_zero_layers(build_unet(cfg.model, image_shape(cfg)))
    save_checkpoint(path, {"model": net.state_dict(), "ema": None, "config": cfg.to_dict(), "step": 0})
    return path


def torch_cases(model: nn.Module, schedule: Schedule, x_T: torch.Tensor, steps: dict[str, int],
                sync: Callable[[], None], autocast: bool = False) -> dict[str, tuple[float, int]]:
    ddim_steps = min(DDIM_STEPS, schedule.num_timesteps)
    ctx = torch.autocast("cuda", dtype=torch.bfloat16) if autocast else torch.autocast("cpu", enabled=False)
    with ctx:
        return {"ddpm": time_steps(lambda m: p_sample_loop(m, schedule, x_T), model, steps["ddpm"], sync),
                "ddim": time_steps(lambda m: ddim_sample_loop(m, schedule, x_T, steps=ddim_steps), model,
                                   steps["ddim"], sync)}


def ort_cases(den: OnnxDenoiser, x_T: np.ndarray, steps: dict[str, int]) -> dict[str, tuple[float, int]]:
    s, ddim_steps = den.schedule, min(DDIM_STEPS, den.schedule.num_timesteps)
    rng = np.random.default_rng(0)
    return {"ddpm": time_steps(lambda m: ort_ddpm(m, s, x_T, generator=rng), den, steps["ddpm"], lambda: None),
            "ddim": time_steps(lambda m: ort_ddim(m, s, x_T, steps=ddim_steps), den, steps["ddim"], lambda: None)}


def filled_binding(den: OnnxDenoiser, batch: int) -> ort.IOBinding:
    """den's GPU IO binding for `batch`, its inputs filled: x ~ N(0, 1) (seed 0), t = 500, labels = 0."""
    binding, bufs = den.bind(batch)
    rng = np.random.default_rng(0)
    bufs["x"].update_inplace(rng.standard_normal((batch, *den.image_shape), dtype=np.float32))
    bufs["t"].update_inplace(np.full(batch, 500, np.int64))
    if "labels" in bufs:
        bufs["labels"].update_inplace(np.zeros(batch, np.int64))
    return binding


def ort_network_only(den: OnnxDenoiser, batch: int, iters: int) -> float:
    """Seconds per network call with x, t and the output already on the GPU (no host copies, no sampler math)."""
    binding = filled_binding(den, batch)
    for _ in range(3):
        den.session.run_with_iobinding(binding)
    t0 = time.perf_counter()
    for _ in range(iters):
        den.session.run_with_iobinding(binding)
    binding.synchronize_outputs()
    return (time.perf_counter() - t0) / iters


@torch.no_grad()
def torch_network_only(model: nn.Module, x: torch.Tensor, iters: int, autocast: bool) -> float:
    t = torch.full((x.shape[0],), 500, device=x.device, dtype=torch.long)
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
        for _ in range(3):
            model(x, t)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(iters):
            model(x, t)
        torch.cuda.synchronize()
    return (time.perf_counter() - t0) / iters


def rows_for(backend: str, precision: str, batch: int, timed: dict[str, tuple[float, int]],
             timesteps: int) -> list[dict[str, Any]]:
    total = {"ddpm": timesteps, "ddim": min(DDIM_STEPS, timesteps)}
    rows = []
    for sampler, (sec, k) in timed.items():
        n = total[sampler]
        rows.append({"backend": backend, "precision": precision, "sampler": sampler, "steps": n, "batch": batch,
                     "timed_steps": k, "ms_per_step": 1e3 * sec, "images_per_s": batch / (sec * n)})
    return rows


def accuracy(den32: OnnxDenoiser, den16: OnnxDenoiser, batch: int) -> dict[str, float]:
    """float16 against float32 onnxruntime on the same provider: network outputs and a 50-step DDIM sample."""
    rng = np.random.default_rng(1)
    x = rng.standard_normal((batch, *den32.image_shape), dtype=np.float32)
    T = den32.schedule.num_timesteps
    net = max(float(np.abs(den16(x, np.full(batch, t), None) - den32(x, np.full(batch, t), None)).max())
              for t in (0, T // 2, T - 1))
    a = ort_ddim(den32, den32.schedule, x, steps=DDIM_STEPS)
    b = ort_ddim(den16, den16.schedule, x, steps=DDIM_STEPS)
    return {"fp16_vs_fp32_network_max_abs": net, "fp16_vs_fp32_ddim50_max_abs": float(np.abs(a - b).max()),
            "fp16_vs_fp32_ddim50_mean_abs": float(np.abs(a - b).mean())}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", default=None, help="a ddpm checkpoint (default: random default-config U-Net)")
    p.add_argument("--out", required=True, help="JSON results path")
    p.add_argument("--cuda", action="store_true", help="also time the GPU cases (needs onnxruntime-gpu and CUDA)")
    p.add_argument("--skip-cpu", action="store_true", help="skip the CPU cases")
    p.add_argument("--cpu-batch", type=int, default=8, help="(default: %(default)s)")
    p.add_argument("--cpu-steps", type=int, default=5, help="steps timed per CPU case (default: %(default)s)")
    p.add_argument("--gpu-batch", type=lambda v: [int(b) for b in v.split(",")], default=[256],
                   help="comma-separated batch sizes (default: 256)")
    p.add_argument("--gpu-steps", type=int, default=50, help="steps timed per GPU case (default: %(default)s)")
    p.add_argument("--int8", action="store_true", help="also time the int8 model on the CPU (ddpm.quantize)")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads for torch and onnxruntime alike (default: each library's own default)")
    p.add_argument("--smoke", action="store_true",
                   help="a small U-Net and schedule, batch 2, 2 timed steps: checks the code path on a CPU")
    args = p.parse_args(argv)
    if args.smoke and args.checkpoint:
        p.error("--smoke builds its own small model; leave out --checkpoint")
    if args.smoke:
        args.cpu_batch, args.cpu_steps, args.gpu_steps = 2, 2, 2
    return args


def cpu_rows(args: argparse.Namespace, model: nn.Module, cfg: Any, onnx_path: Path, result: dict[str, Any],
             cpu_options: ort.SessionOptions | None) -> list[dict[str, Any]]:
    """torch eager float32 against onnxruntime's CPU provider (and the int8 model with --int8)."""
    shape, T = image_shape(cfg), cfg.diffusion.timesteps
    b, k = args.cpu_batch, {"ddpm": args.cpu_steps, "ddim": min(args.cpu_steps, DDIM_STEPS)}
    x_T = torch.randn(b, *shape, generator=torch.Generator().manual_seed(0))
    rows = rows_for("torch eager, CPU", "fp32", b, torch_cases(model, Schedule.from_config(cfg.diffusion),
                                                               x_T, k, lambda: None), T)
    den = OnnxDenoiser(onnx_path, "cpu", session_options=cpu_options)
    rows += rows_for("onnxruntime, CPU", "fp32", b, ort_cases(den, x_T.numpy(), k), T)
    if args.int8:
        ec = ExportConfig()
        t0 = time.perf_counter()
        feeds = calibration_feeds(den, ec.int8_calibration_images, den.sampler_defaults["steps"])  # as ddpm export
        quantize_int8(onnx_path, int8_path(onnx_path), feeds)
        result["int8_quantize_s"] = time.perf_counter() - t0
        den8 = OnnxDenoiser(int8_path(onnx_path), "cpu", session_options=cpu_options)
        rows += rows_for("onnxruntime, CPU", "int8 (QDQ convolutions)", b, ort_cases(den8, x_T.numpy(), k), T)
    return rows


def cuda_rows(args: argparse.Namespace, model: nn.Module, cfg: Any, onnx_path: Path, result: dict[str, Any],
              rows: list[dict[str, Any]]) -> None:
    """torch eager (float32, bf16) and onnxruntime CUDA (float32, float16) per --gpu-batch, appended to `rows`;
    the network alone with everything resident on the GPU into result["network_only_ms"]."""
    if not torch.cuda.is_available():
        raise SystemExit("--cuda: torch sees no CUDA device")
    dev = torch.device("cuda")
    shape, T = image_shape(cfg), cfg.diffusion.timesteps
    gpu_model = model.to(dev)
    schedule = Schedule.from_config(cfg.diffusion).to(dev)
    den32 = OnnxDenoiser(onnx_path, "cuda")
    den16 = OnnxDenoiser(fp16_path(onnx_path), "cuda")
    result.update(gpu=torch.cuda.get_device_name(dev), providers=den32.session.get_providers(),
                  network_only_ms={}, errors={})
    result["accuracy_cuda"] = accuracy(den32, den16, 64)
    k = {"ddpm": args.gpu_steps, "ddim": min(args.gpu_steps, DDIM_STEPS)}
    iters = max(args.gpu_steps, 10)
    for b in args.gpu_batch:
        x_T = torch.randn(b, *shape, generator=torch.Generator().manual_seed(0)).to(dev)
        cases: list[tuple[str, Callable[[], Any]]] = [
            ("torch fp32", lambda b=b, x_T=x_T: rows_for(
                "torch eager, CUDA", "fp32 (TF32 convs: torch default)", b,
                torch_cases(gpu_model, schedule, x_T, k, torch.cuda.synchronize), T)),
            ("torch bf16", lambda b=b, x_T=x_T: rows_for(
                "torch eager, CUDA", "bf16 autocast", b,
                torch_cases(gpu_model, schedule, x_T, k, torch.cuda.synchronize, autocast=True), T)),
            ("ort fp32", lambda b=b, x_T=x_T: rows_for(
                "onnxruntime, CUDA + IO binding", "fp32 (TF32: onnxruntime default)", b,
                ort_cases(den32, x_T.cpu().numpy(), k), T)),
            ("ort fp16", lambda b=b, x_T=x_T: rows_for(
                "onnxruntime, CUDA + IO binding", "fp16 (float32 I/O)", b,
                ort_cases(den16, x_T.cpu().numpy(), k), T)),
        ]
        for name, case in cases:
            try:
                rows += case()
            except Exception as exc:  # one failing case must not lose the others' numbers
                result["errors"][f"{name}, batch {b}"] = f"{type(exc).__name__}: {exc}"
        net = {"onnxruntime fp32": lambda b=b: ort_network_only(den32, b, iters),
               "onnxruntime fp16": lambda b=b: ort_network_only(den16, b, iters),
               "torch fp32": lambda x_T=x_T: torch_network_only(gpu_model, x_T, iters, False),
               "torch bf16 autocast": lambda x_T=x_T: torch_network_only(gpu_model, x_T, iters, True)}
        for name, fn in net.items():
            try:
                result["network_only_ms"][f"{name}, batch {b}"] = 1e3 * fn()
            except Exception as exc:
                result["errors"][f"{name} network only, batch {b}"] = f"{type(exc).__name__}: {exc}"
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=1))  # partial results survive a later failure


def render(result: dict[str, Any], rows: list[dict[str, Any]], export_s: float) -> str:
    table = ["| backend | precision | sampler | steps | batch | timed steps | ms/step | images/s |",
             "|---|---|---|---|---|---|---|---|"]
    table += [f"| {r['backend']} | {r['precision']} | {r['sampler']} | {r['steps']} | {r['batch']} | "
              f"{r['timed_steps']} | {r['ms_per_step']:.1f} | {r['images_per_s']:.3g} |" for r in rows]
    if "network_only_ms" in result:
        table += ["", "Network alone, inputs and output resident on the GPU (ms/call):", ""]
        table += [f"- {k}: {v:.2f}" for k, v in result["network_only_ms"].items()]
        table += ["", f"float16 vs float32 (onnxruntime CUDA, batch 64): {json.dumps(result['accuracy_cuda'])}"]
        table += [f"- error in {k}: {v}" for k, v in result["errors"].items()]
    table += ["", "images/s = batch / (ms/step x steps), extrapolated from the timed steps; "
                  f"export took {export_s:.0f} s."]
    return "\n".join(table)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    cpu_options = None
    if args.threads:
        torch.set_num_threads(args.threads)
        cpu_options = ort.SessionOptions()
        cpu_options.intra_op_num_threads = args.threads
    work = Path(tempfile.mkdtemp(prefix="onnx-bench-"))
    overrides = SMOKE_OVERRIDES if args.smoke else ()
    ckpt = Path(args.checkpoint) if args.checkpoint else random_checkpoint(work / "random.pt", overrides=overrides)
    t0 = time.perf_counter()
    onnx_path = export_onnx(ckpt, work / "model.onnx", ExportConfig(fp16=args.cuda))
    export_s = time.perf_counter() - t0
    model, cfg, _ = load_model(ckpt, "cpu", use_ema=True)
    rows: list[dict[str, Any]] = []
    result: dict[str, Any] = {"env": {"python": platform.python_version(), "torch": torch.__version__,
                                      "onnxruntime": ort.__version__, "platform": platform.platform(),
                                      "cpu_threads": args.threads or "library defaults",
                                      "torch_threads": torch.get_num_threads(), "argv": sys.argv},
                              "model": cfg.to_dict()["model"], "timesteps": cfg.diffusion.timesteps,
                              "export_s": export_s, "onnx_path": str(onnx_path),
                              "checkpoint": args.checkpoint or "random weights, default config", "rows": rows}
    if not args.skip_cpu:
        rows += cpu_rows(args, model, cfg, onnx_path, result, cpu_options)
    if args.cuda:
        cuda_rows(args, model, cfg, onnx_path, result, rows)
    table = render(result, rows, export_s)
    print(table)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({**result, "markdown": table}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
