"""Run a benchmark script with another form of GroupNorm's compiled statistics, for A/B runs on one machine.

    PYTHONPATH=. python3 bench/device/groupnorm_stats.py FORM [--cudnn-benchmark] SCRIPT [ARGS...]
    e.g. ... groupnorm_stats.py var-mean bench/device/profile_train.py --batch 512 --channels-last

FORM replaces ddpm.layers.per_channel_group_norm (what ddpm.layers.GroupNorm computes when compiled with
`per_channel_stats`) before SCRIPT runs:
  sums          the module's own: per-channel sums of values and of squares, E[x^2] - E[x]^2 per group;
  var-mean      per-channel var_mean (Welford) and the law of total variance (the form before);
  shifted       sums of values less each channel's first value (no loss of digits at large offsets);
  two-pass      per-channel mean, then the mean square about it, and the law of total variance;
  float64-sums  the sums accumulated in float64;
  bf16-output   the sums, with the output cast to bfloat16 under autocast (aten's gives float32).
Each form is group norm; tests/test_unet_losses.py checks the module's own. `--cudnn-benchmark` acts only
where SCRIPT does not set torch.backends.cudnn.benchmark itself (profile_train.py). The result's
`environment.wrapper_argv` records this command.
"""

from __future__ import annotations

import math
import os
import runpy
import sys

import torch

import ddpm.layers as L
from bench.harness import WRAPPER_ARGV


def _prepare(x: torch.Tensor) -> tuple[torch.Tensor, torch.dtype, tuple[int, ...]]:
    dtype = x.dtype
    x = L.channels_last_grad(x)
    return (x.float() if dtype in (torch.float16, torch.bfloat16) else x), dtype, tuple(range(2, x.ndim))


def _total_variance(mean_c: torch.Tensor, var_c: torch.Tensor, g: int) -> tuple[torch.Tensor, torch.Tensor]:
    b, c = mean_c.shape
    mean_c, var_c = mean_c.view(b, g, c // g), var_c.view(b, g, c // g)
    mean = mean_c.mean(-1)
    return mean, var_c.mean(-1) + (mean_c - mean[..., None]).square().mean(-1)


def var_mean(x, groups, weight, bias, eps):
    x, dtype, dims = _prepare(x)
    var_c, mean_c = torch.var_mean(x, dim=dims, correction=0)
    return L.group_norm_from_stats(x, *_total_variance(mean_c, var_c, groups), weight, bias, eps, dtype)


def shifted(x, groups, weight, bias, eps):
    x, dtype, dims = _prepare(x)
    b, c = x.shape[:2]
    first = x[(slice(None), slice(None), *(slice(0, 1),) * (x.ndim - 2))].detach()
    xs, n = x - first, math.prod(x.shape[2:])
    dev_c = xs.sum(dims) / n
    var_c = (xs.square().sum(dims) / n - dev_c.square()).clamp_min(0)
    return L.group_norm_from_stats(x, *_total_variance(first.reshape(b, c) + dev_c, var_c, groups), weight, bias, eps, dtype)


def two_pass(x, groups, weight, bias, eps):
    x, dtype, dims = _prepare(x)
    mean_c = x.mean(dims)
    var_c = (x - mean_c.detach().view(*mean_c.shape, *(1,) * (x.ndim - 2))).square().mean(dims)
    return L.group_norm_from_stats(x, *_total_variance(mean_c, var_c, groups), weight, bias, eps, dtype)


def float64_sums(x, groups, weight, bias, eps):
    x, dtype, dims = _prepare(x)
    b, c, g = x.shape[0], x.shape[1], groups
    n, xd = math.prod(x.shape[2:]) * (c // g), x.double()
    mean = xd.sum(dims).view(b, g, c // g).sum(-1) / n
    var = (xd.square().sum(dims).view(b, g, c // g).sum(-1) / n - mean.square()).clamp_min(0)
    return L.group_norm_from_stats(x, mean.float(), var.float(), weight, bias, eps, dtype)


SUMS = L.per_channel_group_norm


def bf16_output(x, groups, weight, bias, eps):
    out = SUMS(x, groups, weight, bias, eps)
    return out.to(torch.bfloat16) if torch.is_autocast_enabled(x.device.type) else out


FORMS = {"sums": SUMS, "var-mean": var_mean, "shifted": shifted, "two-pass": two_pass,
         "float64-sums": float64_sums, "bf16-output": bf16_output}


def main() -> None:
    args = sys.argv[1:]
    form = args.pop(0) if args else None
    cudnn_benchmark = bool(args) and args[0] == "--cudnn-benchmark"
    if cudnn_benchmark:
        args.pop(0)
    if form not in FORMS or not args:
        raise SystemExit(f"usage: groupnorm_stats.py FORM [--cudnn-benchmark] SCRIPT [ARGS...]; FORM one of {sorted(FORMS)}")
    L.per_channel_group_norm = FORMS[form]
    # Scripts that set cudnn.benchmark themselves (bench_train.py, generate_10k.py) override this;
    # profile_train.py does not.
    torch.backends.cudnn.benchmark = cudnn_benchmark
    os.environ[WRAPPER_ARGV] = " ".join(sys.argv)  # recorded in the result's environment
    print(f"GroupNorm statistics: {form}", flush=True)
    sys.argv = args
    runpy.run_path(args[0], run_name="__main__")

if __name__ == "__main__":
    main()
