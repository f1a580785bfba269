"""10,000 MNIST images by 50-step DDIM through ddpm.generate.generate, the path `ddpm sample` and the
evaluation use: wall time per run, noise to uint8 images on the host.

    PYTHONPATH=. python3 bench/device/generate_10k.py [--batch 1000] [--runs 3] [--no-compile] [--cudnn-benchmark]
        [--phases] [--without padding] [--without bf16-weights]
        [--out results.json]

Default MNIST U-Net with random weights (zero-initialised layers re-initialised), bf16 autocast,
sample.compile=true (channels-last + torch.compile with coordinate-descent tuning + CUDA graphs).
The first run includes the compile; later runs reuse it. `--without` switches off one step of
sample.compile (the padded image convolutions, the bf16 weights), to compare on one machine. `--phases` then re-enacts one call in
parts, without its copies to the host: making the sampling network and its first forward (dynamo,
inductor's cache, CUDA-graph capture), the sampling loops alone with that network prepared, and the
network's graph replays alone.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
from unittest import mock

import torch

from bench.harness import environment, timed_once
from bench.models import ours
from ddpm.config import image_shape
import ddpm.generate as generate_mod
from ddpm.generate import generate
from ddpm.samplers import ddim_sample_loop
from ddpm.schedule import Schedule


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=10000)
    p.add_argument("--batch", type=int, default=1000)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--cudnn-benchmark", action="store_true", help="torch.backends.cudnn.benchmark = True")
    p.add_argument("--phases", action="store_true", help="also time the phases of one call (see above)")
    p.add_argument("--without", action="append", choices=["padding", "bf16-weights"], default=[])
    p.add_argument("--out", default=None)
    args = p.parse_args()
    switches = contextlib.ExitStack()  # held for the rest of the process
    if "padding" in args.without:
        switches.enter_context(mock.patch.object(generate_mod, "pad_image_channels", lambda model: model))
    if "bf16-weights" in args.without:
        shipped = generate_mod.sampling_network
        switches.enter_context(mock.patch.object(generate_mod, "sampling_network",
                                                 lambda model, device, cuda_graphs=True, compile=False,
                                                 autocast_dtype=None: shipped(model, device, cuda_graphs, compile)))
    torch.backends.cudnn.benchmark = args.cudnn_benchmark
    spec = ours("mnist")
    cfg = spec.cfg
    cfg = dataclasses.replace(cfg, sample=dataclasses.replace(cfg.sample, sampler="ddim", steps=50,
                                                              batch_size=args.batch, compile=args.compile))
    model = spec.build().cuda()
    schedule = Schedule.from_config(cfg.diffusion)
    walls = []
    for r in range(args.runs):
        (images, _), wall = timed_once(lambda: generate(model, schedule, cfg, args.images, seed=r),
                                       torch.cuda.synchronize)
        walls.append(wall)
        assert images.shape == (args.images, 1, 28, 28) and images.dtype == torch.uint8
        print(f"run {r}: {args.images} images, DDIM-50, batch {args.batch}, compile={args.compile}: "
              f"{walls[-1]:.2f} s", flush=True)
    doc = {"images": args.images, "batch": args.batch, "compile": args.compile,
           "cudnn_benchmark": args.cudnn_benchmark, "without": args.without, "wall_s_runs": walls,
           "wall_s_warm": min(walls[1:]) if len(walls) > 1 else None, "environment": environment(torch.device("cuda"))}
    if args.phases:
        doc["phases_s"] = phases(model, schedule, cfg, args.images)
        print("phases (s):", json.dumps(doc["phases_s"]), flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(doc, f, indent=2, default=str)


def phases(model: torch.nn.Module, schedule: Schedule, cfg, images: int) -> dict[str, float]:
    """One generate() call's work re-enacted in parts (no host copies), each timed between device synchronisations."""
    sync = torch.cuda.synchronize
    b = cfg.sample.batch_size
    model.eval()
    schedule = schedule.to("cuda")
    x = torch.randn((b, *image_shape(cfg)), device="cuda")
    t = torch.full((b,), 999, device="cuda", dtype=torch.long)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, cache_enabled=False)
    with torch.no_grad(), autocast:
        net, setup = timed_once(lambda: generate_mod.sampling_network(model, torch.device("cuda"), True, cfg.sample.compile,
                                                                 torch.bfloat16), sync)
        _, first = timed_once(lambda: net(x, t), sync)
        batches = -(-images // b)
        _, loop = timed_once(lambda: [ddim_sample_loop(net, schedule, x, steps=cfg.sample.steps)
                                      for _ in range(batches)], sync)
        _, replay = timed_once(lambda: [net(x, t) for _ in range(batches * cfg.sample.steps)], sync)
    return {"make_network": setup, "first_forward": first, "sampling_loop": loop, "network_replays": replay,
            "batches": batches, "steps": cfg.sample.steps}


if __name__ == "__main__":
    main()
