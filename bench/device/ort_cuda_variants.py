"""How fast can onnxruntime's CUDA provider run the exported U-Net? (exploration, one device call)

    PYTHONPATH=. python3 bench/device/ort_cuda_variants.py --out $OUT/ort_variants.json [--batches 256,1024] [--trt]

The default MNIST U-Net with random weights is exported by `ddpm.export.export_onnx` (float32 and its
float16 twin). Then, network alone (x, t and the output bound on the GPU, no sampler arithmetic):
  - the float16 twin with the CUDA provider's defaults, with `prefer_nhwc`, with its CUDA graph;
  - the twin after onnxruntime's U-Net fusions (`onnxruntime.transformers.optimizer`, model_type
    "unet": GroupNorm + SiLU and skip-add GroupNorm kernels, NHWC convolutions), the same options;
  - with --trt, the TensorRT provider in float16 on the float32 export (needs libnvinfer);
  - beside them in the same process, PyTorch under bf16 autocast: eager, one CUDA graph per call,
    torch.compile + CUDA graph (the `compile-graph` mode of bench_sampling.py) and, with --shipped,
    the network `sample.compile=true` samples with (ddpm.generate.sampling_network: channels-last,
    padded image convolutions, bf16 weights, coordinate descent; about 3 minutes of compile per batch).
Each row gives ms per call and max |out - PyTorch float32| on a fixed batch of 64 (t = 500).
"""

from __future__ import annotations

import argparse
import collections
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import torch  # before onnxruntime: it loads the CUDA and cuDNN libraries

import numpy as np
import onnx
import onnxruntime as ort

from bench import harness as H
from bench.bench_onnx_sampling import filled_binding, random_checkpoint
from ddpm.checkpoint import load_model
from ddpm.config import ExportConfig
from ddpm.export import _to_fp16, export_onnx, fp16_path
from ddpm.generate import sampling_network
from ddpm.graphed import GraphedDenoiser
from ddpm.onnx_model import OnnxDenoiser


def timed(call: Callable[[], Any], sync: Callable[[], None]) -> float:
    """Median seconds per call over 3 windows of 50 calls (bench.harness.time_windows), after 3 warm-up calls."""
    for _ in range(3):
        call()
    return H.time_windows(call, sync, iters=50, windows=3).median_s


