"""Progressive distillation (Salimans & Ho 2022, Algorithm 2): a trained checkpoint into few-step students.

Each round divides the DDIM steps by F = distill.round_factor (2, the paper's halving, by default). The
teacher (round 1: the checkpoint's EMA network; later: the previous round's student, its EMA) samples
with F N deterministic DDIM steps on the trailing grid (ddpm.schedule_math.trailing_timesteps, which
keeps every F-th point when N is divided by F); the student, initialised from the teacher's weights,
learns to take F of its steps in one on the grid of N steps. N runs from distill.teacher_steps / F down
to distill.steps. F > 2 reaches a few steps in fewer rounds, each student imitating a longer stretch of
its teacher's path (as TRACT, Berthelot et al. 2023, does without its self-teaching).

Targets. At a student timestep t with teacher timesteps t_1 ... t_F after it (t_F is "clean", alpha = 1
and sigma = 0, after the last), with alpha_t = sqrt(alpha_bar_t), sigma_t = sqrt(1 - alpha_bar_t):

    z_t     = alpha_t x + sigma_t eps
    z_t_j   = alpha_t_j x_T(z_t_j-1) + sigma_t_j (z_t_j-1 - alpha_t_j-1 x_T(z_t_j-1)) / sigma_t_j-1
              (teacher DDIM steps, j = 1 ... F, from z_t_0 = z_t)
    x~      = (z_t_F - (sigma_t_F / sigma_t) z_t) / (alpha_t_F - (sigma_t_F / sigma_t) alpha_t)

x~ is the x that takes z_t to z_t_F in one DDIM step; x_T is the teacher's x0 prediction, clipped to
[-1, 1] as our DDIM sampler does. The loss is x-space with the paper's truncated-SNR weighting,
max(SNR_t, 1) * |x_S(z_t) - x~|^2, averaged over pixels and the batch.

Parameterisation. The student predicts v (x_S = alpha_t z_t - sigma_t v, stable at every t),
whatever the teacher predicts: an eps network's x0 = (z_t - sigma_t eps) / alpha_t multiplies its
error by 1 / alpha_t, about 160 at t = T-1 of the linear schedule, which is where a 4-step sampler
starts. Round 1 therefore also converts the teacher: its student starts from the eps network's
weights and learns to read the same features as v. Later teachers are v networks themselves.

Each round is an ordinary training run (ddpm.train.train with an Objective) in
<train.out_dir>/distill/steps_<N>/: checkpoints, resume, the NaN guard, bf16, compile and CUDA
graphs are training's. Its checkpoint is a model like any other, whose config records
diffusion.prediction = v and diffusion.distilled_steps = N (the samplers then use its grid and
refuse other step counts). The last round's checkpoint is copied to distill/student.pt.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from ddpm.checkpoint import config_of, load_checkpoint, load_model
from ddpm.config import Config, config_from_dict
from ddpm.errors import ConfigError, RunFolderError
from ddpm.fileio import atomic_write_bytes, file_sha256
from ddpm.generate import student_sampling
from ddpm.layout import RunLayout
from ddpm.schedule import Schedule, split_prediction
from ddpm.schedule_math import trailing_timesteps
from ddpm.train import resolve_device, train
from ddpm.train_compile import compile_for_training
from ddpm.train_step import LossFn, Objective

log = logging.getLogger(__name__)

TEACHER_RECORD = "teacher.sha256"  # in each round's folder: which teacher, at how many DDIM steps, it learns


def _teacher_record(sha: str, teacher_steps: int) -> str:
    return f"{sha} {teacher_steps}"


@dataclass(frozen=True)
class DistillLayout:
    """Where distillation writes: the distill/ part of the run's ddpm.layout.RunLayout."""

    run: RunLayout

    @classmethod
    def of(cls, cfg: Config) -> "DistillLayout":
        return cls(RunLayout(cfg.train.out_dir))

    @property
    def root(self) -> Path:
        return self.run.distill_dir

    def round_dir(self, steps: int) -> Path:
        return self.run.distill_round(steps)

    def round_checkpoint(self, steps: int) -> Path:
        return RunLayout(self.round_dir(steps)).checkpoint

    @property
    def student(self) -> Path:
        return self.run.student


@dataclass(frozen=True)
class RoundResult:
    steps: int            # the student's DDIM steps
    checkpoint: Path
    loss: float           # mean over the round's last log window (NaN for a round finished earlier)
    seconds: float        # wall-clock, loading and compiling included (0 for a round finished earlier)
    skipped: bool


