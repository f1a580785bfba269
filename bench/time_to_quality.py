"""Train the default MNIST model on one GPU and score checkpoints along the way (FID vs minutes of training).

    python bench/time_to_quality.py train --out runs/ttq        # phase 1: train, keep milestone checkpoints
    python bench/time_to_quality.py evaluate --out runs/ttq     # phase 2: FID/precision/recall per milestone
    python bench/time_to_quality.py --smoke [--out DIR] [--data-root DIR]   # both phases, a small model, CPU

Writes <out>/ttq.json and prints a markdown table. Training minutes are wall-clock from the start of
`train()` (compilation and checkpoint writes included) to the moment the milestone checkpoint was written.
With --smoke both phases run on the CPU with bench.smoke's model for a few steps (milestones 2 and 4).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from bench.smoke import SMOKE_DDIM_STEPS, SMOKE_EVALUATE, SMOKE_OVERRIDES, SMOKE_TRAIN
from ddpm.config import load_config
from ddpm.evaluate import evaluate_checkpoint, fid_floor
from ddpm.train import train


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("phase", nargs="?", choices=["train", "evaluate"], help="(with --smoke: both, in turn)")
    p.add_argument("--out", default=None, help="(default: runs/ttq; with --smoke a new temporary folder)")
    p.add_argument("--profile", default=None, help="(default: gpu; with --smoke: cpu)")
    p.add_argument("--milestones", default="1000,2000,5000,10000,20000")
    p.add_argument("--ddpm-at", type=int, default=20000, help="also score this milestone with full-chain DDPM")
    p.add_argument("--ddim-steps", type=int, default=50, help="DDIM steps of each milestone's score")
    p.add_argument("--data-root", default=None, help="where the dataset is (default: data.root)")
    p.add_argument("--smoke", action="store_true", help="both phases on the CPU with a small model, in seconds")
    p.add_argument("overrides", nargs="*")
    args = p.parse_args(argv)
    if args.data_root:
        args.overrides = [f"data.root={args.data_root}", *args.overrides]
    if args.smoke:
        args.out = args.out or tempfile.mkdtemp(prefix="ttq-smoke-")
        args.profile = args.profile or "cpu"
        args.milestones, args.ddpm_at, args.ddim_steps = "2,4", 4, SMOKE_DDIM_STEPS
        args.overrides = [*SMOKE_OVERRIDES, *SMOKE_TRAIN, *SMOKE_EVALUATE, *args.overrides]
    elif args.phase is None:
        p.error("give the phase (train or evaluate), or --smoke")
    args.out, args.profile = Path(args.out or "runs/ttq"), args.profile or "gpu"
    return args


def train_phase(args: argparse.Namespace, milestones: list[int], record: dict[str, Any]) -> None:
    """Train to the last milestone, copying each milestone's checkpoint and noting its wall-clock minutes."""
    cfg = load_config("params.yaml", args.profile, [f"train.out_dir={args.out}", f"train.steps={max(milestones)}",
                                                    "train.checkpoint_every=1000", "train.sample_every=0",
                                                    *args.overrides])  # --smoke: SMOKE_TRAIN's every 2 steps
    start = time.perf_counter()

    def keep(step: int, path: Path) -> None:
        if step in milestones:
            shutil.copy(path, args.out / f"checkpoint_{step:06d}.pt")
            record["milestones"][str(step)] = {"train_minutes": (time.perf_counter() - start) / 60}

    result = train(cfg, on_checkpoint=keep)
    device = torch.cuda.get_device_name() if torch.cuda.is_available() and cfg.runtime.device != "cpu" else "cpu"
    record.update(device=device, torch=torch.__version__, config=cfg.to_dict(),
                  images_per_sec_last_window=result.images_per_sec, final_loss=result.loss)


def evaluate_phase(args: argparse.Namespace, milestones: list[int], record: dict[str, Any], record_path: Path) -> None:
    """FID, precision and recall of each milestone by DDIM (and by DDPM's full chain at --ddpm-at)."""
    scoring = ["evaluate.num_samples=10000", "evaluate.batch_size=1000", *args.overrides]
    cfg = load_config("params.yaml", args.profile, scoring)
    record["fid_floor_10k"] = fid_floor(cfg, n=cfg.evaluate.num_samples)
    for step in milestones:
        ckpt = args.out / f"checkpoint_{step:06d}.pt"
        runs = [("ddim", args.ddim_steps)] + ([("ddpm", cfg.diffusion.timesteps)] if step == args.ddpm_at else [])
        for sampler, steps in runs:
            ev = load_config("params.yaml", args.profile, [*scoring, f"sampler.name={sampler}",
                                                           f"sampler.steps={steps}"])
            m = evaluate_checkpoint(ckpt, ev, args.out / f"eval_{step:06d}_{sampler}")
            record["milestones"].setdefault(str(step), {})[f"{sampler}{steps}"] = m
            print(f"step {step} {sampler}-{steps}: fid {m['fid']:.3f} precision {m['precision']:.3f} "
                  f"recall {m['recall']:.3f} ({m['sample_seconds']:.1f} s sampling)", flush=True)
            record_path.write_text(json.dumps(record, indent=2, default=str))  # a killed run keeps what it scored


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    milestones = [int(m) for m in args.milestones.split(",")]
    record_path = args.out / "ttq.json"
    record = json.loads(record_path.read_text()) if record_path.exists() else {"milestones": {}}
    if args.phase in ("train", None):
        train_phase(args, milestones, record)
    if args.phase in ("evaluate", None):
        evaluate_phase(args, milestones, record, record_path)
    args.out.mkdir(parents=True, exist_ok=True)
    record_path.write_text(json.dumps(record, indent=2, default=str))
    print(json.dumps(record, indent=1, default=str)[:3000])


if __name__ == "__main__":
    main()
