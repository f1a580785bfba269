"""The training loop (Algorithm 1) around ddpm.train_step's step, with its hooks: loss.csv and `on_log`,
checkpoints, preview grids, and stopping on SIGINT/SIGTERM or a non-finite loss.

The whole training set sits on the training device as one uint8 tensor; batches, timesteps and noise
come from one seeded generator whose state is checkpointed with the global RNG, so a resumed run on
the CPU retraces an uninterrupted one exactly at the same thread count (`DDPM_CPU_THREADS=N` fixes it;
by default a long run's count follows the idle CPUs: ddpm.threads).

Under `torchrun --nproc_per_node=N` (WORLD_SIZE > 1) the same function trains with
DistributedDataParallel: each rank draws `train.batch_size` images from its own shard of the data
with its own timesteps and noise, so the global batch is batch_size * N at the same `train.lr`
(scale lr yourself if you want). Gradients are all-reduced; EMA, checkpoints, loss.csv, sample grids
and the callbacks run on rank 0 only. A checkpoint resumes on any number of ranks; resuming on
the same number restores every rank's generator, otherwise ranks are reseeded from (seed, rank, step).
"""

from __future__ import annotations

import contextlib
import logging
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

from ddpm.checkpoint import CheckpointWriter, config_of, load_checkpoint
from ddpm.compile_cache import DYNAMO_CACHE_MIN_TORCH, CompileCache, caching_dynamo_work, dynamo_cache_available
from ddpm.config import Config, image_shape
from ddpm.data import load_images
from ddpm.distributed import DistInfo, any_rank, gather_states, init_distributed
from ddpm.errors import ConfigError, RunFolderError, TrainingDivergedError, TrainingInterrupted
from ddpm.generate import generate, save_grid
from ddpm.layout import RunLayout
from ddpm.progress import StepBar
from ddpm.resources import check_training_fits
from ddpm.run_folder import RunFiles, owned, resume_changes
from ddpm.schedule import Schedule
from ddpm.threads import watch_threads
from ddpm.train_compile import training_network
from ddpm.train_step import Objective, TrainData, TrainState, TrainStep, make_train_step  # noqa: F401 (Objective re-exported)
from ddpm.unet import build_unet

log = logging.getLogger(__name__)

LOSS_FIELDS = ("step", "loss", "lr", "images_per_sec")


@dataclass(frozen=True)
class TrainHooks:
    """What the caller hears: `on_log(step, metrics)` every log_every steps, `on_sample(step, png_path)` after
    every saved grid, `on_checkpoint(step, path)` after every checkpoint, `on_step(step)` after every step (no
    device sync: keep it cheap)."""

    on_log: Callable[[int, dict[str, float]], None] | None = None
    on_sample: Callable[[int, Path], None] | None = None
    on_checkpoint: Callable[[int, Path], None] | None = None
    on_step: Callable[[int], None] | None = None


