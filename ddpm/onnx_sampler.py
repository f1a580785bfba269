"""Sampling with onnxruntime and numpy alone: no PyTorch is imported, at load time or at run time.

An exported model (`ddpm export`) carries everything a sampler needs in its metadata; the
network and its schedule come from ddpm.onnx_model.OnnxDenoiser. The DDPM and DDIM loops here
mirror `ddpm.samplers` operation for operation in float32, including the `step_noise`
convention: step_noise[i] is the noise of the i-th step taken. Timesteps t are indices in [0, T-1].

On CUDA the network's inputs and output live in preallocated GPU buffers bound through IO
binding; the sampler's per-step arithmetic (a few elementwise operations) runs in numpy on the
host, so x crosses the bus twice per step (B*C*H*W*4 bytes each way). bench/bench_onnx_sampling.py
measures what that costs against the network alone.
"""

from __future__ import annotations

import io
import sys
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from ddpm import counter_noise, progress
from ddpm.fileio import atomic_write_bytes, grid_png
from ddpm.layout import SampleFiles
from ddpm.errors import ConfigError, OnnxModelError
from ddpm.onnx_model import Array, NumpySchedule, OnnxDenoiser, resolve_provider
from ddpm.config import MAX_SEED
from ddpm.schedule_math import (check_eta, check_guidance_scale, check_options_apply, ddim_timesteps,
                                 sampling_timesteps)

# ---- The samplers: numpy mirrors of ddpm.samplers, with the same signature and float32 arithmetic. ----

Denoiser = Callable[..., Array]
NOISE_SOURCES = ("pcg64", "counter")  # numpy's seeded PCG64 drawn in order, or ddpm.counter_noise (the web page's)
# `ddpm onnx-sample`'s settings for an export whose metadata records none (OnnxDenoiser.sampler_defaults)
FALLBACK_SAMPLER = {"steps": 50, "eta": 0.0, "guidance_scale": 1.0}


def guided(model: Denoiser, null_label: int, guidance_scale: float) -> Denoiser:
    """Classifier-free guidance (Ho & Salimans 2022): eps = eps_null + s (eps_y - eps_null), one batch of 2B."""
    def denoise(x: Array, t: Array, labels: Array | None = None) -> Array:
        if labels is None or guidance_scale == 1.0:
            return model(x, t, labels)
        null = np.full_like(labels, null_label)
        if guidance_scale == 0.0:
            return model(x, t, null)
        out = model(np.concatenate([x, x]), np.concatenate([t, t]), np.concatenate([labels, null]))
        cond, uncond = np.split(out, 2)
        return uncond + np.float32(guidance_scale) * (cond - uncond)
    return denoise


def _guided_if(model: Denoiser, labels: Array | None, guidance_scale: float) -> Denoiser:
    check_guidance_scale(guidance_scale)
    if labels is None or guidance_scale == 1.0:
        return model
    null_label = getattr(model, "num_classes", None)
    if null_label is None:
        raise ValueError("classifier-free guidance needs the model's null class: pass a model with `num_classes`")
    return guided(model, null_label, guidance_scale)


def _call(model: Denoiser, x: Array, t: Array, labels: Array | None) -> Array:
    out = model(x, t, labels) if labels is not None else model(x, t)
    return out.astype(np.float32, copy=False)


def _noise(step_noise: Sequence[Array] | None, i: int, x: Array, rng: np.random.Generator | None) -> Array:
    if step_noise is not None:
        return np.asarray(step_noise[i], dtype=np.float32)
    return (rng or np.random.default_rng()).standard_normal(x.shape, dtype=np.float32)


def split_prediction(s: NumpySchedule, x_t: Array, t_index: int, output: Array, prediction: str) -> tuple[Array, Array]:
    """A network output of kind "eps", "v" or "x0" -> (eps, x0), as ddpm.schedule.split_prediction."""
    if prediction == "eps":
        return output, s.sqrt_recip_alphas_cumprod[t_index] * x_t - s.sqrt_recipm1_alphas_cumprod[t_index] * output
    if prediction == "x0":
        return (s.sqrt_recip_alphas_cumprod[t_index] * x_t - output) / s.sqrt_recipm1_alphas_cumprod[t_index], output
    if prediction == "v":
        a, sd = s.sqrt_alphas_cumprod[t_index], s.sqrt_one_minus_alphas_cumprod[t_index]
        return sd * x_t + a * output, a * x_t - sd * output
    raise ValueError(f"prediction: unknown kind {prediction!r}; choose 'eps', 'v' or 'x0'")