@dataclass(frozen=True)
class DistillResult:
    student: Path
    rounds: tuple[RoundResult, ...]


def round_steps_of(cfg: Config) -> list[int]:
    """The students' step counts, round by round: teacher_steps / F, / F^2, ... down to distill.steps
    (F = distill.round_factor)."""
    f = cfg.distill.round_factor
    out, n = [], cfg.distill.teacher_steps // f
    while n >= cfg.distill.steps:
        out.append(n)
        n //= f
    return out


def optimisation_steps(cfg: Config, steps: int) -> int:
    """The optimisation steps of the round whose student takes `steps` DDIM steps: distill.first_round_steps for
    the first (teacher_steps / round_factor), whose student also learns to predict v, distill.round_steps for
    the others."""
    ds = cfg.distill
    return ds.first_round_steps if steps == ds.teacher_steps // ds.round_factor else ds.round_steps


def round_spans(cfg: Config) -> dict[int, tuple[int, int]]:
    """Each round's (first step, optimisation steps) on one count over all rounds, by the student's DDIM steps."""
    spans, start = {}, 0
    for steps in round_steps_of(cfg):
        spans[steps] = (start, optimisation_steps(cfg, steps))
        start += spans[steps][1]
    return spans


def round_config(cfg: Config, teacher_cfg: Config, steps: int) -> Config:
    """The training settings of the round whose student takes `steps` steps: the teacher's data, model and
    diffusion (v-prediction, distilled_steps), cfg's train settings with the distill block's lr, steps, EMA
    and compile, and the sampler it is distilled for (ddpm.generate.student_sampling)."""
    ds, raw = cfg.distill, cfg.to_dict()
    teacher = teacher_cfg.to_dict()
    raw["data"] = {**teacher["data"], "root": cfg.data.root}
    raw["model"] = teacher["model"]
    raw["diffusion"] = {**teacher["diffusion"], "prediction": "v", "distilled_steps": steps}
    n = optimisation_steps(cfg, steps)
    raw["train"] = {**raw["train"], "steps": n, "lr": ds.lr, "warmup_steps": 0, "lr_decay": "cosine",
                    "ema_decay": ds.ema_decay, "sample_every": 0, "nproc": 1, "compile": ds.compile,
                    "cache_dynamo_trace": False,  # teacher and student would share one Dynamo entry (UNet.forward)
                    "checkpoint_every": min(cfg.train.checkpoint_every, n),
                    "out_dir": str(DistillLayout.of(cfg).round_dir(steps))}
    return student_sampling(config_from_dict(raw), steps)


