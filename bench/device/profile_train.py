"""Where does the compiled training step spend its GPU time? Kernel time by kind, and what that bounds.

    PYTHONPATH=. python3 bench/device/profile_train.py [--model mnist] [--batch 512] [--iters 10]
        [--channels-last] [--no-per-channel-gn] [--no-compile-options] [--no-hashed-dropout]
        [--no-padded-image-convs] [--who] [--inductor KEY=VALUE] [--out prof.json]

The step of bench/bench_train.py (draw, q_sample, forward, loss, backward, clipping, fused AdamW, EMA) around
torch.compile(model, options=ddpm.train.compile_options(False), --inductor settings over them) under bf16
autocast, as `ddpm train` with train.compile, run without CUDA-graph replay under torch.profiler so that each
kernel is recorded (the graph replays the same kernels, but with compile_options(True) its reductions may be
other variants). Kernel kinds as in profile_inference.py, with convolution backward (dgrad, wgrad) counted as
convolution. Besides the split it prints two bounds on the share of the bf16 matmul rate that model FLOPs (3x
forward) can reach: at the kernel time measured, and with every kernel but the convolutions, matmuls and
attention taking no time at all. `--no-per-channel-gn`: aten's GroupNorm instead of statistics from per-channel
sums (ddpm.layers.GroupNorm, as ddpm.train when compiling).
`--who`: which aten operators launch the kernels of kind "other" (layout copies and the like), with their input shapes.
"""

from __future__ import annotations

import argparse
import collections
import json

import torch
from torch.profiler import ProfilerActivity, profile

from bench import harness as H
from bench.bench_train import Trainee, make_step
from bench.device.profile_inference import kernel_times, kind_of
from bench.models import forward_flops, ours

GEMM_KINDS = ("convolution", "matmul", "attention")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="mnist", choices=["mnist", "cifar10"])
    p.add_argument("--batch", type=int, default=512)
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--channels-last", action="store_true")
    p.add_argument("--per-channel-gn", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--compile-options", action=argparse.BooleanOptionalAction, default=True,
                   help="compile with ddpm.train.compile_options(cuda_graphs=False), as ddpm train without "
                        "train.cuda_graphs (the profile runs without a CUDA graph)")
    p.add_argument("--hashed-dropout", action=argparse.BooleanOptionalAction, default=True,
                   help="dropout masks from a hash when compiled, as ddpm train (ddpm.layers.Dropout)")
    p.add_argument("--padded-image-convs", action=argparse.BooleanOptionalAction, default=True,
                   help="with --channels-last, image-channel convolutions padded to 8 channels when compiled, as "
                        "ddpm train (ddpm.layers.ImageConv2d)")
    p.add_argument("--who", action="store_true")
    p.add_argument("--inductor", action="append", type=H.parse_inductor_option, default=[], metavar="KEY=VALUE",
                   help="torch._inductor.config option, repeatable")
    p.add_argument("--out", default=None)
    args = p.parse_args()
    device = torch.device("cuda")
    H.set_inductor_options(args.inductor)
    peak = H.matmul_peak(device, 8192)["tflops"]
    tr = Trainee(ours(args.model), device, args.channels_last, args.per_channel_gn,
                 "ours" if args.compile_options else "none", args.hashed_dropout, dict(args.inductor),
                 args.padded_image_convs)
    gflop = forward_flops(tr.model, tr.spec.shape, device)[0] / 1e9
    tr.model.train()
    opt = torch.optim.AdamW(tr.model.parameters(), lr=1e-4, fused=True)
    loss_buf = torch.zeros((), device=device)
    step = make_step(tr, tr.net("compile"), opt, args.batch, device, True, args.channels_last, loss_buf)
    for _ in range(4):
        step(True)
    torch.cuda.synchronize()
    timing = H.time_windows(lambda: step(True), torch.cuda.synchronize, iters=args.iters, windows=3)
    activities = [ProfilerActivity.CUDA, ProfilerActivity.CPU] if args.who else [ProfilerActivity.CUDA]
    with profile(activities=activities, record_shapes=args.who) as prof:
        for _ in range(args.iters):
            step(True)
        torch.cuda.synchronize()
    per_kernel, counts, by_kind = kernel_times(prof, args.iters)  # ms per step
    total = sum(per_kernel.values())
    gemm = sum(by_kind[k] for k in GEMM_KINDS)
    step_tflop = 3 * gflop * args.batch / 1e3
    bounds = {"kernel_time": 100 * step_tflop / (total / 1e3) / peak,
              "gemm_only": 100 * step_tflop / (gemm / 1e3) / peak,
              "wall_eager_launch": 100 * step_tflop / timing.median_s / peak}
    print(f"{args.model} batch {args.batch}: {3 * gflop:.3f} GFLOP/img per step, bf16 matmul {peak:.1f} TFLOP/s; "
          f"wall {timing.median_s * 1e3:.2f} ms/step (compiled, no CUDA graph), kernels {total:.2f} ms/step")
    for kind, ms in sorted(by_kind.items(), key=lambda kv: -kv[1]):
        print(f"  {kind:18s} {ms:7.3f} ms  {100 * ms / total:5.1f}%")
    print(f"share of the bf16 matmul rate: {bounds['kernel_time']:.1f}% at the kernel time, "
          f"{bounds['gemm_only']:.1f}% if only convolutions, matmuls and attention took time")
    ranked = sorted(per_kernel.items(), key=lambda kv: -kv[1])
    for name, ms in ranked[:40]:
        print(f"  {ms:7.3f} ms x{counts[name] // args.iters:3d}  {kind_of(name):17s} {name[:110]}")
    who = launchers(prof, args.iters) if args.who else None
    for (chain, shapes), ms in (who or [])[:25]:
        print(f"  {ms:7.3f} ms  {chain}  {shapes[:160]}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"model": args.model, "batch": args.batch, "channels_last": args.channels_last,
                       "per_channel_gn": args.per_channel_gn, "inductor": dict(args.inductor),
                       "compile_options": tr.options("compile"), "hashed_dropout": tr.hashed_dropout,
                       "padded_image_convs": tr.padded_image_convs,
                       "train_gflop_per_image": 3 * gflop,
                       "matmul_peak_tflops": peak, "wall_ms": timing.median_s * 1e3, "kernel_ms": total,
                       "by_kind_ms": by_kind, "share_bounds_pct": bounds, "kernels_ms": ranked,
                       "calls_per_step": {n: counts[n] // args.iters for n in per_kernel},
                       "other_kernels_by_launcher": who, "environment": H.environment(device)}, f, indent=2, default=str)


def launchers(prof: profile, iters: int) -> list[tuple[tuple[str, str], float]]:
    """[((operator chain, input shapes), ms per step)] of the kernels of kind "other", largest first; the
    shapes are the launching operator's, then those of the nearest convolution operator above it, if any."""
    out: dict[tuple[str, str], float] = collections.defaultdict(float)
    for e in prof.events():
        for k in getattr(e, "kernels", None) or []:
            if kind_of(k.name) != "other":
                continue
            chain, shapes, parent = [e.name], [e.input_shapes], e.cpu_parent
            while parent is not None and len(chain) < 5:
                chain.append(parent.name)
                if "convolution" in parent.name and len(shapes) == 1:
                    shapes.append(parent.input_shapes[:3])
                parent = parent.cpu_parent
            out[(" < ".join(chain), " / ".join(map(str, shapes)))] += k.duration / 1e3 / iters
    return sorted(out.items(), key=lambda kv: -kv[1])


if __name__ == "__main__":
    main()
