"""How far from their spread are the means of a trained U-Net's GroupNorm groups? (CPU, a few minutes)

    PYTHONPATH=. python bench/groupnorm_conditioning.py --checkpoint runs/q8/ema.pt [--images 64]
        [--timesteps 0,10,100,500,999] [--out bench/results/groupnorm_conditioning.json]
    PYTHONPATH=. python bench/groupnorm_conditioning.py --smoke [--data-root DIR] [--out FILE]   # seconds

With --smoke a small model (bench.smoke) is trained for a few steps in a temporary folder and 8 test
images are noised to timesteps 0, 10 and 19 of its 20.

Compiled, ddpm.layers.GroupNorm takes a group's statistics from sums of values and of squares in
float32 (E[x^2] - E[x]^2), which loses digits where a group's mean is large against its spread. This
records every GroupNorm input of the model's forward passes on MNIST test images noised to the given
timesteps, and for each GroupNorm: the largest |mean| / std over the batch's groups, and the largest
difference between the per-channel form (ddpm.layers.per_channel_group_norm, float32, run eagerly on
the CPU) and group norm computed from its definition in float64, next to aten's float32 group_norm's
own difference. Then the same difference on synthetic groups whose means lie 0.5-1000x their spreads.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F

from bench.harness import environment
from bench.smoke import SMOKE_TIMESTEPS, tiny_checkpoint
from ddpm.checkpoint import load_model
from ddpm.data import load_images, to_model_range
from ddpm.schedule import Schedule, q_sample
from ddpm.layers import GroupNorm, per_channel_group_norm


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", default=None, help="(required; --smoke trains its own)")
    p.add_argument("--images", type=int, default=None, help="(default: 64; with --smoke: 8)")
    p.add_argument("--timesteps", default=None, help="(default: 0,10,100,500,999; with --smoke: 0,10,19)")
    p.add_argument("--data-root", default="data")
    p.add_argument("--out", default=None)
    p.add_argument("--smoke", action="store_true", help="a small model trained here for a few steps, in seconds")
    args = p.parse_args(argv)
    if args.smoke == (args.checkpoint is not None):
        p.error("give --checkpoint, or --smoke (which trains a small model)")
    args.images = args.images or (8 if args.smoke else 64)
    args.timesteps = args.timesteps or (f"0,10,{SMOKE_TIMESTEPS - 1}" if args.smoke else "0,10,100,500,999")
    if args.smoke:
        args.checkpoint = str(tiny_checkpoint(Path(tempfile.mkdtemp(prefix="gn-smoke-")) / "run", args.data_root))
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    model, cfg, ckpt = load_model(args.checkpoint)
    schedule = Schedule.from_config(cfg.diffusion)
    images, _ = load_images(cfg.data.dataset, args.data_root, "test")
    x0 = to_model_range(images[:args.images])
    rows: dict[str, dict[str, float]] = {}

    def record(name: str, norm: GroupNorm):
        def hook(_module, inputs):
            x = inputs[0].detach()
            b, g = x.shape[0], norm.num_groups
            xg = x.double().reshape(b, g, -1)
            ratio = (xg.mean(-1).abs() / xg.std(-1, unbiased=False).clamp_min(1e-12)).max().item()
            want = F.group_norm(x.double(), g, norm.weight.double(), norm.bias.double(), norm.eps)
            ours = (per_channel_group_norm(x, g, norm.weight, norm.bias, norm.eps).double() - want).abs().max().item()
            aten = (F.group_norm(x, g, norm.weight, norm.bias, norm.eps).double() - want).abs().max().item()
            row = rows.setdefault(name, {"max_mean_over_std": 0.0, "max_err_sums": 0.0, "max_err_aten": 0.0})
            row["max_mean_over_std"] = max(row["max_mean_over_std"], ratio)
            row["max_err_sums"] = max(row["max_err_sums"], ours)
            row["max_err_aten"] = max(row["max_err_aten"], aten)
        return hook

    for name, m in model.named_modules():
        if isinstance(m, GroupNorm):
            m.register_forward_pre_hook(record(name, m))
    gen = torch.Generator().manual_seed(0)
    timesteps = [int(t) for t in args.timesteps.split(",")]
    with torch.no_grad():
        for t in timesteps:
            tt = torch.full((len(x0),), t, dtype=torch.long)
            model(q_sample(schedule, x0, tt, torch.randn(x0.shape, generator=gen)), tt)
    synthetic = {}  # groups whose means lie far from their spreads: mean 1, 20, 200; spreads 0.2-2
    spread, weight, bias = (torch.linspace(0.2, 2, 32)[:, None, None], torch.randn(32, generator=gen),
                            torch.randn(32, generator=gen))
    for offset in (1.0, 20.0, 200.0):
        x = (offset + torch.randn(3, 32, 7, 5, generator=gen) * spread).to(memory_format=torch.channels_last)
        want = F.group_norm(x.double(), 8, weight.double(), bias.double(), 1e-5)
        err = (per_channel_group_norm(x, 8, weight, bias, 1e-5).double() - want).abs().max().item()
        synthetic[f"mean {offset:g}, |mean|/std {offset / 2:g}-{offset / 0.2:g}"] = err
        print(f"synthetic groups, mean {offset:g} (|mean|/std {offset / 2:g}-{offset / 0.2:g}): "
              f"max err, sums form {err:.2e}")
    width = max(len(n) for n in rows)
    print(f"{'GroupNorm':{width}}  max |mean|/std  max err, sums form  max err, aten float32")
    for name, r in rows.items():
        print(f"{name:{width}}  {r['max_mean_over_std']:14.3f}  {r['max_err_sums']:18.2e}  {r['max_err_aten']:21.2e}")
    worst = {k: max(r[k] for r in rows.values()) for k in ("max_mean_over_std", "max_err_sums", "max_err_aten")}
    print(f"{'all':{width}}  {worst['max_mean_over_std']:14.3f}  {worst['max_err_sums']:18.2e}  "
          f"{worst['max_err_aten']:21.2e}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"checkpoint": args.checkpoint, "step": ckpt.get("step"), "images": len(x0),
                       "timesteps": timesteps, "per_groupnorm": rows, "worst": worst, "synthetic": synthetic,
                       "environment": environment(torch.device("cpu"))}, f, indent=1)


if __name__ == "__main__":
    main()
