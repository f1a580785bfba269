"""What the benchmarks' `--smoke` runs use: a small two-level U-Net on a short schedule, and a checkpoint
of it trained for a few CPU steps by `ddpm train`'s own loop, for the benchmarks that need a trained model.

A smoke run checks a benchmark's code path on a CPU in seconds (tests/test_bench_smoke.py); its numbers
mean nothing.
"""

from __future__ import annotations

from pathlib import Path

from ddpm.config import Config, load_config

SMOKE_TIMESTEPS, SMOKE_DDIM_STEPS = 20, 5
# A small two-level U-Net and a short schedule, sampled by SMOKE_DDIM_STEPS-step DDIM.
SMOKE_OVERRIDES = ("model.base_channels=8", "model.channel_mult=[1,2]", "model.num_res_blocks=1",
                   "model.attention_levels=[1]", "model.num_heads=2", "model.norm_groups=4",
                   f"diffusion.timesteps={SMOKE_TIMESTEPS}", f"sampler.steps={SMOKE_DDIM_STEPS}")
# A few steps of the training loop on the CPU, with every hook (log, checkpoint, final grid) firing.
SMOKE_TRAIN = ("runtime.device=cpu", "train.compile=false", "train.cuda_graphs=false", "train.channels_last=false",
               "train.batch_size=8", "train.steps=4", "train.warmup_steps=0", "train.log_every=2",
               "train.checkpoint_every=2", "train.sample_every=0")
# Scoring on the CPU, a few samples at a time.
SMOKE_EVALUATE = ("evaluate.num_samples=32", "evaluate.batch_size=32")


def smoke_config(data_root: str | Path, out_dir: str | Path, params: str | None = None,
                 profile: str | None = None) -> Config:
    """The settings of a smoke run: `params` (None: the built-in defaults) and `profile`, then the smoke values."""
    return load_config(params, profile, [*SMOKE_OVERRIDES, *SMOKE_TRAIN, *SMOKE_EVALUATE, f"data.root={data_root}",
                                         f"train.out_dir={out_dir}"])


def tiny_checkpoint(out_dir: str | Path, data_root: str | Path) -> Path:
    """Train the smoke model for SMOKE_TRAIN's few steps into `out_dir` (a new folder); returns its checkpoint."""
    from ddpm.train import train

    return Path(train(smoke_config(data_root, out_dir)).checkpoint)

