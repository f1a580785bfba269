"""The schedule's arithmetic in numpy float64, shared by `ddpm.schedule` (torch) and `ddpm.onnx_sampler` (no torch).

Timestep convention: t is an index in [0, T-1]; index 0 is the paper's t = 1. Every array is [T].
This module imports numpy alone, so that the onnxruntime sampler can rebuild a schedule from an
exported model's metadata without PyTorch.
"""

from __future__ import annotations

import math

import numpy as np

from ddpm.errors import ConfigError

# The names of `schedule_arrays`' output, in the order `ddpm.schedule.Schedule` declares them.
SCHEDULE_ARRAYS = (
    "betas", "alphas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod",
    "sqrt_one_minus_alphas_cumprod", "sqrt_recip_alphas", "sqrt_recip_alphas_cumprod",
    "sqrt_recipm1_alphas_cumprod", "posterior_variance", "posterior_log_variance_clipped",
    "posterior_mean_coef1", "posterior_mean_coef2",
)


def linear_betas(timesteps: int, beta_start: float = 0.0001, beta_end: float = 0.02) -> np.ndarray:
    """The DDPM paper's linear schedule: betas [T], float64."""
    return np.linspace(beta_start, beta_end, timesteps, dtype=np.float64)


def cosine_betas(timesteps: int, s: float = 0.008, max_beta: float = 0.999) -> np.ndarray:
    """Nichol & Dhariwal (2021), eq. 17: alpha_bar(t) = cos^2(((t/T + s) / (1 + s)) * pi/2); betas [T], float64.

    beta_t = 1 - alpha_bar(t+1) / alpha_bar(t), clipped at `max_beta` to avoid a singularity at t = T.
    """
    steps = np.arange(timesteps + 1, dtype=np.float64) / timesteps
    f = np.cos((steps + s) / (1 + s) * math.pi / 2) ** 2
    return np.minimum(1 - f[1:] / f[:-1], max_beta)


def make_betas(schedule: str, timesteps: int, beta_start: float = 0.0001, beta_end: float = 0.02,
               cosine_s: float = 0.008) -> np.ndarray:
    """Betas [T] float64 for a schedule named "linear" or "cosine" (the fields of DiffusionConfig)."""
    if schedule == "linear":
        return linear_betas(timesteps, beta_start, beta_end)
    if schedule == "cosine":
        return cosine_betas(timesteps, cosine_s)
    raise ValueError(f"diffusion.schedule: unknown schedule {schedule!r}; choose 'linear' or 'cosine'")


def schedule_arrays(betas: np.ndarray) -> dict[str, np.ndarray]:
    """Every per-timestep constant of the diffusion from betas [T]; float64 arrays [T], keyed as SCHEDULE_ARRAYS."""
    b = np.asarray(betas, dtype=np.float64)
    if b.ndim != 1 or len(b) == 0 or not bool(((b > 0) & (b < 1)).all()):
        raise ValueError("betas must be a non-empty 1-D array with every value in (0, 1)")
    alphas = 1.0 - b
    acp = np.cumprod(alphas)
    acp_prev = np.concatenate([[1.0], acp[:-1]])  # alpha_bar_{-1} = 1
    post_var = b * (1.0 - acp_prev) / (1.0 - acp)  # beta_tilde_t, eq. 7
    # beta_tilde_0 = 0, so its log is replaced by that of t = 1 (as in the paper's code).
    post_log_var = np.log(np.concatenate([post_var[1:2], post_var[1:]])) if len(b) > 1 else np.log(b)
    return dict(
        betas=b,
        alphas=alphas,
        alphas_cumprod=acp,
        alphas_cumprod_prev=acp_prev,
        sqrt_alphas_cumprod=np.sqrt(acp),
        sqrt_one_minus_alphas_cumprod=np.sqrt(1.0 - acp),
        sqrt_recip_alphas=np.sqrt(1.0 / alphas),
        sqrt_recip_alphas_cumprod=np.sqrt(1.0 / acp),
        sqrt_recipm1_alphas_cumprod=np.sqrt(1.0 / acp - 1),
        posterior_variance=post_var,
        posterior_log_variance_clipped=post_log_var,
        posterior_mean_coef1=b * np.sqrt(acp_prev) / (1.0 - acp),  # coefficient of x_0 in mu_tilde_t, eq. 7
        posterior_mean_coef2=(1.0 - acp_prev) * np.sqrt(alphas) / (1.0 - acp),  # coefficient of x_t
    )


