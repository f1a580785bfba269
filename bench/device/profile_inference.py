"""Where does the compiled sampling forward spend its GPU time? Kernel time by kind (one device call).

    PYTHONPATH=. python3 bench/device/profile_inference.py [--batch 1000] [--coord | --shipped] [--iters 20]
        [--sdpa] [--out prof.json]

The default MNIST U-Net (random weights, eval mode), channels-last, per-channel GroupNorm, bf16
autocast, torch.compile (--coord adds coordinate-descent tuning, about 2 extra minutes of compile);
--shipped profiles instead the copy that ddpm.generate.sampling_network compiles for
`sample.compile` (also padded image convolutions, weights cast to bf16 once, coordinate descent).
The compiled model runs without CUDA-graph replay under torch.profiler, so each
kernel is recorded; kernels are the same as in the graph. Kinds: convolution (cuDNN), matmul (cuBLAS
and CUTLASS), attention (SDPA's kernels), triton reductions (GroupNorm statistics, inductor's
`red`/`per` kernels), triton pointwise, other. `--sdpa` also times scaled_dot_product_attention alone
at the U-Net's attention shape (7x7 positions, its heads and head width) under each backend, eager,
with q/k/v reshaped from an NCHW and from a channels-last qkv projection (strided by H x W, or
contiguous per head).
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import json

import torch
from torch.profiler import ProfilerActivity, profile

from bench.device.sampling_variants import mnist_inference
from bench.harness import environment, time_windows
from ddpm.generate import sampling_network

KINDS = (("triton reduction", ("triton_red", "triton_per")),  # first: inductor names kernels after their aten ops
         ("triton pointwise", ("triton_poi", "triton_")),
         ("attention", ("flash", "fmha", "attention", "sdpa")),
         ("convolution", ("conv", "implicit", "xmma_fprop", "fprop", "wgrad", "dgrad")),
         ("matmul", ("gemm", "cutlass", "nvjet", "cublas")))


def kind_of(name: str) -> str:
    low = name.lower()
    for kind, keys in KINDS:
        if any(low.startswith(k) if k.startswith("triton") else k in low for k in keys):
            return kind
    return "other"


def kernel_times(prof: profile, iters: int) -> tuple[dict[str, float], dict[str, int], dict[str, float]]:
    """({kernel: ms per iteration}, {kernel: launches}, {kind: ms per iteration}) of a profile of `iters` iterations."""
    per_kernel: dict[str, float] = collections.defaultdict(float)
    counts: dict[str, int] = collections.defaultdict(int)
    for e in prof.events():
        if e.device_type == torch.autograd.DeviceType.CUDA and not e.name.startswith("## "):  # not annotations
            per_kernel[e.name] += e.device_time / 1e3 / iters
            counts[e.name] += 1
    by_kind: dict[str, float] = collections.defaultdict(float)
    for name, ms in per_kernel.items():
        by_kind[kind_of(name)] += ms
    return per_kernel, counts, by_kind


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=1000)
    p.add_argument("--coord", action="store_true")
    p.add_argument("--shipped", action="store_true")
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--sdpa", action="store_true")
    p.add_argument("--out", default=None)
    args = p.parse_args()
    model, gflop, x, t = mnist_inference(args.batch, channels_last=True)
    sdpa = sdpa_backends(model, args.batch) if args.sdpa else None
    if args.shipped:
        net = sampling_network(model, torch.device("cuda"), cuda_graphs=False, compile=True,
                               autocast_dtype=torch.bfloat16)
    else:
        net = torch.compile(model, dynamic=False, options={"coordinate_descent_tuning": args.coord})
    with torch.no_grad(), torch.autocast("cuda", torch.bfloat16):
        for _ in range(3):
            net(x, t)
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(args.iters):
                net(x, t)
            torch.cuda.synchronize()
    per_kernel, counts, by_kind = kernel_times(prof, args.iters)  # ms per forward
    total = sum(per_kernel.values())
    print(f"batch {args.batch}, {gflop:.3f} GFLOP/img forward, GPU kernel time {total:.3f} ms per forward "
          f"({gflop * args.batch / total:.1f} TFLOP/s over kernel time)")
    for kind, ms in sorted(by_kind.items(), key=lambda kv: -kv[1]):
        print(f"  {kind:18s} {ms:7.3f} ms  {100 * ms / total:5.1f}%")
    ranked = sorted(per_kernel.items(), key=lambda kv: -kv[1])
    for name, ms in ranked[:30]:
        print(f"  {ms:7.3f} ms x{counts[name] // args.iters:3d}  {kind_of(name):17s} {name[:110]}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"batch": args.batch, "coord": args.coord, "shipped": args.shipped, "gflop_per_image": gflop, "kernel_ms": total,
                       "by_kind_ms": by_kind, "kernels_ms": ranked,
                       "calls_per_forward": {n: counts[n] // args.iters for n in per_kernel},
                       "sdpa_ms": sdpa, "environment": environment(torch.device("cuda"))}, f, indent=2, default=str)


def sdpa_backends(model: torch.nn.Module, batch: int) -> dict[str, float | str]:
    """ms per scaled_dot_product_attention call at the model's attention shape, for each SDPA backend,
    with q/k/v as the reshape of an NCHW and of a channels-last qkv output leaves them (strided by H x W,
    or contiguous per head; AttentionBlock now copies the first kind contiguous)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from ddpm.unet import AttentionBlock
    block = next(m for m in model.modules() if isinstance(m, AttentionBlock))
    c, heads, hw = block.qkv.in_channels, block.num_heads, 7 * 7
    out: dict[str, float | str] = {}
    for layout in (torch.contiguous_format, torch.channels_last):
        y = torch.randn(batch, 3 * c, 7, 7, device="cuda", dtype=torch.bfloat16).to(memory_format=layout)
        q, k, v = y.reshape(batch, 3, heads, c // heads, hw).transpose(-1, -2).unbind(dim=1)
        for backend in (None, SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION,
                        SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH):
            name = f"{'channels-last' if layout == torch.channels_last else 'nchw'} {backend.name if backend else 'default'}"
            try:
                with sdpa_kernel(backend) if backend else contextlib.nullcontext(), torch.no_grad():
                    call = lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v)  # noqa: E731
                    call()  # warm-up: the backend's first call may build its plan
                    torch.cuda.synchronize()
                    timing = time_windows(call, torch.cuda.synchronize, iters=50, windows=3)
                out[name] = timing.median_s * 1e3
            except RuntimeError as e:
                out[name] = f"unavailable: {str(e).splitlines()[0][:120]}"
            print(f"sdpa {name:34s} {out[name]}", flush=True)
    return out


if __name__ == "__main__":
    main()
