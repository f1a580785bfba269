"""The training objective (Ho et al. 2020, eq. 14 and Algorithm 1), with the usual variants.

`prediction` picks the network's target: "eps" (the paper's L_simple), "v" (Salimans & Ho 2022) or
"x0". `weighting="min_snr"` applies min-SNR-gamma weighting (Hang et al. 2023), expressed for each
target so that all three optimise the same x0-space objective up to the clamp.
"""

from __future__ import annotations

from typing import Callable

import torch

from ddpm.schedule import Schedule, extract, q_sample

Denoiser = Callable[..., torch.Tensor]


def snr(schedule: Schedule, t: torch.Tensor) -> torch.Tensor:
    """Signal-to-noise ratio alpha_bar_t / (1 - alpha_bar_t) for timesteps t [B]; returns [B]."""
    acp = schedule.alphas_cumprod.to(t.device)[t]
    return acp / (1.0 - acp)


def p_losses(denoise_model: Denoiser, schedule: Schedule, x_start: torch.Tensor, t: torch.Tensor,
             noise: torch.Tensor | None = None, labels: torch.Tensor | None = None, prediction: str = "eps",
             weighting: str = "none", min_snr_gamma: float = 5.0) -> torch.Tensor:
    """Mean squared error between the network's output and its target; a scalar.

    x_start: [B, C, H, W] in [-1, 1]; t: int64 [B] in [0, T-1]; labels: int64 [B] or None.
    """
    if noise is None:
        noise = torch.randn_like(x_start)
    x_noisy = q_sample(schedule, x_start, t, noise)
    output = denoise_model(x_noisy, t, labels) if labels is not None else denoise_model(x_noisy, t)
    if prediction == "eps":
        target = noise
    elif prediction == "x0":
        target = x_start
    elif prediction == "v":
        target = (extract(schedule.sqrt_alphas_cumprod, t, x_start.shape) * noise
                  - extract(schedule.sqrt_one_minus_alphas_cumprod, t, x_start.shape) * x_start)
    else:
        raise ValueError(f"prediction: unknown kind {prediction!r}; choose 'eps', 'v' or 'x0'")
    per_sample = (output.float() - target.float()).pow(2).mean(dim=tuple(range(1, x_start.ndim)))  # [B]
    if weighting == "none":
        return per_sample.mean()
    if weighting != "min_snr":
        raise ValueError(f"weighting: unknown kind {weighting!r}; choose 'none' or 'min_snr'")
    s = snr(schedule, t)
    clamped = s.clamp(max=min_snr_gamma)
    weight = {"eps": clamped / s, "x0": clamped, "v": clamped / (s + 1)}[prediction]
    return (weight * per_sample).mean()