def p_sample(model: Denoiser, s: NumpySchedule, x: Array, t_index: int, *, labels: Array | None = None,
             prediction: str = "eps", variance: str = "beta_tilde", clip_denoised: bool = True,
             noise: Array | None = None) -> tuple[Array, Array]:
    """One ancestral step x_t -> x_{t-1} (Algorithm 2, mean by eq. 7); returns (x_{t-1}, x0_hat), each [B, C, H, W]."""
    t = np.full((x.shape[0],), t_index, dtype=np.int64)
    _, x0 = split_prediction(s, x, t_index, _call(model, x, t, labels), prediction)
    if clip_denoised:
        x0 = np.clip(x0, np.float32(-1.0), np.float32(1.0))
    mean = s.posterior_mean_coef1[t_index] * x0 + s.posterior_mean_coef2[t_index] * x
    if t_index == 0:
        return mean, x0
    if variance == "beta_tilde":
        log_var = s.posterior_log_variance_clipped[t_index]
    elif variance == "beta":
        log_var = np.log(s.betas[t_index])
    else:
        raise ValueError(f"variance: unknown kind {variance!r}; choose 'beta_tilde' or 'beta'")
    if noise is None:
        noise = np.random.default_rng().standard_normal(x.shape, dtype=np.float32)
    return mean + np.exp(np.float32(0.5) * log_var) * noise, x0


def p_sample_loop(model: Denoiser, s: NumpySchedule, x_T: Array, *, labels: Array | None = None,
                  guidance_scale: float = 1.0, prediction: str = "eps", clip_denoised: bool = True,
                  step_noise: Sequence[Array] | None = None, generator: np.random.Generator | None = None,
                  variance: str = "beta_tilde") -> Array:
    """DDPM ancestral sampling from t = T-1 down to 0 (Algorithm 2). x_T float32 [B, C, H, W] -> x_0.

    step_noise[i] is the noise of the i-th step taken (i = 0 is t = T-1); T-1 entries are used.
    """
    model = _guided_if(model, labels, guidance_scale)
    x = x_T.astype(np.float32, copy=False)
    for i, t_index in enumerate(reversed(range(s.num_timesteps))):
        noise = _noise(step_noise, i, x, generator) if t_index > 0 else None
        x, _ = p_sample(model, s, x, t_index, labels=labels, prediction=prediction, variance=variance,
                        clip_denoised=clip_denoised, noise=noise)
    return x


def ddim_sample_loop(model: Denoiser, s: NumpySchedule, x_T: Array, *, labels: Array | None = None,
                     guidance_scale: float = 1.0, prediction: str = "eps", clip_denoised: bool = True,
                     step_noise: Sequence[Array] | None = None, generator: np.random.Generator | None = None,
                     steps: int = 50, eta: float = 0.0, timesteps: Sequence[int] | None = None) -> Array:
    """DDIM sampling (Song et al. 2021, eq. 12) over `steps` timesteps; eta = 0 is deterministic. x_T [B, C, H, W].

    `timesteps` (descending) replaces the uniform grid of `steps`, as in ddpm.samplers.ddim_sample_loop.
    step_noise[i] is the noise of the i-th step taken; only used when eta > 0.
    """
    check_eta(eta)
    model = _guided_if(model, labels, guidance_scale)
    seq = list(timesteps) if timesteps is not None else ddim_timesteps(s.num_timesteps, steps)
    acp = s.alphas_cumprod
    x = x_T.astype(np.float32, copy=False)
    for i, t_index in enumerate(seq):
        t = np.full((x.shape[0],), t_index, dtype=np.int64)
        eps, x0 = split_prediction(s, x, t_index, _call(model, x, t, labels), prediction)
        if clip_denoised:
            x0 = np.clip(x0, np.float32(-1.0), np.float32(1.0))
            eps = (x - np.sqrt(acp[t_index]) * x0) / np.sqrt(1 - acp[t_index])
        a_t = acp[t_index]
        a_prev = acp[seq[i + 1]] if i + 1 < len(seq) else np.float32(1.0)
        sigma = np.float32(eta) * np.sqrt((1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev))
        x = np.sqrt(a_prev) * x0 + np.sqrt(np.maximum(1 - a_prev - sigma ** 2, np.float32(0.0))) * eps
        if eta > 0 and i + 1 < len(seq):
            x = x + sigma * _noise(step_noise, i, x, generator)
    return x


