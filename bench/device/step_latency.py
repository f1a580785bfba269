"""Per-step sampling latency of the shipped paths against the diffusers twin, side by side (one device call).

    python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/diffusers-*.whl  # carry .whl
    PYTHONPATH=/tmp/site:. python3 bench/device/step_latency.py [--batch 256] [--windows 3] [--iters 100] [--out r.json]

One process, bf16 autocast, random weights (zero-initialised layers re-initialised), t = 500, one
network call per DDIM/DDPM step, CUDA-graph replay everywhere. Rows:

- `graph`: the model eager, in CUDA graphs (ddpm.generate.sampling_network, sample.compile off);
- `compile-graph`: torch.compile with its defaults, NCHW, in CUDA graphs;
- `sample.compile`: for ours, ddpm.generate.sampling_network with compile on, exactly as
  `ddpm sample sample.compile=true` runs it (channels-last, coordinate-descent tuning, per-channel
  GroupNorm, padded image convolutions, bf16 weights); for the twin, the same compile settings
  that apply to any network (channels-last, coordinate-descent tuning, bf16 weights).

Median ms per call over `--windows` windows of `--iters` replays.
"""

from __future__ import annotations

import argparse
import json

import torch

from bench import harness as H
from bench.models import forward_flops, ours, reference
from ddpm.generate import sampling_network
from ddpm.graphed import GraphedDenoiser


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--windows", type=int, default=3)
    p.add_argument("--iters", type=int, default=100)
    p.add_argument("--out", default=None)
    args = p.parse_args()
    device, sync = torch.device("cuda"), torch.cuda.synchronize
    ours_spec, twin_spec = ours("mnist"), reference("mnist")
    x = torch.randn(args.batch, *ours_spec.shape, device=device)
    t = torch.full((args.batch,), 500, device=device, dtype=torch.long)
    rows: list[dict] = []
    doc = {"batch": args.batch, "environment": H.environment(device), "rows": rows}
    for spec in (ours_spec, twin_spec):
        model = spec.build().to(device).eval().requires_grad_(False)
        gflop = forward_flops(model, spec.shape, device)[0] / 1e9
        modes = {
            "graph": lambda: sampling_network(model, device, cuda_graphs=True, compile=False),
            "compile-graph": lambda: GraphedDenoiser(torch.compile(model, dynamic=False)),
            # for the twin, sampling_network applies what is not specific to our U-Net (its GroupNorms
            # are nn.GroupNorm, its convolutions not padded)
            "sample.compile": lambda: sampling_network(model, device, True, True, torch.bfloat16),
        }
        for mode, make in modes.items():
            torch._dynamo.reset()
            with torch.no_grad(), torch.autocast("cuda", torch.bfloat16, cache_enabled=False):
                net = make()
                _, first_s = H.timed_once(lambda: net(x, t), sync)  # compile and capture
                timing = H.time_windows(lambda: net(x, t), sync, iters=args.iters, windows=args.windows)
            ms = timing.median_s * 1e3
            row = {"model": spec.name, "mode": mode, "ms_per_step": ms, "gflop_per_image": gflop,
                   "tflops": gflop * args.batch / ms, "first_call_s": first_s}
            rows.append(row)
            print(f"{spec.name:10s} {mode:15s} batch {args.batch}: {ms:7.3f} ms/step  "
                  f"{row['tflops']:6.1f} TFLOP/s  first call {first_s:6.1f} s", flush=True)
    by = {(r["model"], r["mode"]): r["ms_per_step"] for r in rows}
    doc["ours_over_twin"] = {mode: by[("mnist", mode)] / by[("mnist-ref", mode)] for mode in ("graph", "compile-graph", "sample.compile")}
    doc["ours_sample_compile_over_twin_compile_graph"] = by[("mnist", "sample.compile")] / by[("mnist-ref", "compile-graph")]
    print(json.dumps({k: v for k, v in doc.items() if k.startswith("ours")}, indent=1))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(doc, f, indent=2, default=str)


if __name__ == "__main__":
    main()
