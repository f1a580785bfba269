"""Train the default MNIST model on one GPU and score checkpoints along the way (FID vs minutes of training).

    python bench/time_to_quality.py train --out runs/ttq        # phase 1: train, keep milestone checkpoints
    python bench/time_to_quality.py evaluate --out runs/ttq     # phase 2: FID/precision/recall per milestone

Writes <out>/ttq.json and prints a markdown table. Training minutes are wall-clock from the start of
`train()` (compilation and checkpoint writes included) to the moment the milestone checkpoint was written.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

import torch

from ddpm.config import load_config
from ddpm.evaluate import evaluate_checkpoint, fid_floor
from ddpm.train import train


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("phase", choices=["train", "evaluate"])
    p.add_argument("--out", default="runs/ttq")
    p.add_argument("--profile", default="gpu")
    p.add_argument("--milestones", default="1000,2000,5000,10000,20000")
    p.add_argument("--ddpm-at", type=int, default=20000, help="also score this milestone with 1000-step DDPM")
    p.add_argument("overrides", nargs="*")
    args = p.parse_args()
    out = Path(args.out)
    milestones = [int(m) for m in args.milestones.split(",")]
    record_path = out / "ttq.json"
    record = json.loads(record_path.read_text()) if record_path.exists() else {"milestones": {}}
    if args.phase == "train":
        cfg = load_config("params.yaml", args.profile, [f"train.out_dir={out}", f"train.steps={max(milestones)}",
                                                        "train.checkpoint_every=1000", "train.sample_every=0",
                                                        *args.overrides])
        start = time.perf_counter()

        def keep(step: int, path: Path) -> None:
            if step in milestones:
                shutil.copy(path, out / f"checkpoint_{step:06d}.pt")
                record["milestones"][str(step)] = {"train_minutes": (time.perf_counter() - start) / 60}

        result = train(cfg, on_checkpoint=keep)
        record.update(device=torch.cuda.get_device_name(), torch=torch.__version__, config=cfg.to_dict(),
                      images_per_sec_last_window=result.images_per_sec, final_loss=result.loss)
    else:
        cfg = load_config("params.yaml", args.profile, ["evaluate.num_samples=10000", "evaluate.batch_size=1000",
                                                        *args.overrides])
        record["fid_floor_10k"] = fid_floor(cfg, n=10000)
        for step in milestones:
            ckpt = out / f"checkpoint_{step:06d}.pt"
            runs = [("ddim", 50)] + ([("ddpm", 1000)] if step == args.ddpm_at else [])
            for sampler, steps in runs:
                ev = load_config("params.yaml", args.profile, ["evaluate.num_samples=10000", "evaluate.batch_size=1000",
                                                               f"sampler.name={sampler}", f"sampler.steps={steps}",
                                                               *args.overrides])
                m = evaluate_checkpoint(ckpt, ev, out / f"eval_{step:06d}_{sampler}")
                record["milestones"].setdefault(str(step), {})[f"{sampler}{steps}"] = m
                print(f"step {step} {sampler}-{steps}: fid {m['fid']:.3f} precision {m['precision']:.3f} "
                      f"recall {m['recall']:.3f} ({m['sample_seconds']:.1f} s sampling)", flush=True)
                record_path.write_text(json.dumps(record, indent=2, default=str))  # a killed run keeps what it scored
    out.mkdir(parents=True, exist_ok=True)
    record_path.write_text(json.dumps(record, indent=2, default=str))
    print(json.dumps(record, indent=1, default=str)[:3000])


if __name__ == "__main__":
    main()