# ---- Batched generation and the `ddpm onnx-sample` command. ----

def to_uint8(x: Array) -> Array:
    """float [-1, 1] -> uint8 [0, 255] (clamped, rounded half to even), as ddpm.data.from_model_range."""
    return np.round((np.clip(x, -1.0, 1.0) + 1.0) * 127.5).astype(np.uint8)


def class_labels(n: int, label: int | None, num_classes: int) -> Array:
    """int64 [n]: `label` for every image, or classes 0..num_classes-1 in turn (as ddpm.generate)."""
    if label is None:
        return np.arange(n, dtype=np.int64) % num_classes
    return np.full(n, label, dtype=np.int64)


def sample_model_range(model: str | Path | OnnxDenoiser, n: int, sampler: str = "ddim", steps: int = 50,
                       eta: float = 0.0, seed: int = 0, batch_size: int = 256, label: int | None = None,
                       guidance_scale: float = 1.0, provider: str = "cpu", step_noise: Sequence[Array] | None = None,
                       x_T: Array | None = None, variance: str = "beta_tilde", clip_denoised: bool = True,
                       noise: str = "pcg64") -> Array:
    """Generate n images as float32 [n, C, H, W] in [-1, 1] (x_0 before quantisation).

    Without `x_T`, the starting noise and step noise come from `noise`: "pcg64", numpy's PCG64 seeded
    with `seed`, drawn in order batch by batch; "counter", ddpm.counter_noise (the web page's source),
    the same numbers whatever batch_size. `x_T` [n, C, H, W] and `step_noise` (indexable by step,
    each [n, C, H, W]) replace them, e.g. to compare with ddpm.samplers from the same random numbers.
    """
    den = model if isinstance(model, OnnxDenoiser) else OnnxDenoiser(model, provider)
    if sampler not in ("ddpm", "ddim"):
        raise ConfigError(f"sampler: {sampler!r} is not allowed; choose 'ddpm' or 'ddim'")
    if noise not in NOISE_SOURCES:
        raise ConfigError(f"noise: {noise!r} is not allowed; choose {' or '.join(map(repr, NOISE_SOURCES))}")
    if n <= 0 or batch_size <= 0:
        raise ConfigError(f"n ({n}) and batch_size ({batch_size}) must be > 0")
    check_eta(eta)
    check_guidance_scale(guidance_scale)
    if not 0 <= seed <= MAX_SEED:
        raise ConfigError(f"seed: {seed} is out of range; allowed: an integer in [0, {MAX_SEED}]")
    seq = None
    if sampler == "ddim":  # validates steps; a student's own grid
        seq = sampling_timesteps(den.schedule.num_timesteps, steps, den.distilled_steps)
    elif den.distilled_steps:
        raise ConfigError(f"sampler: {den.path} is a student distilled to {den.distilled_steps} DDIM steps; sample "
                          f"it with sampler 'ddim' and {den.distilled_steps} steps")
    if x_T is not None and (x_T.shape != (n, *den.image_shape)):
        raise ConfigError(f"x_T has shape {list(x_T.shape)}; expected {[n, *den.image_shape]}")
    if label is not None and not den.class_conditional:
        raise OnnxModelError(f"{den.path}: label {label} was asked for, but this model is not class-conditional")
    # As ddpm.generate: an unconditional model has no labels, so guidance_scale has nothing to act on.
    if label is not None and not 0 <= label < den.num_classes:
        raise ConfigError(f"label: {label} is out of range; allowed: 0..{den.num_classes - 1}")
    labels = class_labels(n, label, den.num_classes) if den.class_conditional else None
    rng = np.random.default_rng(seed)
    outs = []
    for start in range(0, n, batch_size):
        sl = slice(start, min(start + batch_size, n))
        xb, batch_noise = _batch_noise(noise, seed, rng, sl, den.image_shape, x_T, step_noise)
        common = dict(labels=None if labels is None else labels[sl], guidance_scale=guidance_scale,
                      prediction=den.prediction, clip_denoised=clip_denoised, step_noise=batch_noise, generator=rng)
        if sampler == "ddim":
            outs.append(ddim_sample_loop(den, den.schedule, xb, steps=steps, eta=eta, timesteps=seq, **common))
        else:
            outs.append(p_sample_loop(den, den.schedule, xb, variance=variance, **common))
        progress.advance("onnxruntime sampling (images)", sl.stop, n)
    return np.concatenate(outs)


