"""One training step (Algorithm 1) and the state it updates: what `ddpm train` runs and bench/bench_train.py times.

A step draws a batch from the data on the device (images, timesteps t in [0, T-1], noise and, for a
class-conditional model, labels with label dropout) from the state's generator, computes p_losses
under bf16 autocast on CUDA, steps AdamW at the step's learning rate (lr_at_step) after gradient clipping,
updates the EMA and records on the device the first step whose loss was not finite (read it with
`first_nonfinite` when the host synchronizes anyway).

With CUDA graphs (one CUDA process) the learning rate and EMA decay are 0-d device tensors, so a
captured graph sees new values at each replay; after EAGER_STEPS_BEFORE_CAPTURE eager steps on a
side stream the update is captured once (ddpm.graphed) and replayed from then on, the batch being
drawn eagerly and copied into the graph's static inputs.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from ddpm.config import Config, TrainConfig
from ddpm.data import to_model_range
from ddpm.graphed import Captured, capture, on_side_stream
from ddpm.losses import p_losses
from ddpm.schedule import Schedule

# loss_fn(net, schedule, x0 [B, C, H, W], t int64 [B], noise [B, C, H, W], labels [B] | None) -> 0-d loss
LossFn = Callable[[Callable[..., torch.Tensor], Schedule, torch.Tensor, torch.Tensor, torch.Tensor,
                   torch.Tensor | None], torch.Tensor]
EAGER_STEPS_BEFORE_CAPTURE = 3  # a few eager steps first, as capture requires (lazy optimizer state, autotuning)
NO_BAD_STEP = torch.iinfo(torch.long).max


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


def ema_decay_at(step: int, cfg_decay: float, warmup: bool) -> float:
    """EMA decay with warm-up min(decay, (1 + step) / (10 + step)), so early weights fade fast."""
    return min(cfg_decay, (1 + step) / (10 + step)) if warmup else cfg_decay


def lr_at_step(step: int, tc: TrainConfig) -> float:
    """The learning rate of `step`: linear warm-up over warmup_steps, then constant or a cosine decay to 0."""
    if tc.warmup_steps and step < tc.warmup_steps:
        return tc.lr * (step + 1) / tc.warmup_steps
    if tc.lr_decay == "cosine":
        span = max(1, tc.steps - tc.warmup_steps)
        return tc.lr * 0.5 * (1 + math.cos(math.pi * min(1.0, (step - tc.warmup_steps) / span)))
    return tc.lr


@dataclass(frozen=True)
class LRSchedule:
    """The learning rate per step (counted from 0) of train.lr, train.warmup_steps, train.lr_decay and train.steps."""

    tc: TrainConfig

    def __call__(self, step: int) -> float:
        return lr_at_step(step, self.tc)


@dataclass(frozen=True)
class Objective:
    """What a run trains other than a DDPM from scratch (ddpm.distill): `init` is the state dict that the model
    and its EMA start from (a resumed run keeps its checkpoint's), `make_loss(device)` the loss that
    replaces p_losses (LossFn), built on the training device; see ddpm.train.train."""

    init: dict[str, torch.Tensor] | None = None
    make_loss: Callable[[torch.device], LossFn] | None = None


@dataclass(frozen=True)
class TrainData:
    """The training set on the device: images uint8 [N, C, H, W], labels int64 [N]."""

    images: torch.Tensor
    labels: torch.Tensor


@dataclass
class TrainState:
    """What training updates: the model, its EMA copy, the optimizer, the LR schedule, the generator of
    batches, timesteps and noise, and the number of steps taken. `lr_t` and `decay_t` are the 0-d device
    tensors of a CUDA-graph run (None otherwise)."""

    model: nn.Module
    ema: nn.Module
    opt: torch.optim.Optimizer
    lr: LRSchedule
    gen: torch.Generator
    step: int = 0
    lr_t: torch.Tensor | None = None
    decay_t: torch.Tensor | None = None

    @property
    def graphed(self) -> bool:
        return self.lr_t is not None

    @classmethod
    def create(cls, model: nn.Module, tc: TrainConfig, device: torch.device, *, graphed: bool, seed: int,
               ema: nn.Module | None = None) -> "TrainState":
        """A fresh state for `model` (already on `device`); `ema` defaults to a copy of the model.
        `graphed` needs CUDA: fused AdamW with capturable=True and a tensor learning rate."""
        if ema is None:
            ema = copy.deepcopy(model).eval().requires_grad_(False)
        lr_t = torch.tensor(tc.lr, device=device) if graphed else None
        decay_t = torch.tensor(tc.ema_decay, device=device) if graphed else None
        opt = torch.optim.AdamW(model.parameters(), lr=lr_t if graphed else tc.lr, weight_decay=tc.weight_decay,
                                fused=device.type == "cuda", capturable=graphed)
        gen = torch.Generator(device=device).manual_seed(seed)
        return cls(model, ema, opt, LRSchedule(tc), gen, 0, lr_t, decay_t)

    def load(self, ckpt: dict) -> None:
        """Weights, EMA, optimizer state and step from a checkpoint (the generator is the caller's: it
        depends on the ranks)."""
        self.model.load_state_dict(ckpt["model"])
        self.ema.load_state_dict(ckpt["ema"])
        self.opt.load_state_dict(ckpt["optimizer"])
        if self.graphed:
            for g in self.opt.param_groups:
                g["lr"] = self.lr_t
        self.step = int(ckpt["step"])


class TrainStep:
    """Callable: one step of `state`; returns the loss (0-d, on the device, a static buffer once graphed)."""

    def __init__(self, state: TrainState, cfg: Config, data: TrainData, schedule: Schedule,
                 net: Callable[..., torch.Tensor] | None = None, update_ema: bool = True,
                 loss_fn: LossFn | None = None):
        self.state, self.cfg, self.data, self.schedule = state, cfg, data, schedule
        self.net = state.model if net is None else net  # the model, or its DDP / compiled wrapper
        self.update_ema = update_ema
        self.loss_fn = loss_fn or self.p_losses
        self.device = data.images.device
        self.null_label = getattr(state.model, "num_classes", None)
        self.autocast = torch.autocast(self.device.type, dtype=torch.bfloat16,
                                       enabled=cfg.runtime.bf16 and self.device.type == "cuda",
                                       cache_enabled=not state.graphed)
        self.graph: Captured | None = None
        self.capture_at = state.step + EAGER_STEPS_BEFORE_CAPTURE
        self.first_bad = torch.full((), NO_BAD_STEP, device=self.device, dtype=torch.long)

    def draw(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """A batch (Algorithm 1, lines 2-4): x0 [B, C, H, W] in [-1, 1], t [B], noise, labels [B] or None."""
        tc, gen, dev = self.cfg.train, self.state.gen, self.device
        images, labels = self.data.images, self.data.labels
        idx = torch.randint(0, len(images), (tc.batch_size,), device=dev, generator=gen)
        x0 = to_model_range(images[idx])
        t = torch.randint(0, self.schedule.num_timesteps, (tc.batch_size,), device=dev, generator=gen)
        noise = torch.randn(x0.shape, device=dev, generator=gen)
        y = None
        if self.cfg.model.class_conditional:  # label dropout trains the null class for classifier-free guidance
            drop = torch.rand(tc.batch_size, device=dev, generator=gen) < tc.label_dropout
            y = torch.where(drop, torch.full_like(labels[idx], self.null_label), labels[idx])
        return x0, t, noise, y

    def p_losses(self, net: Callable[..., torch.Tensor], schedule: Schedule, x0: torch.Tensor, t: torch.Tensor,
                 noise: torch.Tensor, y: torch.Tensor | None) -> torch.Tensor:
        """The default loss: ddpm.losses.p_losses with the diffusion settings."""
        d = self.cfg.diffusion
        return p_losses(net, schedule, x0, t, noise, labels=y, prediction=d.prediction, weighting=d.loss_weighting,
                        min_snr_gamma=d.min_snr_gamma)

    def update(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor, y: torch.Tensor | None) -> torch.Tensor:
        """One optimisation step (Algorithm 1, line 5) plus the EMA; returns the loss (0-d, on the device)."""
        s, tc = self.state, self.cfg.train
        with self.autocast:
            loss = self.loss_fn(self.net, self.schedule, x0, t, noise, y)
        s.opt.zero_grad(set_to_none=not s.graphed)
        loss.backward()
        if tc.grad_clip > 0:
            nn.utils.clip_grad_norm_(s.model.parameters(), tc.grad_clip)
        s.opt.step()
        if self.update_ema:
            ema_update(s.ema, s.model, s.decay_t if s.graphed else ema_decay_at(s.step, tc.ema_decay, tc.ema_warmup))
        return loss.detach().float()

    def __call__(self) -> torch.Tensor:
        s = self.state
        batch = self.draw()
        if s.graphed:
            loss = self._graphed_update(batch)
        else:
            for g in s.opt.param_groups:
                g["lr"] = s.lr(s.step)
            loss = self.update(*batch)
        # Record the first non-finite step on the device; read it only when the host syncs anyway.
        bad = ~torch.isfinite(loss.detach())
        self.first_bad = torch.where(bad, torch.minimum(self.first_bad, torch.full_like(self.first_bad, s.step + 1)),
                                     self.first_bad)
        s.step += 1
        return loss

    def _graphed_update(self, batch: tuple) -> torch.Tensor:
        s, tc = self.state, self.cfg.train
        s.lr_t.fill_(s.lr(s.step))
        s.decay_t.fill_(ema_decay_at(s.step, tc.ema_decay, tc.ema_warmup))
        if self.graph is None and s.step >= self.capture_at:
            self.graph = capture(self.update, *batch)
        if self.graph is not None:
            return self.graph.replay(*batch)
        return on_side_stream(self.update, *batch)

    def first_nonfinite(self) -> int | None:
        """The first step (1-based) whose loss was not finite, or None; synchronizes with the device."""
        first = int(self.first_bad)
        return None if first == NO_BAD_STEP else first


def make_train_step(state: TrainState, cfg: Config, data: TrainData, schedule: Schedule,
                    net: Callable[..., torch.Tensor] | None = None, update_ema: bool = True,
                    loss_fn: LossFn | None = None) -> TrainStep:
    """The training step of `state` on `data`: `loss = step()` takes one step and advances state.step.

    `net` is what the loss calls (default: state.model; a DistributedDataParallel or torch.compile
    wrapper of it); `update_ema` is False on the ranks other than 0 of a distributed run; `loss_fn`
    replaces p_losses (e.g. ddpm.distill's), called under the step's autocast and CUDA graph.
    """
    return TrainStep(state, cfg, data, schedule, net, update_ema, loss_fn)