def ddim_timesteps(num_timesteps: int, steps: int) -> list[int]:
    """The `steps` timesteps DDIM visits, descending: uniform stride T // steps from 0 (Song et al. 2021, C.2).

    Shared by the torch and the onnxruntime samplers; ConfigError (a ValueError) for a count outside [1, T]."""
    if not 0 < steps <= num_timesteps:
        raise ConfigError(f"steps: {steps} must be in [1, {num_timesteps}] (the schedule's T)")
    stride = num_timesteps // steps
    return list(range(0, stride * steps, stride))[::-1]


def trailing_timesteps(num_timesteps: int, steps: int) -> list[int]:
    """The `steps` timesteps of a distilled sampler, descending: round(k T / steps) - 1 for k = steps..1.

    The grid starts at T-1, pure noise, and dividing `steps` by F keeps every F-th point of it
    (round(F k T / F n) = round(k T / n)), so a student's grid is its teacher's every F-th step (F = 2:
    Salimans & Ho 2022, Algorithm 2, in discrete time). ConfigError for a count outside [1, T]."""
    if not 0 < steps <= num_timesteps:
        raise ConfigError(f"steps: {steps} must be in [1, {num_timesteps}] (the schedule's T)")
    return [round(k * num_timesteps / steps) - 1 for k in range(steps, 0, -1)]


def sampling_timesteps(num_timesteps: int, steps: int, distilled_steps: int = 0) -> list[int]:
    """The DDIM timesteps of a `steps`-step sampler: the uniform grid of a trained model, the trailing grid of
    a student distilled to `distilled_steps` (diffusion.distilled_steps; 0: not distilled).

    A student was trained on its own grid alone, so another step count is refused (ConfigError)."""
    if not distilled_steps:
        return ddim_timesteps(num_timesteps, steps)
    if steps != distilled_steps:
        raise ConfigError(f"steps: {steps} asked of a student distilled to {distilled_steps} DDIM steps "
                          f"(diffusion.distilled_steps); sample it with exactly {distilled_steps} steps "
                          f"(--steps {distilled_steps} or sampler.steps)")
    return trailing_timesteps(num_timesteps, steps)


def check_eta(eta: float) -> None:
    """DDIM's eta must be a finite number >= 0 (NaN would turn every image into NaN, then black)."""
    if not (math.isfinite(eta) and eta >= 0):
        raise ConfigError(f"eta: {eta} is not allowed; use a finite number >= 0 (0: deterministic DDIM)")


def check_guidance_scale(scale: float) -> None:
    """A classifier-free guidance scale must be a finite number >= 0 (1: none, 0: unconditional)."""
    if not (math.isfinite(scale) and scale >= 0):
        raise ConfigError(f"guidance_scale: {scale} is not allowed; use a finite number >= 0 (1: no guidance)")


def check_options_apply(sampler: str, steps: int | None, guidance_scale: float | None, conditional: bool,
                        eta: float | None = None) -> None:
    """Command-line options that the sampling would ignore, refused rather than dropped: --steps and --eta with DDPM
    sampling (which takes every timestep with its own variance), --guidance for a model without classes (`None`:
    not given)."""
    if steps is not None and sampler != "ddim":
        raise ConfigError(f"--steps {steps}: the step count of DDIM sampling; DDPM sampling takes every timestep "
                          f"(use --sampler ddim with --steps)")
    if eta is not None and sampler != "ddim":
        raise ConfigError(f"--eta {eta}: DDIM's eta; DDPM sampling draws its noise with sampler.variance "
                          f"(use --sampler ddim with --eta)")
    if guidance_scale is not None:
        check_guidance_scale(guidance_scale)
    if guidance_scale is not None and not conditional:
        raise ConfigError(f"--guidance {guidance_scale}: the model is not class-conditional, so classifier-free "
                          f"guidance has nothing to act on")