@dataclass(frozen=True)
class TrainResult:
    checkpoint: Path
    step: int
    loss: float
    images_per_sec: float
    compile_cache: dict[str, Any] | None = None  # ddpm.compile_cache's record: the artifact used, or why not
    steps_run: int = 0  # by this call: 0 for a run resumed at train.steps


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("runtime.device: 'cuda' was asked for, but no CUDA device is available; use 'cpu' or 'auto'")
    return torch.device("cuda", local_rank) if name == "cuda" else torch.device(name)


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
          on_checkpoint: Callable[[int, Path], None] | None = None, overwrite: bool = False,
          on_step: Callable[[int], None] | None = None, objective: Objective | None = None) -> TrainResult:
    """Train the U-Net described by `cfg`; write checkpoints, loss.csv and sample grids under cfg.train.out_dir.

    The folder is held by this run (ddpm.run_folder.owned: a second process fails at once). A folder
    with a checkpoint needs `resume` (settings that would change the model, the diffusion or the data
    are refused, other changes are logged) or `overwrite` (the previous run's files move to
    `<out_dir>.replaced-<UTC time>/`). Nothing in it is written before the first step has finished.
    `on_log(step, metrics)` receives loss, lr and images_per_sec every `log_every` steps;
    `on_sample(step, png_path)` every saved grid; `on_checkpoint(step, path)` after every checkpoint;
    `on_step(step)` after every step. `objective`: initial weights and a loss other than p_losses.
    Raises TrainingDivergedError on a non-finite loss and TrainingInterrupted on SIGINT/SIGTERM, after
    saving what is worth keeping.
    """
    rank = init_distributed(cfg.runtime.device)
    device = resolve_device(cfg.runtime.device, rank.local_rank)
    check_training_fits(cfg, device)  # before the folder is taken or anything is allocated
    layout = RunLayout(cfg.train.out_dir)
    with owned(layout.out_dir, "ddpm train") if rank.is_main else contextlib.nullcontext():
        ckpt = _checkpoint_to_resume(cfg, layout.checkpoint, resume, overwrite)
        files = RunFiles(layout, yaml.safe_dump(cfg.to_dict(), sort_keys=False).encode(), LOSS_FIELDS,
                         int(ckpt["step"]) if ckpt else 0, replace=overwrite and layout.checkpoint.exists())
        tc = cfg.train
        dynamo = tc.compile and tc.cache_dynamo_trace and dynamo_cache_available(rank.world_size)
        if tc.cache_dynamo_trace and not dynamo:
            log.info("train.cache_dynamo_trace is ignored: it needs train.compile, one process and torch >= %s "
                     "with caching_precompile (this one: %s)", ".".join(map(str, DYNAMO_CACHE_MIN_TORCH)),
                     torch.__version__)
        with caching_dynamo_work(dynamo):
            step, cache = _start(cfg, rank, device, ckpt, objective or Objective())
            return _Run(cfg, rank, step, files, TrainHooks(on_log, on_sample, on_checkpoint, on_step), cache).run()


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


# --- start-up: data, model, state, network ---------------------------------------------------------

def _start(cfg: Config, rank: DistInfo, device: torch.device, ckpt: dict[str, Any] | None,
           objective: Objective) -> tuple[TrainStep, CompileCache | None]:
    """This rank's training step, with its state fresh from the seed (or objective.init) or restored from `ckpt`,
    and its compile cache (None when train.compile is off)."""
    tc = cfg.train
    torch.manual_seed(tc.seed + rank.rank)
    data = _load_shard(cfg, rank, device)
    schedule = Schedule.from_config(cfg.diffusion).to(device)
    model = build_unet(cfg.model, image_shape(cfg))
    if objective.init is not None and ckpt is None:
        model.load_state_dict(objective.init)
    model = model.to(device)
    if tc.channels_last:
        model = model.to(memory_format=torch.channels_last)
        data = TrainData(data.images.contiguous(memory_format=torch.channels_last), data.labels)
    graphed = tc.cuda_graphs and device.type == "cuda" and rank.world_size == 1
    if tc.cuda_graphs and not graphed:
        log.warning("train.cuda_graphs needs one CUDA process; running eagerly")
    # before the RNG is restored: building the loss (a teacher network) may draw from it
    loss_fn = objective.make_loss(device) if objective.make_loss is not None else None
    state = TrainState.create(model, tc, device, graphed=graphed, seed=tc.seed + 1_000_003 * rank.rank)
    if ckpt is not None:
        _restore(state, ckpt, cfg, rank)
    net, cache = training_network(model, cfg, rank, device, graphed)
    return make_train_step(state, cfg, data, schedule, net=net, update_ema=rank.is_main, loss_fn=loss_fn), cache


