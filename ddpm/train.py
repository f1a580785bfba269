"""The training loop (Algorithm 1): AdamW with warm-up, gradient clipping, EMA, bf16 autocast on CUDA.

The whole training set sits on the training device as one uint8 tensor; batches, timesteps and noise
come from one seeded generator whose state is checkpointed with the global RNG, so a resumed run on
the CPU retraces an uninterrupted one exactly.

Under `torchrun --nproc_per_node=N` (WORLD_SIZE > 1) the same function trains with
DistributedDataParallel: each rank draws `train.batch_size` images from its own shard of the data
with its own timesteps and noise, so the global batch is batch_size * N at the same `train.lr`
(scale lr yourself if you want). Gradients are all-reduced; EMA, checkpoints, loss.csv, sample grids
and the callbacks run on rank 0 only. A checkpoint resumes on any number of ranks; resuming on
the same number restores every rank's generator, otherwise ranks are reseeded from (seed, rank, step).
"""

from __future__ import annotations

import contextlib
import copy
import logging
import math
import os
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
import torch.distributed as dist
import yaml
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from ddpm.checkpoint import config_of, load_checkpoint, save_checkpoint
from ddpm.config import Config, TrainConfig, image_shape
from ddpm.errors import ConfigError, RunFolderError, TrainingDivergedError, TrainingInterrupted
from ddpm.data import load_images, to_model_range
from ddpm.generate import generate, save_grid
from ddpm.layers import use_hashed_dropout, use_padded_image_convs, use_per_channel_group_norm
from ddpm.losses import p_losses
from ddpm.resources import check_training_fits
from ddpm.run_folder import CHECKPOINT_NAME, LOSS_LOG_NAME, RunFiles, owned, resume_changes  # noqa: F401 (re-exported)
from ddpm.schedule import Schedule
from ddpm.unet import build_unet

log = logging.getLogger(__name__)

LOSS_FIELDS = ("step", "loss", "lr", "images_per_sec")


