"""Reverse-process samplers: stateless free functions that share one signature.

    sample_fn(model, schedule, x_T, *, labels, guidance_scale, prediction, clip_denoised,
              step_noise, generator, return_trajectory, **options) -> x_0 [, trajectory]

`model` is anything callable as `model(x_t [B, C, H, W], t int64 [B], labels int64 [B] | None)`,
for example the U-Net or an onnxruntime session wrapper. Timesteps t are indices in [0, T-1].
`step_noise`, when given, supplies the per-step Gaussian noise (indexable by step number, each
[B, C, H, W]) so that two implementations can be compared from the same random numbers.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch

from ddpm.schedule import Schedule, extract, split_prediction
from ddpm.schedule_math import check_eta, check_guidance_scale, ddim_timesteps

Denoiser = Callable[..., torch.Tensor]


def guided(model: Denoiser, null_label: int, guidance_scale: float) -> Denoiser:
    """Classifier-free guidance (Ho & Salimans 2022): eps = eps_null + s (eps_y - eps_null).

    Scale 1 is plain conditional sampling; 0 is unconditional. Both branches run as one batch.
    """
    def denoise(x: torch.Tensor, t: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        if labels is None or guidance_scale == 1.0:
            return model(x, t, labels)
        null = torch.full_like(labels, null_label)
        if guidance_scale == 0.0:
            return model(x, t, null)
        out = model(torch.cat([x, x]), torch.cat([t, t]), torch.cat([labels, null]))
        cond, uncond = out.chunk(2)
        return uncond + guidance_scale * (cond - uncond)
    return denoise


def _call(model: Denoiser, x: torch.Tensor, t: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
    return model(x, t, labels) if labels is not None else model(x, t)


def _noise(step_noise: Sequence[torch.Tensor] | None, i: int, x: torch.Tensor,
           generator: torch.Generator | None) -> torch.Tensor:
    if step_noise is not None:
        return step_noise[i].to(device=x.device, dtype=x.dtype)
    return torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)


@torch.no_grad()
def p_sample(model: Denoiser, schedule: Schedule, x: torch.Tensor, t: torch.Tensor, t_index: int, *,
             labels: torch.Tensor | None = None, prediction: str = "eps", variance: str = "beta_tilde",
             clip_denoised: bool = True, noise: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """One ancestral step x_t -> x_{t-1} (Algorithm 2); returns (x_{t-1}, predicted x_0), each [B, C, H, W].

    The mean is the posterior mean mu_tilde(x_t, x0_hat) of eq. 7; without clipping it equals
    eq. 11: 1/sqrt(alpha_t) (x_t - beta_t / sqrt(1 - alpha_bar_t) eps_theta). `variance` is
    "beta_tilde" (sigma^2 = posterior variance) or "beta" (sigma^2 = beta_t). No noise at t_index 0.
    """
    output = _call(model, x, t, labels).float()
    _, x0 = split_prediction(schedule, x, t, output, prediction)
    if clip_denoised:
        x0 = x0.clamp(-1.0, 1.0)
    mean = (extract(schedule.posterior_mean_coef1, t, x.shape) * x0
            + extract(schedule.posterior_mean_coef2, t, x.shape) * x)
    if t_index == 0:
        return mean, x0
    if variance == "beta_tilde":
        log_var = extract(schedule.posterior_log_variance_clipped, t, x.shape)
    elif variance == "beta":
        log_var = extract(schedule.betas, t, x.shape).log()
    else:
        raise ValueError(f"variance: unknown kind {variance!r}; choose 'beta_tilde' or 'beta'")
    if noise is None:
        noise = torch.randn_like(x)
    return mean + (0.5 * log_var).exp() * noise, x0


@torch.no_grad()
def p_sample_loop(model: Denoiser, schedule: Schedule, x_T: torch.Tensor, *, labels: torch.Tensor | None = None,
                  guidance_scale: float = 1.0, prediction: str = "eps", clip_denoised: bool = True,
                  step_noise: Sequence[torch.Tensor] | None = None, generator: torch.Generator | None = None,
                  return_trajectory: bool = False, variance: str = "beta_tilde", trajectory_every: int | None = None,
                  ) -> torch.Tensor | tuple[torch.Tensor, list[torch.Tensor]]:
    """DDPM ancestral sampling from t = T-1 down to 0 (Algorithm 2). x_T: [B, C, H, W] ~ N(0, I).

    step_noise[i] is the noise of the i-th step taken (i = 0 is t = T-1); T-1 entries are used.
    The trajectory holds x_T and then x_t every `trajectory_every` steps (default T // 10), ending at x_0.
    """
    T = schedule.num_timesteps
    model = _guided_if(model, labels, guidance_scale)
    every = trajectory_every or max(T // 10, 1)
    x, traj = x_T, [x_T]
    for i, t_index in enumerate(reversed(range(T))):
        t = torch.full((x.shape[0],), t_index, device=x.device, dtype=torch.long)
        noise = _noise(step_noise, i, x, generator) if t_index > 0 else None
        x, _ = p_sample(model, schedule, x, t, t_index, labels=labels, prediction=prediction, variance=variance,
                        clip_denoised=clip_denoised, noise=noise)
        if return_trajectory and (t_index % every == 0):
            traj.append(x)
    return (x, traj) if return_trajectory else x


@torch.no_grad()
def ddim_sample_loop(model: Denoiser, schedule: Schedule, x_T: torch.Tensor, *, labels: torch.Tensor | None = None,
                     guidance_scale: float = 1.0, prediction: str = "eps", clip_denoised: bool = True,
                     step_noise: Sequence[torch.Tensor] | None = None, generator: torch.Generator | None = None,
                     return_trajectory: bool = False, steps: int = 50, eta: float = 0.0,
                     timesteps: Sequence[int] | None = None,
                     ) -> torch.Tensor | tuple[torch.Tensor, list[torch.Tensor]]:
    """DDIM sampling (Song et al. 2021, eq. 12) over `steps` timesteps; eta = 0 is deterministic,
    eta = 1 with all T steps is DDPM with sigma^2 = beta_tilde. x_T: [B, C, H, W].

    `timesteps` (descending, in [0, T-1]) replaces the uniform grid of `steps`, e.g. a distilled
    student's (ddpm.schedule_math.sampling_timesteps). step_noise[i] is the noise of the i-th step
    taken; only used when eta > 0.
    """
    check_eta(eta)
    model = _guided_if(model, labels, guidance_scale)
    seq = list(timesteps) if timesteps is not None else ddim_timesteps(schedule.num_timesteps, steps)
    acp = schedule.alphas_cumprod.to(x_T.device)
    x, traj = x_T, [x_T]
    for i, t_index in enumerate(seq):
        t = torch.full((x.shape[0],), t_index, device=x.device, dtype=torch.long)
        output = _call(model, x, t, labels).float()
        eps, x0 = split_prediction(schedule, x, t, output, prediction)
        if clip_denoised:
            x0 = x0.clamp(-1.0, 1.0)
            eps = (x - acp[t_index].sqrt() * x0) / (1 - acp[t_index]).sqrt()
        a_t = acp[t_index]
        a_prev = acp[seq[i + 1]] if i + 1 < len(seq) else torch.ones_like(a_t)
        sigma = eta * ((1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev)).sqrt()
        x = a_prev.sqrt() * x0 + (1 - a_prev - sigma ** 2).clamp(min=0).sqrt() * eps
        if eta > 0 and i + 1 < len(seq):
            x = x + sigma * _noise(step_noise, i, x, generator)
        if return_trajectory:
            traj.append(x)
    return (x, traj) if return_trajectory else x


def _guided_if(model: Denoiser, labels: torch.Tensor | None, guidance_scale: float) -> Denoiser:
    check_guidance_scale(guidance_scale)
    if labels is None or guidance_scale == 1.0:
        return model
    null_label = getattr(model, "num_classes", None)
    if null_label is None:
        raise ValueError("classifier-free guidance needs the model's null class: pass a model with `num_classes`, "
                         "or wrap it with ddpm.samplers.guided(model, null_label, scale) yourself")
    return guided(model, null_label, guidance_scale)


SAMPLERS = {"ddpm": p_sample_loop, "ddim": ddim_sample_loop}


def get_sampler(name: str) -> Callable[..., torch.Tensor]:
    if name not in SAMPLERS:
        raise ValueError(f"sampler: unknown sampler {name!r}; choose one of {', '.join(SAMPLERS)}")
    return SAMPLERS[name]
