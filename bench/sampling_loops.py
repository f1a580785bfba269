"""The benchmark's sampling loops: DDPM and DDIM with every step reading only device tensors.

They compute what ddpm.samplers computes (p_sample_loop: posterior mean with x0 clipping,
sigma^2 = beta_tilde; ddim_sample_loop with eta = 0), rewritten so that one step reads only device
tensors: the step number lives in a static int64 tensor that the host fills before each step, and
t and the step's coefficients are gathered from per-step tables on the device. That lets a step be
captured once in a CUDA graph (bench.harness.capture, ddpm.graphed) and replayed with changing
timesteps.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from bench import harness as H
from ddpm.samplers import ddim_timesteps
from ddpm.schedule import Schedule

MODES = ("eager", "graph", "compile", "compile-graph", "reduce-overhead")
TORCH_COMPILE_MODE = {"compile": "default", "compile-graph": "default", "reduce-overhead": "reduce-overhead"}
GRAPH_MODES = {"graph", "compile-graph"}


@dataclass(frozen=True)
class Chain:
    """Per-step tables of one sampling chain, on the device, indexed by step number i (not by t).

    Step i visits timestep t[i] (descending, in [0, T-1]); every coefficient is float32 [n].
    """

    kind: str  # "ddpm" or "ddim"
    t: torch.Tensor  # int64 [n]
    recip: torch.Tensor  # sqrt(1 / alpha_bar_t): x0 = recip * x_t - recipm1 * eps (eq. 4 for x0)
    recipm1: torch.Tensor  # sqrt(1 / alpha_bar_t - 1)
    a: torch.Tensor  # ddpm: posterior_mean_coef1 (of x0, eq. 7); ddim: sqrt(alpha_bar_t)
    b: torch.Tensor  # ddpm: posterior_mean_coef2 (of x_t, eq. 7); ddim: sqrt(1 - alpha_bar_t)
    c: torch.Tensor  # ddpm: sigma_t = exp(log beta_tilde_t / 2), 0 at t = 0; ddim: sqrt(alpha_bar_prev)
    d: torch.Tensor  # ddpm: unused (0); ddim: sqrt(1 - alpha_bar_prev) (eta = 0)

    @property
    def n(self) -> int:
        return len(self.t)


def ddpm_chain(s: Schedule) -> Chain:
    """Algorithm 2 over all T steps, as ddpm.samplers.p_sample (variance beta_tilde, x0 clipped)."""
    t = torch.arange(s.num_timesteps - 1, -1, -1, device=s.device)
    sigma = (0.5 * s.posterior_log_variance_clipped[t]).exp()
    sigma = torch.where(t == 0, torch.zeros_like(sigma), sigma)  # no noise at the last step
    return Chain("ddpm", t, s.sqrt_recip_alphas_cumprod[t], s.sqrt_recipm1_alphas_cumprod[t],
                 s.posterior_mean_coef1[t], s.posterior_mean_coef2[t], sigma, torch.zeros_like(sigma))


def ddim_chain(s: Schedule, steps: int) -> Chain:
    """DDIM (Song et al. 2021, eq. 12) with eta = 0, as ddpm.samplers.ddim_sample_loop."""
    seq = ddim_timesteps(s.num_timesteps, steps)
    t = torch.tensor(seq, device=s.device)
    acp = s.alphas_cumprod
    a_t = acp[t]
    a_prev = torch.cat([acp[t[1:]], torch.ones(1, device=s.device)])
    return Chain("ddim", t, s.sqrt_recip_alphas_cumprod[t], s.sqrt_recipm1_alphas_cumprod[t],
                 a_t.sqrt(), (1 - a_t).sqrt(), a_prev.sqrt(), (1 - a_prev).clamp(min=0).sqrt())


def make_step(net: Callable[..., torch.Tensor], ch: Chain, batch: int, device: torch.device, bf16: bool,
              before_net: Callable[[], None] = lambda: None, fmt: torch.memory_format = torch.contiguous_format,
              ) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """step(x_t [B, C, H, W] float32, i int64 [1]) -> x_{next} [B, C, H, W] float32 in layout `fmt`; no host sync."""

    def at(table: torch.Tensor, i: torch.Tensor) -> torch.Tensor:
        return table.index_select(0, i).squeeze(0)  # 0-dim, gathered on the device

    @torch.no_grad()
    def step(x: torch.Tensor, i: torch.Tensor) -> torch.Tensor:
        t = ch.t.index_select(0, i).expand(batch)  # [B], the same timestep for the whole batch
        before_net()
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16, cache_enabled=False):
            eps = net(x, t).float()
        x0 = (at(ch.recip, i) * x - at(ch.recipm1, i) * eps).clamp(-1.0, 1.0)
        if ch.kind == "ddim":
            eps = (x - at(ch.a, i) * x0) / at(ch.b, i)  # eps consistent with the clipped x0
            x_next = at(ch.c, i) * x0 + at(ch.d, i) * eps
        else:
            mean = at(ch.a, i) * x0 + at(ch.b, i) * x
            x_next = mean + at(ch.c, i) * torch.randn_like(x)
        return x_next.contiguous(memory_format=fmt)
    return step


class Runner:
    """Runs one chain at one batch size in one mode; `sample(x_T)` returns x_0 (a buffer that the
    next call overwrites in graph modes)."""

    def __init__(self, net: Callable[..., torch.Tensor], ch: Chain, batch: int, shape: tuple[int, int, int],
                 mode: str, device: torch.device, bf16: bool, channels_last: bool, warmup: int):
        self.ch, self.mode, self.device = ch, mode, device
        self.i = torch.zeros(1, dtype=torch.long, device=device)
        # one memory layout throughout, so that a compiled U-Net (which guards on strides) never recompiles
        self.fmt = fmt = torch.channels_last if channels_last else torch.contiguous_format
        mark = torch.compiler.cudagraph_mark_step_begin if mode == "reduce-overhead" else (lambda: None)
        self.step = make_step(net, ch, batch, device, bf16, before_net=mark, fmt=fmt)
        self.x = torch.randn(batch, *shape, device=device).contiguous(memory_format=fmt)
        self.replay: Callable[[], None] | None = None
        if mode in GRAPH_MODES:
            x = self.x  # the static buffer: read and overwritten by every replay
            self.replay = H.capture(lambda: x.copy_(self.step(x, self.i)), device, warmup=warmup)
        else:
            for _ in range(warmup):
                self.step(self.x, self.i)

    def advance(self, i: int) -> None:
        self.i.fill_(i)
        if self.replay is not None:
            self.replay()
        else:
            self.x = self.step(self.x, self.i)

    def run(self, x_T: torch.Tensor, steps: int | None = None) -> torch.Tensor:
        """Steps 0..steps-1 of the chain (default: all) from x_T."""
        if self.replay is not None:
            self.x.copy_(x_T)
        else:
            self.x = x_T.contiguous(memory_format=self.fmt)
        for i in range(self.ch.n if steps is None else steps):
            self.advance(i)
        return self.x