class DistillationLoss:
    """LossFn of one round: the student (v-prediction) against `factor` teacher DDIM steps, in x-space with
    truncated-SNR weights. Called as `loss(student, schedule, x0, t, noise, labels)`, t drawn uniformly in
    [0, T-1] and mapped to the student's grid point k = t * N // T, so each of the N points is drawn with a
    probability within 1 / floor(T / N) of uniform. Everything it reads lives on the device, so the
    training step's CUDA graph can capture it whole."""

    def __init__(self, teacher: Callable[..., torch.Tensor], teacher_prediction: str, schedule: Schedule,
                 steps: int, device: torch.device, factor: int = 2):
        T = schedule.num_timesteps
        grid = trailing_timesteps(T, factor * steps)  # the teacher's; the student's is grid[::factor]
        acp = schedule.alphas_cumprod.to(torch.float64).cpu()
        a_bar = torch.cat([acp[grid], torch.ones(1, dtype=torch.float64)])  # entry F N: clean
        self.teacher, self.teacher_prediction = teacher, teacher_prediction
        self.schedule, self.steps, self.factor, self.T = schedule, steps, factor, T
        self.t = torch.tensor(grid, dtype=torch.long, device=device)  # [F N]
        self.alpha = a_bar.sqrt().float().to(device)                   # [F N + 1]
        self.sigma = (1 - a_bar).clamp(min=0).sqrt().float().to(device)

    def _coef(self, table: torch.Tensor, i: torch.Tensor) -> torch.Tensor:
        return table[i].view(-1, 1, 1, 1)

    @torch.no_grad()
    def _teacher_x0(self, z: torch.Tensor, i: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
        t = self.t[i]
        out = self.teacher(z, t, labels) if labels is not None else self.teacher(z, t)
        return split_prediction(self.schedule, z, t, out.float(), self.teacher_prediction)[1].clamp(-1.0, 1.0)

    @torch.no_grad()
    def target(self, z: torch.Tensor, i: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
        """x~ of the docstring for z_t [B, C, H, W] at teacher grid indices i [B] (multiples of the factor: the
        student's points)."""
        a, s = self._coef(self.alpha, i), self._coef(self.sigma, i)
        zj, aj, sj = z, a, s
        for j in range(self.factor):
            x = self._teacher_x0(zj, i + j, labels)
            an, sn = self._coef(self.alpha, i + j + 1), self._coef(self.sigma, i + j + 1)
            zj, aj, sj = an * x + sn * (zj - aj * x) / sj, an, sn
        return (zj - (sj / s) * z) / (aj - (sj / s) * a)

    def __call__(self, student: Callable[..., torch.Tensor], schedule: Schedule, x0: torch.Tensor,
                 t: torch.Tensor, noise: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
        i = self.factor * (t * self.steps // self.T)  # the student's grid point, as a teacher grid index
        a, s = self._coef(self.alpha, i), self._coef(self.sigma, i)
        z = a * x0 + s * noise
        x_target = self.target(z, i, labels)
        v = (student(z, self.t[i], labels) if labels is not None else student(z, self.t[i])).float()
        x_student = a * z - s * v
        weight = (a / s).pow(2).clamp(min=1.0).view(-1)  # truncated SNR: max(SNR_t, 1)
        return (weight * (x_student - x_target).pow(2).mean(dim=(1, 2, 3))).mean()


def _teacher_network(path: Path, cfg: Config, device: torch.device) -> tuple[torch.nn.Module, Config]:
    """The teacher's EMA network on `device`, frozen; channels-last and compiled as the round's training is."""
    model, teacher_cfg, _ = load_model(path, device, use_ema=True)
    model.requires_grad_(False)
    if cfg.train.channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model, teacher_cfg


def _objective(teacher_path: Path, cfg: Config, round_cfg: Config, steps: int) -> Objective:
    """The round's initial weights (the teacher's EMA) and its loss, built on the training device."""
    init = load_checkpoint(teacher_path)
    init = init["ema"] if init.get("ema") is not None else init["model"]

    def make_loss(device: torch.device) -> LossFn:
        teacher, teacher_cfg = _teacher_network(teacher_path, cfg, device)
        net: Callable[..., torch.Tensor] = teacher
        if round_cfg.train.compile:
            graphed = round_cfg.train.cuda_graphs and device.type == "cuda"
            net = compile_for_training(teacher, teacher, round_cfg.train.channels_last, graphed)
        schedule = Schedule.from_config(round_cfg.diffusion).to(device)
        return DistillationLoss(net, teacher_cfg.diffusion.prediction, schedule, steps, device,
                                cfg.distill.round_factor)

    return Objective(init=init, make_loss=make_loss)


def _check_teacher(cfg: Config, checkpoint: Path) -> Config:
    teacher_cfg = config_of(load_checkpoint(checkpoint), checkpoint)
    own, T = teacher_cfg.diffusion.distilled_steps, teacher_cfg.diffusion.timesteps
    if cfg.distill.teacher_steps > T:
        raise ConfigError(f"distill.teacher_steps: {cfg.distill.teacher_steps} exceeds the T of {checkpoint} ({T})")
    if own and own != cfg.distill.teacher_steps:
        raise ConfigError(f"distill.teacher_steps: {cfg.distill.teacher_steps}, but {checkpoint} is a student "
                          f"distilled to {own} steps; set distill.teacher_steps={own} to distil it further")
    return teacher_cfg


def _round_is_finished(layout: DistillLayout, steps: int, teacher_sha: str, cfg: Config, resume: bool,
                       overwrite: bool) -> bool:
    """Whether the round's folder holds a finished student of this teacher. RunFolderError, before anything is
    written, for a folder that holds a round without --resume or --overwrite, or one of another teacher."""
    folder, ckpt = layout.round_dir(steps), layout.round_checkpoint(steps)
    if overwrite or not ckpt.exists():
        return False
    if not resume:
        raise RunFolderError(f"{folder} already holds a distillation round; pass --resume to continue it, or "
                             f"--overwrite to distil again (its files move to {folder.name}.replaced-<UTC time>/)")
    record, teacher_steps = folder / TEACHER_RECORD, cfg.distill.round_factor * steps
    words = record.read_text().split() if record.is_file() else []
    if len(words) == 1:  # written before distill.round_factor: halving rounds only
        words.append(str(2 * steps))
    if " ".join(words) != _teacher_record(teacher_sha, teacher_steps):
        was = (f"teacher {words[0][:12]} at {words[1]} DDIM steps" if len(words) == 2 else "no teacher record")
        raise RunFolderError(f"{folder} was distilled from {was}, now teacher {teacher_sha[:12]} at "
                             f"{teacher_steps} DDIM steps (distill.round_factor times the student's); rerun with "
                             f"--overwrite to distil again from the current checkpoint")
    return int(load_checkpoint(ckpt)["step"]) >= optimisation_steps(cfg, steps)


def distill(cfg: Config, checkpoint: str | Path, resume: bool = False, overwrite: bool = False,
            on_log: Callable[[int, int, dict[str, float]], None] | None = None,
            on_round: Callable[[RoundResult], None] | None = None,
            on_step: Callable[[int, int], None] | None = None) -> DistillResult:
    """Distil `checkpoint` round by round down to distill.steps; returns the student and each round's result.

    `resume` continues (finished rounds of the same teacher are kept, an interrupted one resumes from
    its checkpoint); `overwrite` redoes every round (each folder's previous files move aside, as
    `ddpm train --overwrite` does). `on_log(student_steps, step, metrics)` every train.log_every steps
    of a round, `on_round(result)` after each round, `on_step(student_steps, step)` after every step.
    """
    checkpoint = Path(checkpoint)
    teacher_cfg = _check_teacher(cfg, checkpoint)
    resolve_device(cfg.runtime.device)  # a missing CUDA device fails before any folder is made
    layout, teacher, rounds = DistillLayout.of(cfg), checkpoint, []
    for steps in round_steps_of(cfg):
        result = _run_round(cfg, teacher_cfg, layout, teacher, steps, resume, overwrite, on_log, on_step)
        rounds.append(result)
        if on_round is not None:
            on_round(result)
        teacher, teacher_cfg = result.checkpoint, config_of(load_checkpoint(result.checkpoint), result.checkpoint)
    atomic_write_bytes(layout.student, teacher.read_bytes())
    log.info("distilled %s into %s (%d DDIM steps)", checkpoint, layout.student, cfg.distill.steps)
    return DistillResult(layout.student, tuple(rounds))


def _run_round(cfg: Config, teacher_cfg: Config, layout: DistillLayout, teacher: Path, steps: int, resume: bool,
               overwrite: bool, on_log: Callable[[int, int, dict[str, float]], None] | None,
               on_step: Callable[[int, int], None] | None) -> RoundResult:
    sha = file_sha256(teacher)
    if _round_is_finished(layout, steps, sha, cfg, resume, overwrite):
        log.info("round to %d steps: %s is finished; kept", steps, layout.round_checkpoint(steps))
        return RoundResult(steps, layout.round_checkpoint(steps), float("nan"), 0.0, True)
    rc = round_config(cfg, teacher_cfg, steps)
    layout.round_dir(steps).mkdir(parents=True, exist_ok=True)
    teacher_steps = cfg.distill.round_factor * steps
    atomic_write_bytes(layout.round_dir(steps) / TEACHER_RECORD, (_teacher_record(sha, teacher_steps) + "\n").encode())
    log.info("round to %d steps: teacher %s (%d steps), %d optimisation steps", steps, teacher, teacher_steps,
             rc.train.steps)
    start = time.perf_counter()
    result = train(rc, resume=resume and not overwrite, overwrite=overwrite,
                   on_log=None if on_log is None else (lambda step, m: on_log(steps, step, m)),
                   on_step=None if on_step is None else (lambda step: on_step(steps, step)),
                   objective=_objective(teacher, cfg, rc, steps))
    return RoundResult(steps, Path(result.checkpoint), result.loss, time.perf_counter() - start, False)


def describe(result: DistillResult) -> dict[str, Any]:
    """The result as JSON-ready numbers and paths."""
    return {"student": str(result.student), "rounds": [
        {"steps": r.steps, "checkpoint": str(r.checkpoint), "loss": r.loss, "seconds": r.seconds, "skipped": r.skipped}
        for r in result.rounds]}