def sample(model: str | Path | OnnxDenoiser, n: int, sampler: str = "ddim", steps: int = 50, eta: float = 0.0,
           seed: int = 0, batch_size: int = 256, label: int | None = None, guidance_scale: float = 1.0,
           provider: str = "cpu", step_noise: Sequence[Array] | None = None, x_T: Array | None = None,
           **options: Any) -> Array:
    """Generate n images: uint8 [n, C, H, W]. Arguments as `sample_model_range`."""
    return to_uint8(sample_model_range(model, n, sampler, steps, eta, seed, batch_size, label, guidance_scale,
                                       provider, step_noise, x_T, **options))


def _batch_noise(noise: str, seed: int, rng: np.random.Generator, sl: slice, image_shape: tuple[int, ...],
                 x_T: Array | None, step_noise: Sequence[Array] | None) -> tuple[Array, Any]:
    """One batch's starting noise [b, C, H, W] and step noise: given ones sliced, else drawn from `noise`."""
    shape = (sl.stop - sl.start, *image_shape)
    if x_T is not None:
        xb = x_T[sl]
    elif noise == "counter":
        xb = counter_noise.gaussian(seed, counter_noise.X_T_STREAM, shape, first_image=sl.start)
    else:
        xb = rng.standard_normal(shape, dtype=np.float32)
    if step_noise is not None:
        return xb, _BatchNoise(step_noise, sl)
    return xb, counter_noise.StepNoise(seed, image_shape, sl) if noise == "counter" else None


class _BatchNoise:
    """step_noise restricted to one batch's images: entry i is step_noise[i][sl]."""

    def __init__(self, step_noise: Sequence[Array], sl: slice):
        self.step_noise, self.sl = step_noise, sl

    def __getitem__(self, i: int) -> Array:
        return np.asarray(self.step_noise[i])[self.sl]


def main(args: Any) -> int:
    """`ddpm onnx-sample`: write samples.png (with Pillow) and samples.npz (images, labels) under args.out."""
    from ddpm.run_folder import check_writable  # torch-free

    check_writable(args.out)  # before the model is loaded or an image sampled
    provider = resolve_provider(args.provider)
    try:
        den = OnnxDenoiser(args.model, provider)
    except OnnxModelError:
        if args.provider != "auto" or provider == "cpu":
            raise
        print("provider auto: CUDA did not start, using the CPU", file=sys.stderr)
        den = OnnxDenoiser(args.model, "cpu")
    check_options_apply(args.sampler, args.steps, args.guidance, den.class_conditional, args.eta)
    defaults = {**FALLBACK_SAMPLER, **den.sampler_defaults}  # the export's own settings where it records them
    args.steps = args.steps if args.steps is not None else (den.distilled_steps or defaults["steps"])
    args.eta = args.eta if args.eta is not None else defaults["eta"]
    guidance = args.guidance if args.guidance is not None else defaults["guidance_scale"]
    guidance = guidance if den.class_conditional else 1.0
    images = sample(den, args.num_images, args.sampler, args.steps, args.eta, args.seed, args.batch_size,
                    args.label, guidance, noise=args.noise)
    out = SampleFiles(args.out)
    arrays = {"images": images}
    if den.class_conditional:
        arrays["labels"] = class_labels(args.num_images, args.label, den.num_classes)
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    atomic_write_bytes(out.array, buf.getvalue())
    png = grid_png(images)
    if png is not None:
        atomic_write_bytes(out.grid, png)
    steps = args.steps if args.sampler == "ddim" else den.schedule.num_timesteps
    label = "" if args.label is None else f", label {args.label}"
    label += f", eta {args.eta:g}" if args.sampler == "ddim" and args.eta > 0 else ""
    label += f", guidance {guidance:g}" if guidance != 1.0 else ""
    print(f"{len(images)} images ({args.sampler}, {steps} steps, seed {args.seed}{label}, {args.noise} noise) on "
          f"{den.provider} -> "
          f"{out.array}{' and ' + str(out.grid) if png is not None else ''}")
    return 0