@dataclass(frozen=True)
class TrainResult:
    checkpoint: Path
    step: int
    loss: float
    images_per_sec: float


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(device_name: str) -> DistInfo:
    """Join the process group torchrun describes (NCCL on CUDA, gloo on the CPU); a no-op for one process."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo()
    info = DistInfo(int(os.environ["RANK"]), world, int(os.environ.get("LOCAL_RANK", "0")))
    if not dist.is_initialized():
        use_cuda = device_name != "cpu" and torch.cuda.is_available()
        if use_cuda:
            torch.cuda.set_device(info.local_rank)
        dist.init_process_group("nccl" if use_cuda else "gloo")
    return info


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("train.device: 'cuda' was asked for, but no CUDA device is available; use 'cpu' or 'auto'")
    return torch.device("cuda", local_rank) if name == "cuda" else torch.device(name)


@torch.no_grad()
def ema_update(ema: nn.Module, model: nn.Module, decay: float | torch.Tensor) -> None:
    """ema <- decay * ema + (1 - decay) * model, over all parameters at once.

    `decay` may be a 0-d device tensor, so that a captured CUDA graph can take a new value each step.
    """
    e, m = list(ema.parameters()), list(model.parameters())
    if isinstance(decay, torch.Tensor):
        torch._foreach_mul_(e, decay)
        torch._foreach_add_(e, torch._foreach_mul(m, 1.0 - decay))
    else:
        torch._foreach_lerp_(e, m, 1.0 - decay)


def lr_at_step(step: int, tc: TrainConfig) -> float:
    """The learning rate of `step`: linear warm-up over warmup_steps, then constant or a cosine decay to 0."""
    if tc.warmup_steps and step < tc.warmup_steps:
        return tc.lr * (step + 1) / tc.warmup_steps
    if tc.lr_decay == "cosine":
        span = max(1, tc.steps - tc.warmup_steps)
        return tc.lr * 0.5 * (1 + math.cos(math.pi * min(1.0, (step - tc.warmup_steps) / span)))
    return tc.lr


def ema_decay_at(step: int, cfg_decay: float, warmup: bool) -> float:
    """EMA decay with warm-up min(decay, (1 + step) / (10 + step)), so early weights fade fast."""
    return min(cfg_decay, (1 + step) / (10 + step)) if warmup else cfg_decay


def compile_options(cuda_graphs: bool) -> dict[str, Any]:
    """Inductor settings for the compiled training step (torch.compile's `options`); with `cuda_graphs`
    it also calls keep_multi_kernel_choices_in_memory (below).

    By default inductor writes a computed value to memory when it has several users and more than 4
    reads or 30 operations. In the backward that wrote the float32 gradient of each GroupNorm output
    (GroupNorm, scale-shift, SiLU and dropout recomputed) and read it back in the next kernel;
    recomputing it in each user reads less. With the step in a CUDA graph, each reduction is also
    compiled twice (the whole row in registers, and looped) and the faster one is chosen by timing on
    the first call; outside a graph that choice costs a host-side dispatch per launch, more than it
    saves. Measured on the MNIST step: docs/experiments/2026-11-26-recompute-rather-than-store.md.
    """
    options: dict[str, Any] = {"realize_reads_threshold": 64, "realize_opcount_threshold": 1000,
                               "realize_acc_reads_threshold": 64}
    if cuda_graphs:
        options["triton.multi_kernel"] = 1
        keep_multi_kernel_choices_in_memory()
    return options


def keep_multi_kernel_choices_in_memory() -> None:
    """Turn off inductor's on-disk record of which multi-kernel variant won, for this process and its
    children (TORCHINDUCTOR_DISABLE_MULTI_KERNEL_CACHE=1, unless set); for any compile with
    `triton.multi_kernel`. With torch 2.11 a compile served from a warm cache failed reading that record
    back (TypeError in triton's JITFunction.cache_key), so a second run on the same machine stopped.
    Each process times the variants again at their first call.
    """
    os.environ.setdefault("TORCHINDUCTOR_DISABLE_MULTI_KERNEL_CACHE", "1")


class _StopFlag:
    """Turns SIGINT/SIGTERM into a flag checked between steps, so a step is never cut in half."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._old: dict[int, Any] = {}

    def __enter__(self) -> "_StopFlag":
        try:
            for s in (signal.SIGINT, signal.SIGTERM):
                self._old[s] = signal.signal(s, self._handle)
        except ValueError:  # not the main thread: signals stay with the caller
            pass
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        self.signum = signum

    def __exit__(self, *exc: Any) -> None:
        for s, h in self._old.items():
            signal.signal(s, h)


def train(cfg: Config, resume: bool = False, on_log: Callable[[int, dict[str, float]], None] | None = None,
          on_sample: Callable[[int, Path], None] | None = None,
          on_checkpoint: Callable[[int, Path], None] | None = None, overwrite: bool = False) -> TrainResult:
    """Train the U-Net described by `cfg`; write checkpoints, loss.csv and sample grids under cfg.train.out_dir.

    The folder is held by this run (ddpm.run_folder.owned: a second process fails at once). A folder
    with a checkpoint needs `resume` (settings that would change the model, the diffusion or the data
    are refused, other changes are logged) or `overwrite` (the previous run's files move to
    `<out_dir>.replaced-<UTC time>/`). Nothing in it is written before the first step has finished.
    `on_log(step, metrics)` receives loss, lr and images_per_sec every `log_every` steps;
    `on_sample(step, png_path)` every saved grid; `on_checkpoint(step, path)` after every checkpoint. Raises TrainingDivergedError on a non-finite loss
    and TrainingInterrupted on SIGINT/SIGTERM, after saving what is worth keeping.
    """
    rank = init_distributed(cfg.train.device)
    device = resolve_device(cfg.train.device, rank.local_rank)
    check_training_fits(cfg, device)  # before the folder is taken or anything is allocated
    out_dir = Path(cfg.train.out_dir)
    with owned(out_dir, "ddpm train") if rank.is_main else contextlib.nullcontext():
        ckpt = _checkpoint_to_resume(cfg, out_dir / CHECKPOINT_NAME, resume, overwrite)
        # config.yaml: the resolved settings beside the run, readable without loading the checkpoint
        files = RunFiles(out_dir, yaml.safe_dump(cfg.to_dict(), sort_keys=False).encode(), LOSS_FIELDS,
                         int(ckpt["step"]) if ckpt else 0, replace=overwrite and (out_dir / CHECKPOINT_NAME).exists())
        return _train(cfg, rank, device, ckpt, files, on_log, on_sample, on_checkpoint)


def _checkpoint_to_resume(cfg: Config, ckpt_path: Path, resume: bool, overwrite: bool) -> dict[str, Any] | None:
    """The checkpoint this run continues, or None; refuses, before anything is written, a run it would replace
    unasked and a resume that would change the model, the diffusion or the data."""
    if resume and overwrite:
        raise RunFolderError("--resume and --overwrite exclude each other: continue the run, or start it over")
    if ckpt_path.exists() and not (resume or overwrite):
        raise RunFolderError(
            f"{ckpt_path.parent} already holds a run ({ckpt_path.name}); pass --resume to continue it, or --overwrite "
            f"to start over (its files move to {ckpt_path.parent.name}.replaced-<UTC time>/ beside it)")
    if not (resume and ckpt_path.exists()):
        if resume:
            log.info("no checkpoint at %s; starting from step 0", ckpt_path)
        return None
    ckpt = load_checkpoint(ckpt_path)
    changes = resume_changes(config_of(ckpt, ckpt_path).to_dict(), cfg.to_dict(), int(ckpt["step"]), ckpt_path.parent)
    if changes:
        log.info("resuming %s with changed settings: %s", ckpt_path.parent, "; ".join(changes))
    return ckpt


def _train(cfg: Config, rank: DistInfo, device: torch.device, ckpt: dict[str, Any] | None, files: RunFiles,
           on_log: Callable[[int, dict[str, float]], None] | None, on_sample: Callable[[int, Path], None] | None,
           on_checkpoint: Callable[[int, Path], None] | None) -> TrainResult:
    tc = cfg.train
    out_dir = Path(tc.out_dir)
    ckpt_path = out_dir / CHECKPOINT_NAME
    torch.manual_seed(tc.seed + rank.rank)
    images, labels = load_images(cfg.data.dataset, cfg.data.root, "train")  # uint8 [N, C, H, W], int64 [N]
    shard = slice(rank.rank * len(images) // rank.world_size, (rank.rank + 1) * len(images) // rank.world_size)
    images, labels = images[shard].to(device), labels[shard].to(device)
    schedule = Schedule.from_config(cfg.diffusion).to(device)
    model = build_unet(cfg.model, image_shape(cfg)).to(device)
    if tc.channels_last:
        model = model.to(memory_format=torch.channels_last)
        images = images.contiguous(memory_format=torch.channels_last)
    ema = copy.deepcopy(model).eval().requires_grad_(False)
    fused = device.type == "cuda"
    graphed = tc.cuda_graphs and device.type == "cuda" and rank.world_size == 1
    if tc.cuda_graphs and not graphed:
        log.warning("train.cuda_graphs needs one CUDA process; running eagerly")
    # On CUDA the learning rate and EMA decay are device tensors, so a captured graph sees new values.
    lr_t = torch.tensor(tc.lr, device=device) if graphed else None
    decay_t = torch.tensor(tc.ema_decay, device=device) if graphed else None
    opt = torch.optim.AdamW(model.parameters(), lr=lr_t if graphed else tc.lr, weight_decay=tc.weight_decay,
                            fused=fused, capturable=graphed)
    gen = torch.Generator(device=device).manual_seed(tc.seed + 1_000_003 * rank.rank)

    step = 0
    if ckpt is not None:
        model.load_state_dict(ckpt["model"])
        ema.load_state_dict(ckpt["ema"])
        opt.load_state_dict(ckpt["optimizer"])
        if graphed:
            for g in opt.param_groups:
                g["lr"] = lr_t
        step = int(ckpt["step"])
        rng = ckpt["rng"]
        if rng.get("world_size", 1) == rank.world_size:
            torch.set_rng_state(rng["torch"][rank.rank])
            gen.set_state(rng["generator"][rank.rank].to(gen.get_state().device))
        else:  # a different number of ranks: fresh, distinct streams that still depend only on (seed, rank, step)
            torch.manual_seed(tc.seed + rank.rank + 7919 * step)
            gen.manual_seed(tc.seed + 1_000_003 * rank.rank + 7919 * step)
        log.info("resumed from %s at step %d (written by %d rank(s), now %d)", ckpt_path, step,
                 rng.get("world_size", 1), rank.world_size)

    def lr_at(s: int) -> float:
        return lr_at_step(s, tc)

    def gather_states(state: torch.Tensor) -> list[torch.Tensor]:
        if rank.world_size == 1:
            return [state]
        out = [None] * rank.world_size
        dist.all_gather_object(out, state)
        return out

    def checkpoint() -> None:
        rng = {"world_size": rank.world_size, "torch": gather_states(torch.get_rng_state()),
               "generator": gather_states(gen.get_state().cpu())}
        if rank.is_main:
            files.start()
            save_checkpoint(ckpt_path, {
                "model": model.state_dict(), "ema": ema.state_dict(), "optimizer": opt.state_dict(), "step": step,
                "config": cfg.to_dict(), "rng": rng,
            })
            if on_checkpoint is not None:
                on_checkpoint(step, ckpt_path)
        if rank.world_size > 1:
            dist.barrier()

    ddp = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None) \
        if rank.world_size > 1 else model
    if tc.compile:  # compiled: GroupNorm statistics from per-channel sums, dropout masks from a hash (ddpm.layers)
        use_hashed_dropout(use_per_channel_group_norm(model))
        use_padded_image_convs(model, tc.channels_last)  # image-channel convolutions in channels-last kernels
    net = torch.compile(ddp, options=compile_options(graphed)) if tc.compile else ddp
    n, null_label = len(images), model.num_classes

    def draw() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """A batch (Algorithm 1, lines 2-4): x0 [B, C, H, W] from this rank's shard, t [B], noise, labels."""
        idx = torch.randint(0, n, (tc.batch_size,), device=device, generator=gen)
        x0 = to_model_range(images[idx])
        t = torch.randint(0, schedule.num_timesteps, (tc.batch_size,), device=device, generator=gen)
        noise = torch.randn(x0.shape, device=device, generator=gen)
        y = None
        if cfg.model.class_conditional:  # label dropout trains the null class for classifier-free guidance
            drop = torch.rand(tc.batch_size, device=device, generator=gen) < tc.label_dropout
            y = torch.where(drop, torch.full_like(labels[idx], null_label), labels[idx])
        return x0, t, noise, y

    def update(x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor, y: torch.Tensor | None) -> torch.Tensor:
        """One optimisation step (Algorithm 1, line 5) plus the EMA; returns the loss (0-d, on the device)."""
        with autocast:
            loss = p_losses(net, schedule, x0, t, noise, labels=y, prediction=cfg.diffusion.prediction,
                            weighting=cfg.diffusion.loss_weighting, min_snr_gamma=cfg.diffusion.min_snr_gamma)
        opt.zero_grad(set_to_none=not graphed)
        loss.backward()
        if tc.grad_clip > 0:
            nn.utils.clip_grad_norm_(model.parameters(), tc.grad_clip)
        opt.step()
        if rank.is_main:
            ema_update(ema, model, decay_t if graphed else ema_decay_at(step, tc.ema_decay, tc.ema_warmup))
        return loss.detach().float()

    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=tc.bf16 and device.type == "cuda",
                              cache_enabled=not graphed)
    graph, static, start_step = None, None, step
    loss_sum = torch.zeros((), device=device)
    no_bad = torch.iinfo(torch.long).max
    first_bad = torch.full((), no_bad, device=device, dtype=torch.long)
    progress = _progress(tc.steps, step, enabled=rank.is_main)
    last_loss, ips, t0, since = float("nan"), 0.0, time.perf_counter(), step
    model.train()
    try:
        with _StopFlag() as stop:
            while step < tc.steps:
                x0, t, noise, y = draw()
                if graphed:
                    lr_t.fill_(lr_at(step))
                    decay_t.fill_(ema_decay_at(step, tc.ema_decay, tc.ema_warmup))
                    if graph is None and step >= start_step + 3:  # a few eager steps first, as capture requires
                        graph, static = _capture(update, (x0, t, noise, y))
                    if graph is not None:
                        for buf, value in zip(static[0], (x0, t, noise, y)):
                            if buf is not None:
                                buf.copy_(value)
                        graph.replay()
                        loss = static[1]
                    else:
                        loss = _on_side_stream(update, x0, t, noise, y)
                else:
                    for g in opt.param_groups:
                        g["lr"] = lr_at(step)
                    loss = update(x0, t, noise, y)
                # Record the first non-finite step on the device; read it only when we sync anyway.
                bad = ~torch.isfinite(loss.detach())
                first_bad = torch.where(bad, torch.minimum(first_bad, torch.full_like(first_bad, step + 1)), first_bad)
                loss_sum += loss
                step += 1

                at_log = step % tc.log_every == 0 or step == tc.steps
                at_ckpt = step % tc.checkpoint_every == 0 or step == tc.steps
                # One process acts on a signal at once; ranks agree on it at the next log or checkpoint step.
                stopping = stop.signum is not None if rank.world_size == 1 else (
                    (at_log or at_ckpt) and _any_rank(stop.signum is not None, device))
                if at_log or at_ckpt or stopping:
                    if rank.world_size > 1:
                        dist.all_reduce(first_bad, op=dist.ReduceOp.MIN)
                    if int(first_bad) != no_bad:
                        kept = (f"the last good checkpoint ({ckpt_path}) was kept" if ckpt_path.is_file() else
                                f"no checkpoint was written before it (the first is due at step {tc.checkpoint_every})")
                        raise TrainingDivergedError(
                            f"loss became non-finite at step {int(first_bad)}; {kept}. Lower train.lr, enable "
                            f"train.grad_clip, or check the data.")
                if at_log:
                    if rank.world_size > 1:
                        dist.all_reduce(loss_sum)
                        loss_sum /= rank.world_size
                    elapsed = time.perf_counter() - t0
                    ips = (step - since) * tc.batch_size * rank.world_size / max(elapsed, 1e-9)
                    last_loss = float(loss_sum) / (step - since)
                    metrics = {"loss": last_loss, "lr": lr_at(step - 1), "images_per_sec": ips}
                    if rank.is_main:
                        files.start().write({"step": step, **metrics})
                        progress(step, last_loss, ips)
                        if on_log:
                            on_log(step, metrics)
                    loss_sum.zero_()
                    t0, since = time.perf_counter(), step
                if at_ckpt or stopping:
                    checkpoint()
                if (rank.is_main and tc.sample_every and step % tc.sample_every == 0 and step < tc.steps
                        and on_sample is not None):
                    files.start()
                    on_sample(step, save_sample_grid(ema, schedule, cfg, out_dir / f"samples_{step:07d}.png"))
                if stopping:
                    name = signal.Signals(stop.signum).name if stop.signum else "a signal on another rank"
                    raise TrainingInterrupted(f"stopped by {name} at step {step}; checkpoint saved to {ckpt_path}")
    finally:
        files.close()
        progress.close()
        if rank.world_size > 1 and sys.exc_info()[0] is not None:
            dist.destroy_process_group()
    if rank.world_size > 1:
        dist.destroy_process_group()
    if rank.is_main:
        files.start()  # a resume at its last step has written nothing yet
        files.close()
        grid = save_sample_grid(ema, schedule, cfg, out_dir / "samples_final.png")
        if on_sample is not None:
            on_sample(step, grid)
    return TrainResult(checkpoint=ckpt_path, step=step, loss=last_loss, images_per_sec=ips)


def _any_rank(flag: bool, device: torch.device) -> bool:
    t = torch.tensor([int(flag)], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


@torch.no_grad()
def save_sample_grid(model: nn.Module, schedule: Schedule, cfg: Config, path: Path, n: int = 64) -> Path:
    """Sample n images with the configured sampler from a fixed seed and save them as a PNG grid.

    Never compiled (sample.compile): a compile costs minutes, a preview grid a fraction of a second."""
    images, _ = generate(model, schedule, cfg, n, seed=cfg.sample.seed, compile=False)
    save_grid(images, path)
    return path


class _progress:
    """A tqdm bar when tqdm is installed and stderr is a terminal, else log lines."""

    def __init__(self, total: int, start: int, enabled: bool = True):
        self.bar = None
        if not enabled:
            return
        try:
            from tqdm import tqdm
            self.bar = tqdm(total=total, initial=start, unit="step", dynamic_ncols=True)
        except ImportError:
            pass

    def __call__(self, step: int, loss: float, ips: float) -> None:
        if self.bar is not None:
            self.bar.set_postfix(loss=f"{loss:.4f}", img_s=f"{ips:,.0f}")
            self.bar.n = step
            self.bar.refresh()
        else:
            log.info("step %d  loss %.4f  %.0f img/s", step, loss, ips)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _on_side_stream(fn: Callable[..., torch.Tensor], *args: Any) -> torch.Tensor:
    """Run fn on a side stream, as the eager warm-up steps before a CUDA-graph capture must."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        out = fn(*args)
    torch.cuda.current_stream().wait_stream(stream)
    return out


def _capture(fn: Callable[..., torch.Tensor], inputs: tuple) -> tuple[torch.cuda.CUDAGraph, tuple]:
    """Capture fn(*static_inputs) as a CUDA graph; returns (graph, (static_inputs, static_output))."""
    static_in = tuple(x.clone() if x is not None else None for x in inputs)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fn(*static_in)
    return graph, (static_in, out)
