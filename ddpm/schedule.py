"""Variance schedules and the forward process q(x_t | x_0) (Ho et al. 2020, section 2).

Timestep convention, used everywhere in this package: t is an index in [0, T-1]. Index 0 is the
paper's t = 1 (the least noisy step), index T-1 is the paper's t = T.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from ddpm.config import DiffusionConfig
from ddpm.schedule_math import cosine_betas, linear_betas, make_betas, schedule_arrays


def linear_beta_schedule(timesteps: int, beta_start: float = 0.0001, beta_end: float = 0.02) -> torch.Tensor:
    """The DDPM paper's linear schedule: betas [T], float64."""
    return torch.from_numpy(linear_betas(timesteps, beta_start, beta_end))


def cosine_beta_schedule(timesteps: int, s: float = 0.008, max_beta: float = 0.999) -> torch.Tensor:
    """Nichol & Dhariwal (2021), eq. 17: alpha_bar(t) = cos^2(((t/T + s) / (1 + s)) * pi/2); betas [T], float64.

    beta_t = 1 - alpha_bar(t+1) / alpha_bar(t), clipped at `max_beta` to avoid a singularity at t = T.
    """
    return torch.from_numpy(cosine_betas(timesteps, s, max_beta))


@dataclass(frozen=True)
class Schedule:
    """Every per-timestep constant of the diffusion, each a float32 tensor of shape [T].

    Computed once in float64 (from `betas`) and stored in float32; moved to a device once with `.to()`.
    """

    betas: torch.Tensor
    alphas: torch.Tensor
    alphas_cumprod: torch.Tensor  # alpha_bar_t
    alphas_cumprod_prev: torch.Tensor  # alpha_bar_{t-1}, with alpha_bar_{-1} = 1
    sqrt_alphas_cumprod: torch.Tensor
    sqrt_one_minus_alphas_cumprod: torch.Tensor
    sqrt_recip_alphas: torch.Tensor
    sqrt_recip_alphas_cumprod: torch.Tensor
    sqrt_recipm1_alphas_cumprod: torch.Tensor
    posterior_variance: torch.Tensor  # beta_tilde_t, eq. 7
    posterior_log_variance_clipped: torch.Tensor  # log beta_tilde_t, with t=0 replaced by t=1 (beta_tilde_0 = 0)
    posterior_mean_coef1: torch.Tensor  # coefficient of x_0 in mu_tilde_t, eq. 7
    posterior_mean_coef2: torch.Tensor  # coefficient of x_t in mu_tilde_t, eq. 7

    @classmethod
    def from_betas(cls, betas: torch.Tensor) -> "Schedule":
        # The float64 arithmetic lives in ddpm.schedule_math, shared with the torch-free ONNX sampler.
        arrays = schedule_arrays(betas.detach().cpu().to(torch.float64).numpy())
        return cls(**{k: torch.from_numpy(v).to(torch.float32) for k, v in arrays.items()})

    @classmethod
    def from_config(cls, cfg: DiffusionConfig) -> "Schedule":
        return cls.from_betas(torch.from_numpy(
            make_betas(cfg.schedule, cfg.timesteps, cfg.beta_start, cfg.beta_end, cfg.cosine_s)))

    @property
    def num_timesteps(self) -> int:
        return len(self.betas)

    @property
    def device(self) -> torch.device:
        return self.betas.device

    def to(self, device: torch.device | str) -> "Schedule":
        return Schedule(**{f.name: getattr(self, f.name).to(device) for f in dataclasses.fields(self)})


def extract(a: torch.Tensor, t: torch.Tensor, x_shape: torch.Size | tuple[int, ...]) -> torch.Tensor:
    """Gather a[t] for a batch of timesteps t [B] and reshape to [B, 1, 1, 1] to broadcast over x_shape."""
    out = a.to(t.device).gather(-1, t)
    return out.reshape(t.shape[0], *((1,) * (len(x_shape) - 1)))


def q_sample(schedule: Schedule, x_start: torch.Tensor, t: torch.Tensor,
             noise: torch.Tensor | None = None) -> torch.Tensor:
    """Sample x_t ~ q(x_t | x_0) by eq. 4: x_t = sqrt(alpha_bar_t) x_0 + sqrt(1 - alpha_bar_t) eps.

    x_start: [B, C, H, W] in [-1, 1]; t: int64 [B] in [0, T-1]; noise: like x_start (default N(0, I)).
    """
    if noise is None:
        noise = torch.randn_like(x_start)
    return (extract(schedule.sqrt_alphas_cumprod, t, x_start.shape) * x_start
            + extract(schedule.sqrt_one_minus_alphas_cumprod, t, x_start.shape) * noise)


def predict_start_from_noise(schedule: Schedule, x_t: torch.Tensor, t: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """x_0 = (x_t - sqrt(1 - alpha_bar_t) eps) / sqrt(alpha_bar_t), eq. 4 solved for x_0."""
    return (extract(schedule.sqrt_recip_alphas_cumprod, t, x_t.shape) * x_t
            - extract(schedule.sqrt_recipm1_alphas_cumprod, t, x_t.shape) * eps)


def predict_noise_from_start(schedule: Schedule, x_t: torch.Tensor, t: torch.Tensor, x0: torch.Tensor) -> torch.Tensor:
    """eps = (x_t - sqrt(alpha_bar_t) x_0) / sqrt(1 - alpha_bar_t)."""
    return ((extract(schedule.sqrt_recip_alphas_cumprod, t, x_t.shape) * x_t - x0)
            / extract(schedule.sqrt_recipm1_alphas_cumprod, t, x_t.shape))


def split_prediction(schedule: Schedule, x_t: torch.Tensor, t: torch.Tensor, output: torch.Tensor,
                     prediction: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Turn a network output of kind `prediction` ("eps", "v" or "x0") into (eps, x0), each like x_t.

    v-prediction (Salimans & Ho 2022): v = sqrt(alpha_bar) eps - sqrt(1 - alpha_bar) x0.
    """
    if prediction == "eps":
        return output, predict_start_from_noise(schedule, x_t, t, output)
    if prediction == "x0":
        return predict_noise_from_start(schedule, x_t, t, output), output
    if prediction == "v":
        a = extract(schedule.sqrt_alphas_cumprod, t, x_t.shape)
        s = extract(schedule.sqrt_one_minus_alphas_cumprod, t, x_t.shape)
        return s * x_t + a * output, a * x_t - s * output
    raise ValueError(f"prediction: unknown kind {prediction!r}; choose 'eps', 'v' or 'x0'")