def fused_unet(fp32_path: Path, out_dir: Path) -> tuple[Path, dict[str, int]]:
    """onnxruntime's U-Net fusions on the float32 export, then float16 as ddpm.export does; returns the path and op counts."""
    from onnxruntime.transformers.optimizer import optimize_model
    half = _to_fp16(optimize_model(str(fp32_path), model_type="unet", opt_level=0, use_gpu=True).model,
                    shape_inference=False)  # onnx's shape inference does not know the fused (com.microsoft) ops
    path = out_dir / "fused.fp16.onnx"
    onnx.save_model(half, str(path))
    return path, dict(collections.Counter(n.op_type for n in half.graph.node))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True)
    p.add_argument("--batches", default="256,1024")
    p.add_argument("--trt", action="store_true")
    p.add_argument("--no-compile", action="store_true", help="skip torch.compile (about 25 s per batch size)")
    p.add_argument("--shipped", action="store_true", help="also time sampling_network's compiled copy")
    args = p.parse_args()
    batches = [int(b) for b in args.batches.split(",")]
    work = Path(tempfile.mkdtemp())
    ckpt = random_checkpoint(work / "random.pt")
    fp32 = export_onnx(ckpt, work / "model.onnx", ExportConfig(fp16=True))
    fp16 = fp16_path(fp32)
    try:
        fused, fused_ops = fused_unet(fp32, work)
    except Exception as exc:  # the optimizer's imports or a pattern it cannot handle: time the rest
        fused, fused_ops = work / "missing.onnx", {"error": f"{type(exc).__name__}: {exc}"}
    doc: dict[str, Any] = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "onnxruntime": ort.__version__,
                           "fused_ops": fused_ops, "rows": []}
    print("fused graph ops:", fused_ops, flush=True)

    model, _, _ = load_model(ckpt, "cuda", use_ema=False)
    model.eval()
    gen = torch.Generator().manual_seed(0)
    x64 = torch.randn(64, 1, 28, 28, generator=gen)
    t64 = torch.full((64,), 500, dtype=torch.long)
    with torch.no_grad():
        ref = model(x64.cuda(), t64.cuda()).float().cpu().numpy()

    def row(name: str, batch: int, ms: float | None, diff: float | None, note: str = "") -> None:
        r = {"case": name, "batch": batch, "ms_per_call": ms, "max_abs_diff_vs_fp32": diff, "note": note}
        doc["rows"].append(r)
        print(json.dumps(r), flush=True)
        Path(args.out).write_text(json.dumps(doc, indent=1))

    ort_cases = [("ort fp16", fp16, {}), ("ort fp16 prefer_nhwc", fp16, {"prefer_nhwc": "1"}),
                 ("ort fp16 cuda graph", fp16, {"enable_cuda_graph": "1"}),
                 ("ort fused fp16", fused, {}), ("ort fused fp16 cuda graph", fused, {"enable_cuda_graph": "1"}),
                 ("ort fused fp16 prefer_nhwc cuda graph", fused, {"prefer_nhwc": "1", "enable_cuda_graph": "1"})]
    for name, path, opts in ort_cases:
        for b in batches:
            try:
                den = OnnxDenoiser(path, "cuda", cuda_options=opts)  # a session per batch: one CUDA graph each
                diff = float(np.abs(OnnxDenoiser(path, "cuda", cuda_options={k: v for k, v in opts.items()
                                                                               if k != "enable_cuda_graph"})(
                    x64.numpy(), t64.numpy()) - ref).max())
                binding = filled_binding(den, b)
                ms = 1e3 * timed(lambda: den.session.run_with_iobinding(binding), binding.synchronize_outputs)
                row(name, b, ms, diff)
            except Exception as exc:  # an option or fused kernel the provider rejects: record it, go on
                row(name, b, None, None, f"{type(exc).__name__}: {str(exc)[:300]}")

    if args.trt:
        for b in batches:
            try:
                trt_opts = {"trt_fp16_enable": "1", "trt_engine_cache_enable": "1",
                            "trt_engine_cache_path": str(work / "trt"), "trt_cuda_graph_enable": "1",
                            "trt_profile_min_shapes": "x:1x1x28x28,t:1", "trt_profile_max_shapes": f"x:{b}x1x28x28,t:{b}",
                            "trt_profile_opt_shapes": f"x:{b}x1x28x28,t:{b}"}
                t0 = time.perf_counter()
                sess = ort.InferenceSession(str(fp32), providers=[("TensorrtExecutionProvider", trt_opts),
                                                                  "CUDAExecutionProvider"])
                xb = torch.randn(b, 1, 28, 28, device="cuda")
                tb = torch.full((b,), 500, device="cuda", dtype=torch.long)
                yb = torch.empty_like(xb)
                binding = sess.io_binding()
                for name_, tens in (("x", xb), ("t", tb)):
                    binding.bind_input(name_, "cuda", 0, np.float32 if tens.is_floating_point() else np.int64,
                                       list(tens.shape), tens.data_ptr())
                binding.bind_output(sess.get_outputs()[0].name, "cuda", 0, np.float32, list(yb.shape), yb.data_ptr())
                if sess.get_providers()[0] != "TensorrtExecutionProvider":  # onnxruntime falls back silently
                    raise RuntimeError(f"the TensorRT provider did not load (active: {sess.get_providers()}); "
                                       f"it needs the TensorRT libraries (libnvinfer)")
                sess.run_with_iobinding(binding)
                build_s = time.perf_counter() - t0
                ms = 1e3 * timed(lambda: sess.run_with_iobinding(binding), torch.cuda.synchronize)
                xb[:64].copy_(x64.cuda())
                tb.fill_(500)
                sess.run_with_iobinding(binding)
                torch.cuda.synchronize()
                diff = float((yb[:64].cpu().numpy() - ref).__abs__().max())
                row("ort tensorrt fp16", b, ms, diff, f"providers {sess.get_providers()[:1]}, build {build_s:.0f} s")
            except Exception as exc:
                row("ort tensorrt fp16", b, None, None, f"{type(exc).__name__}: {str(exc)[:300]}")

    for b in batches:
        x = torch.randn(b, 1, 28, 28, device="cuda")
        t = torch.full((b,), 500, device="cuda", dtype=torch.long)
        variants: list[tuple[str, Callable[..., torch.Tensor]]] = [("torch bf16 eager", model),
                                                                   ("torch bf16 cuda graph", GraphedDenoiser(model))]
        if not args.no_compile:
            variants.append(("torch bf16 compile + cuda graph", GraphedDenoiser(torch.compile(model, dynamic=False))))
        if args.shipped:
            variants.append(("torch bf16 sample.compile (sampling_network)",
                             sampling_network(model, torch.device("cuda"), cuda_graphs=True, compile=True,
                                              autocast_dtype=torch.bfloat16)))
        for name, net in variants:
            with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16, cache_enabled=False):
                ms = 1e3 * timed(lambda: net(x, t), torch.cuda.synchronize)
                xs = torch.cat([x64.cuda(), x[64:]]) if b >= 64 else x
                diff = float((net(xs, torch.full_like(t, 500)).float()[:64].cpu().numpy() - ref).__abs__().max())
            row(name, b, ms, diff)
        torch._dynamo.reset()
    print(json.dumps(doc, indent=1))


if __name__ == "__main__":
    sys.exit(main())