def _load_shard(cfg: Config, rank: DistInfo, device: torch.device) -> TrainData:
    """This rank's shard of the training set, on the device: uint8 [N, C, H, W] images, int64 [N] labels."""
    images, labels = load_images(cfg.data.dataset, cfg.data.root, "train")
    shard = slice(rank.rank * len(images) // rank.world_size, (rank.rank + 1) * len(images) // rank.world_size)
    return TrainData(images[shard].to(device), labels[shard].to(device))


def _restore(state: TrainState, ckpt: dict[str, Any], cfg: Config, rank: DistInfo) -> None:
    """Continue from `ckpt`: every rank's generators when it was written by as many ranks, else fresh, distinct
    streams that still depend only on (seed, rank, step)."""
    seed = cfg.train.seed
    state.load(ckpt)
    rng = ckpt["rng"]
    if rng.get("world_size", 1) == rank.world_size:
        torch.set_rng_state(rng["torch"][rank.rank])
        state.gen.set_state(rng["generator"][rank.rank].to(state.gen.get_state().device))
    else:
        torch.manual_seed(seed + rank.rank + 7919 * state.step)
        state.gen.manual_seed(seed + 1_000_003 * rank.rank + 7919 * state.step)
    log.info("resumed from %s at step %d (written by %d rank(s), now %d)", RunLayout(cfg.train.out_dir).checkpoint,
             state.step, rng.get("world_size", 1), rank.world_size)


# --- the loop and its hooks --------------------------------------------------------------------------

class _Run:
    """The loop around the training step, with its hooks: log, checkpoint, preview grid, stop."""

    def __init__(self, cfg: Config, rank: DistInfo, step: TrainStep, files: RunFiles, hooks: TrainHooks,
                 compile_cache: CompileCache | None = None):
        self.cfg, self.rank, self.step, self.files, self.hooks = cfg, rank, step, files, hooks
        self.compile_cache = compile_cache
        self.state = step.state
        self.layout = files.layout
        self.ckpt_path = self.layout.checkpoint
        self.loss_sum = torch.zeros((), device=step.device)
        self.progress = StepBar(cfg.train.steps, self.state.step, enabled=rank.is_main)
        self.last_loss, self.ips, self.t0, self.since = float("nan"), 0.0, time.perf_counter(), self.state.step
        self.first_step = self.state.step
        self.writer = CheckpointWriter()  # the next steps train while a checkpoint is written
        self.threads = watch_threads(step.device.type, cfg.train.compile) if rank.world_size == 1 else None

    def run(self) -> TrainResult:
        self.state.model.train()
        try:
            with _StopFlag() as stop:
                while self.state.step < self.cfg.train.steps:
                    self.loss_sum += self.step()
                    self._after_step(stop)
                result = self._finish()
                if stop.signum is not None:  # during the final grid, after the last checkpoint
                    raise self._stopped(stop.signum, f"after the last step ({result.step})")
                return result
        finally:
            self._close(failed=sys.exc_info()[0] is not None)

    def _close(self, failed: bool) -> None:
        """Close the files and wait for the checkpoint in writing; after a failure, its own error is only logged."""
        self.files.close()
        self.progress.close()
        try:
            self.writer.close()
        except Exception as exc:  # noqa: BLE001 - the error that stopped training is the one to report
            if not failed:
                raise
            log.error("the last checkpoint could not be written either: %s", exc)
        if self.rank.world_size > 1 and failed and dist.is_initialized():
            dist.destroy_process_group()

    def _after_step(self, stop: _StopFlag) -> None:
        tc, step = self.cfg.train, self.state.step
        self.writer.poll()  # a failed checkpoint write stops the run now, not at the next checkpoint
        if self.rank.is_main and self.hooks.on_step is not None:
            self.hooks.on_step(step)
        at_log = step % tc.log_every == 0 or step == tc.steps
        at_ckpt = step % tc.checkpoint_every == 0 or step == tc.steps
        # One process acts on a signal at once; ranks agree on it at the next log or checkpoint step.
        stopping = stop.signum is not None if self.rank.world_size == 1 else (
            (at_log or at_ckpt) and any_rank(stop.signum is not None, self.step.device))
        if at_log or at_ckpt or stopping:
            self._raise_if_diverged()
        if at_log:
            self._log()
        if at_ckpt or stopping:
            self._checkpoint()
        if self.rank.is_main and tc.sample_every and step % tc.sample_every == 0 and step < tc.steps:
            self._preview()
        if stopping:
            self.writer.wait()  # the message says the checkpoint is saved
            raise self._stopped(stop.signum, f"at step {step}")

    def _stopped(self, signum: int | None, when: str) -> TrainingInterrupted:
        name = signal.Signals(signum).name if signum else "a signal on another rank"
        return TrainingInterrupted(f"stopped by {name} {when}; checkpoint saved to {self.ckpt_path}")

    def _raise_if_diverged(self) -> None:
        if self.rank.world_size > 1:
            dist.all_reduce(self.step.first_bad, op=dist.ReduceOp.MIN)
        first = self.step.first_nonfinite()
        if first is not None:
            try:
                self.writer.wait()
            except Exception as exc:  # noqa: BLE001 - the divergence is the error; the file before it stays
                log.error("the last checkpoint could not be written: %s", exc)
            if self.rank.world_size > 1:
                dist.barrier()  # every rank looks for the file once rank 0 has written it
            kept = (f"the last good checkpoint ({self.ckpt_path}) was kept" if self.ckpt_path.is_file() else
                    f"no checkpoint was written before it (the first is due at step {self.cfg.train.checkpoint_every})")
            raise TrainingDivergedError(
                f"loss became non-finite at step {first}; {kept}. Lower train.lr, enable "
                f"train.grad_clip, or check the data.")

    def _log(self) -> None:
        step, world = self.state.step, self.rank.world_size
        if world > 1:
            dist.all_reduce(self.loss_sum)
            self.loss_sum /= world
        elapsed = time.perf_counter() - self.t0
        self.ips = (step - self.since) * self.cfg.train.batch_size * world / max(elapsed, 1e-9)
        self.last_loss = float(self.loss_sum) / (step - self.since)
        metrics = {"loss": self.last_loss, "lr": self.state.lr(step - 1), "images_per_sec": self.ips}
        if self.rank.is_main:
            self.files.start().write({"step": step, **metrics})
            self.progress(step, self.last_loss, self.ips)
            if self.hooks.on_log:
                self.hooks.on_log(step, metrics)
        changed = self.threads.check() if self.threads is not None else None
        if changed:
            log.info(changed)
        self.loss_sum.zero_()
        self.t0, self.since = time.perf_counter(), step

    def _checkpoint(self) -> None:
        s, rank = self.state, self.rank
        rng = {"world_size": rank.world_size, "torch": gather_states(torch.get_rng_state(), rank.world_size),
               "generator": gather_states(s.gen.get_state().cpu(), rank.world_size)}
        if rank.is_main:
            self.files.start()
            self.writer.save(self.ckpt_path, {
                "model": s.model.state_dict(), "ema": s.ema.state_dict(), "optimizer": s.opt.state_dict(),
                "step": s.step, "config": self.cfg.to_dict(), "rng": rng,
            })
            if self.compile_cache is not None:
                self.compile_cache.save()  # once: the step has compiled by the first checkpoint
            if self.hooks.on_checkpoint is not None:
                self.writer.wait()  # the hook may read the file
                self.hooks.on_checkpoint(s.step, self.ckpt_path)
        if rank.world_size > 1:
            dist.barrier()

    def _preview(self) -> None:
        if self.hooks.on_sample is None:
            return
        step = self.state.step
        self.files.start()
        grid = save_sample_grid(self.state.ema, self.step.schedule, self.cfg, self.layout.preview(step))
        self.hooks.on_sample(step, grid)

    def _finish(self) -> TrainResult:
        if self.rank.is_main:
            self.files.start()  # a resume at its last step has written nothing yet
            self.files.close()
            # sampled while the last checkpoint is written, and saved once it is on disk
            images = sample_grid_images(self.state.ema, self.step.schedule, self.cfg)
            self.writer.wait()
            grid = save_grid(images, self.layout.samples_final)
            if self.hooks.on_sample is not None:
                self.hooks.on_sample(self.state.step, grid)
        if self.rank.world_size > 1:
            dist.barrier()  # no rank returns before the last checkpoint is on disk
            dist.destroy_process_group()
        return TrainResult(checkpoint=self.ckpt_path, step=self.state.step, loss=self.last_loss,
                           images_per_sec=self.ips, steps_run=self.state.step - self.first_step,
                           compile_cache=None if self.compile_cache is None else dict(self.compile_cache.record))


@torch.no_grad()
def save_sample_grid(model: nn.Module, schedule: Schedule, cfg: Config, path: Path, n: int = 64) -> Path:
    """Sample n images with the configured sampler from a fixed seed and save them as a PNG grid.

    Never compiled (sample.compile): a compile costs minutes, a preview grid a fraction of a second."""
    save_grid(sample_grid_images(model, schedule, cfg, n), path)
    return path


@torch.no_grad()
def sample_grid_images(model: nn.Module, schedule: Schedule, cfg: Config, n: int = 64) -> torch.Tensor:
    """The images of a sample grid: n from a fixed seed with the configured sampler, uncompiled."""
    images, _ = generate(model, schedule, cfg, n, seed=cfg.sample.seed, compile=False)
    return images
