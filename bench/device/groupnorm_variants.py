"""Which GroupNorm form compiles to the fastest kernels? (exploration, one device call)

    PYTHONPATH=. python3 bench/device/groupnorm_variants.py [--infer] [--train] [--coord] [--kinds K,...] [--layouts L,...]

GroupNorm statistics are reductions over each group's (C/G) x H x W elements, which are strided in
channels-last memory. The forms of ddpm.layers.GroupNorm's forward compared (--kinds):
  aten          nn.GroupNorm's, aten's group_norm (what inductor got before);
  channel-sums  per-channel E[x] and E[x^2] over H x W, combined per group (written for this script);
  ours          the module's own: per-channel sums combined per group (once var_mean and the law of
                total variance; bench/device/groupnorm_stats.py compares those forms) when
                compiled with `per_channel_stats` set, aten's otherwise (--infer's model has it set;
                --train's does not, so there it is aten's: bench_train.py --per-channel-gn times it).
On the default MNIST U-Net (random weights), bf16 autocast, torch.compile, in one process:
  --infer  the forward pass at batch 1024 in a CUDA graph (--layouts nchw,channels-last);
  --train  the whole training step (bench_train's compile-graph mode) at batch 512, NCHW.
Each inference line also gives max |output - aten's output| (eager, float32 with TF32 convolutions;
'ours' is aten's in eager mode, so 0 by construction: tests/test_unet_losses.py checks its compiled form).
"""

from __future__ import annotations

import argparse
from typing import ContextManager
from unittest import mock

import torch
import torch._inductor.config as inductor_config
from torch import nn

from bench import harness as H
from bench.bench_train import Trainee, run_case
from bench.device.sampling_variants import mnist_inference
from bench.models import forward_flops, ours
import ddpm.layers
from ddpm.graphed import GraphedDenoiser

ATEN_FORWARD = nn.GroupNorm.forward
OURS_FORWARD = ddpm.layers.GroupNorm.forward


def channel_sums_forward(self: nn.GroupNorm, x: torch.Tensor) -> torch.Tensor:
    """GroupNorm of x [B, C, H, W] from per-channel E[x] and E[x^2] (float32, as aten under autocast)."""
    b, c = x.shape[:2]
    g = self.num_groups
    xf = x.float()
    mean_c = xf.mean(dim=(2, 3))  # [B, C]
    sq_c = xf.square().mean(dim=(2, 3))  # [B, C]
    mean = mean_c.view(b, g, -1).mean(-1)  # [B, G]
    var = (sq_c.view(b, g, -1).mean(-1) - mean.square()).clamp_min(0)
    rstd = torch.rsqrt(var + self.eps)
    per_channel = lambda v: v[:, :, None].expand(b, g, c // g).reshape(b, c)  # noqa: E731  [B, G] -> [B, C]
    scale = per_channel(rstd) * self.weight  # [B, C]
    shift = self.bias - per_channel(mean) * scale
    return xf * scale[:, :, None, None] + shift[:, :, None, None]


KINDS = {"aten": ATEN_FORWARD, "channel-sums": channel_sums_forward, "ours": OURS_FORWARD}


def groupnorm(kind: str) -> ContextManager:
    """ddpm.layers.GroupNorm computed by aten's group_norm, this script's E[x] and E[x^2] sums, or its own form."""
    return mock.patch.object(ddpm.layers.GroupNorm, "forward", KINDS[kind])


def infer(kind: str, channels_last: bool, batch: int, coord: bool) -> None:
    model, gflop, x, t = mnist_inference(batch, channels_last)
    with torch.no_grad():
        with groupnorm("aten"):
            ref = model(x[:64], t[:64])
        with groupnorm(kind):
            diff = float((model(x[:64], t[:64]) - ref).abs().max())
    sync = torch.cuda.synchronize
    with groupnorm(kind), inductor_config.patch({"coordinate_descent_tuning": coord}):
        g = GraphedDenoiser(torch.compile(model, dynamic=False))
        with torch.no_grad(), torch.autocast("cuda", torch.bfloat16, cache_enabled=False):
            _, compile_s = H.timed_once(lambda: g(x, t), sync)
            timing = H.time_windows(lambda: g(x, t), sync, iters=50, windows=3)
    ms = timing.median_s * 1e3
    print(f"infer {kind:12s} {'channels-last' if channels_last else 'NCHW':13s} coord={coord!s:5s} batch {batch}: "
          f"{ms:7.3f} ms/step  {batch * gflop / ms:6.1f} TFLOP/s  10k DDIM-50 at this rate ~ {10000 / batch * 50 * ms / 1e3:5.2f} s  "
          f"fp32 max|diff| {diff:.2e}  compile+capture {compile_s:5.1f} s", flush=True)


def train(kind: str, batch: int, peak: float, patch=None, mode: str = "compile-graph") -> dict:
    """bench_train's training step for the default MNIST U-Net, NCHW, under `patch(kind)` (default: groupnorm)."""
    torch._dynamo.reset()
    device = torch.device("cuda")
    args = argparse.Namespace(bf16=True, channels_last=False, warmup=3, smoke=False, window_s=0.25, windows=5)
    spec = ours("mnist")
    with (patch or groupnorm)(kind):
        tr = Trainee(spec, device, channels_last=False, per_channel_gn=False)  # the patch picks the form
        args.mnist_units = tr.units
        flops = forward_flops(tr.model, spec.shape, device)[0]
        row = run_case(tr, batch, mode, args, device, flops, peak, H.Budget(10_000, 60))
    print(f"train {kind:12s} NCHW {mode} batch {batch}: {row.get('ms_per_step', float('nan')):7.2f} ms/step  "
          f"{row.get('images_per_s', 0):8.0f} img/s  {row.get('pct_of_bf16_matmul', 0):5.1f}% of bf16 matmul  "
          f"compile {row.get('compile_s', '-')} s  loss {row.get('loss')}  {row['status']} {row.get('error', '')}",
          flush=True)
    return row


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--infer", action="store_true")
    p.add_argument("--train", action="store_true")
    p.add_argument("--coord", action="store_true", help="coordinate-descent tuning for the inference cases")
    p.add_argument("--kinds", default="aten,channel-sums,ours", help="GroupNorm forms, from " + ", ".join(KINDS))
    p.add_argument("--layouts", default="nchw,channels-last", help="inference memory layouts")
    a = p.parse_args()
    print(torch.__version__, torch.cuda.get_device_name(), flush=True)
    peak = H.matmul_peak(torch.device("cuda"), 8192)["tflops"] if a.train else 0.0
    print(f"bf16 matmul peak {peak:.1f} TFLOP/s", flush=True)
    for kind in a.kinds.split(","):
        if a.infer:
            for cl in [layout == "channels-last" for layout in a.layouts.split(",")]:
                infer(kind, cl, 1024, a.coord)
        if a.train:
            train(kind, 512, peak)
