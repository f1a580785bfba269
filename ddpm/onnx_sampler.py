"""Sampling with onnxruntime and numpy alone: no PyTorch is imported, at load time or at run time.

An exported model (`ddpm export`) carries everything a sampler needs in its metadata (key
"ddpm", JSON): the diffusion config, the image shape, whether it is class-conditional, the null
label and the training step. From it this module rebuilds the schedule (with the same float64
arithmetic as `ddpm.schedule`, from `ddpm.schedule_math`) and runs DDPM and DDIM loops that
mirror `ddpm.samplers` operation for operation in float32, including the `step_noise`
convention: step_noise[i] is the noise of the i-th step taken. Timesteps t are indices in [0, T-1].

On CUDA the network's inputs and output live in preallocated GPU buffers bound through IO
binding; the sampler's per-step arithmetic (a few elementwise operations) runs in numpy on the
host, so x crosses the bus twice per step (B*C*H*W*4 bytes each way). bench/bench_onnx_sampling.py
measures what that costs against the network alone.
"""

from __future__ import annotations

import io
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import onnxruntime as ort

from ddpm.fileio import atomic_write_bytes
from ddpm.errors import ConfigError, OnnxModelError
from ddpm.schedule_math import SCHEDULE_ARRAYS, make_betas, schedule_arrays

METADATA_KEY = "ddpm"  # the metadata_props entry that `ddpm.export` writes
METADATA_VERSION = 1
Array = np.ndarray


@dataclass(frozen=True)
class NumpySchedule:
    """The schedule of `ddpm.schedule.Schedule` as read-only float32 numpy arrays [T] (computed in float64)."""

    betas: Array
    alphas: Array
    alphas_cumprod: Array
    alphas_cumprod_prev: Array
    sqrt_alphas_cumprod: Array
    sqrt_one_minus_alphas_cumprod: Array
    sqrt_recip_alphas: Array
    sqrt_recip_alphas_cumprod: Array
    sqrt_recipm1_alphas_cumprod: Array
    posterior_variance: Array
    posterior_log_variance_clipped: Array
    posterior_mean_coef1: Array
    posterior_mean_coef2: Array

    @classmethod
    def from_diffusion(cls, diffusion: dict[str, Any]) -> "NumpySchedule":
        """From a DiffusionConfig as a dict (the model metadata's "diffusion" entry)."""
        betas = make_betas(diffusion["schedule"], int(diffusion["timesteps"]), float(diffusion["beta_start"]),
                           float(diffusion["beta_end"]), float(diffusion["cosine_s"]))
        arrays = {k: v.astype(np.float32) for k, v in schedule_arrays(betas).items()}
        for a in arrays.values():
            a.flags.writeable = False
        return cls(**{k: arrays[k] for k in SCHEDULE_ARRAYS})

    @property
    def num_timesteps(self) -> int:
        return len(self.betas)


def read_metadata(session: ort.InferenceSession, path: str | Path) -> dict[str, Any]:
    """The exported model's "ddpm" metadata, checked for the keys a sampler needs."""
    raw = session.get_modelmeta().custom_metadata_map.get(METADATA_KEY)
    if raw is None:
        raise OnnxModelError(f"{path}: no {METADATA_KEY!r} metadata, so its schedule and image shape are unknown; "
                             f"export the model with `ddpm export`")
    try:
        meta = json.loads(raw)
    except ValueError as exc:
        raise OnnxModelError(f"{path}: its {METADATA_KEY!r} metadata is not JSON ({exc}); re-export the model "
                             f"with `ddpm export`") from None
    diffusion = meta.get("diffusion") if isinstance(meta, dict) else None
    missing = [k for k in _META_KEYS if not isinstance(meta, dict) or k not in meta]
    missing += [f"diffusion.{k}" for k in _DIFFUSION_KEYS if not isinstance(diffusion, dict) or k not in diffusion]
    if missing:
        raise OnnxModelError(f"{path}: its {METADATA_KEY!r} metadata lacks {', '.join(missing)}; re-export the "
                             f"model with `ddpm export`")
    return meta


_META_KEYS = ("diffusion", "image_shape", "class_conditional", "num_classes", "step")
_DIFFUSION_KEYS = ("timesteps", "schedule", "beta_start", "beta_end", "cosine_s", "prediction")


class OnnxDenoiser:
    """The exported network as a callable: (x float32 [B, C, H, W], t int [B], labels int [B] | None)
    -> float32 [B, C, H, W], the prediction of kind `prediction` ("eps", "v" or "x0").

    provider "cpu" or "cuda". With "cuda", a session that did not put CUDAExecutionProvider first
    is an error, never a silent CPU fallback. `cuda_options` go to the CUDA provider as they are
    (e.g. {"use_tf32": 0}: onnxruntime's CUDA provider uses TF32 by default). `num_classes` is the
    null label (for guidance).
    """

    def __init__(self, path: str | Path, provider: str = "cpu", device_id: int = 0,
                 session_options: ort.SessionOptions | None = None, cuda_options: dict[str, Any] | None = None):
        self.path = Path(path)
        if provider not in ("cpu", "cuda"):
            raise ConfigError(f"provider: {provider!r} is not allowed; choose 'cpu' or 'cuda'")
        if not self.path.is_file():
            raise OnnxModelError(f"ONNX model {self.path} does not exist; export one with `ddpm export`")
        self.session = _open_session(self.path, provider, {"device_id": device_id, **(cuda_options or {})},
                                     session_options)
        self.provider = self.session.get_providers()[0]
        if provider == "cuda" and self.provider != "CUDAExecutionProvider":
            raise OnnxModelError(f"{self.path}: CUDA was asked for, but onnxruntime runs on {self.provider} "
                                 f"(active: {self.session.get_providers()}); check that onnxruntime-gpu and the "
                                 f"CUDA 13 / cuDNN 9 libraries are installed, or use provider 'cpu'")
        self.metadata = meta = read_metadata(self.session, self.path)
        try:
            self.schedule = NumpySchedule.from_diffusion(meta["diffusion"])
            self.image_shape = tuple(int(d) for d in meta["image_shape"])
            self.class_conditional = bool(meta["class_conditional"])
            self.num_classes = int(meta["num_classes"])  # also the null label
        except (ValueError, TypeError) as exc:
            raise OnnxModelError(f"{self.path}: its {METADATA_KEY!r} metadata is invalid ({exc}); re-export the "
                                 f"model with `ddpm export`") from None
        self.prediction = str(meta["diffusion"]["prediction"])
        if self.prediction not in ("eps", "v", "x0"):
            raise OnnxModelError(f"{self.path}: unknown prediction {self.prediction!r} in its metadata")
        self.output_name = self._check_signature()
        self.device_id = device_id
        self._bound: dict[int, tuple[ort.IOBinding, dict[str, ort.OrtValue]]] = {}  # CUDA buffers, by batch size

    def _check_signature(self) -> str:
        """Check the graph's inputs and output against the metadata; returns the output's name."""
        expected = {"x": ("tensor(float)", (None, *self.image_shape)), "t": ("tensor(int64)", (None,))}
        if self.class_conditional:
            expected["labels"] = ("tensor(int64)", (None,))
        inputs = {i.name: i for i in self.session.get_inputs()}
        if set(inputs) != set(expected):
            raise OnnxModelError(f"{self.path}: the model's inputs are {sorted(inputs)}, but a "
                                 f"{'class-conditional' if self.class_conditional else 'unconditional'} ddpm model "
                                 f"takes {sorted(expected)}; re-export it with `ddpm export`")
        for name, (dtype, shape) in expected.items():
            arg = inputs[name]
            got = tuple(d if isinstance(d, int) else None for d in arg.shape)
            if arg.type != dtype or len(got) != len(shape):
                raise OnnxModelError(f"{self.path}: input {name!r} is {arg.type} of rank {len(got)}; expected "
                                     f"{dtype} of rank {len(shape)}")
            if got[0] is not None:
                raise OnnxModelError(f"{self.path}: input {name!r} has a fixed batch size {got[0]}; the exported "
                                     f"model must take any batch size (re-export it with `ddpm export`)")
            if any(s is not None and g is not None and s != g for s, g in zip(shape[1:], got[1:])):
                raise OnnxModelError(f"{self.path}: input {name!r} has shape {list(arg.shape)}, but the metadata's "
                                     f"image shape is {list(self.image_shape)}")
        outputs = self.session.get_outputs()
        if len(outputs) != 1 or outputs[0].type != "tensor(float)" or len(outputs[0].shape) != 4:
            raise OnnxModelError(f"{self.path}: expected one float32 output of rank 4, got "
                                 f"{[(o.name, o.type, o.shape) for o in outputs]}")
        return outputs[0].name

    def feeds(self, x: Array, t: Array, labels: Array | None) -> dict[str, Array]:
        """Check one call's inputs and return them as the graph's feeds (int64 t and labels)."""
        if not isinstance(x, np.ndarray) or x.dtype != np.float32:
            raise OnnxModelError(f"x must be a float32 numpy array, got {getattr(x, 'dtype', type(x).__name__)}")
        if x.ndim != 4 or tuple(x.shape[1:]) != self.image_shape:
            raise OnnxModelError(f"x has shape {list(x.shape)}; expected [B, {', '.join(map(str, self.image_shape))}]")
        b, T = x.shape[0], self.schedule.num_timesteps
        t = _int64(t, "t", b)
        if t.size and (t.min() < 0 or t.max() > T - 1):
            raise OnnxModelError(f"t holds {int(t.min())}..{int(t.max())}, outside [0, {T - 1}] (this model's "
                                 f"timesteps are indices 0..T-1 with T = {T})")
        feeds = {"x": x, "t": t}
        if labels is not None and not self.class_conditional:
            raise OnnxModelError(f"{self.path}: labels were given, but this model is not class-conditional")
        if self.class_conditional:
            labels = np.full(b, self.num_classes, np.int64) if labels is None else _int64(labels, "labels", b)
            if labels.size and (labels.min() < 0 or labels.max() > self.num_classes):
                raise OnnxModelError(f"labels hold {int(labels.min())}..{int(labels.max())}, outside "
                                     f"[0, {self.num_classes}] ({self.num_classes} is the null class)")
            feeds["labels"] = labels
        return feeds

    def __call__(self, x: Array, t: Array, labels: Array | None = None) -> Array:
        feeds = self.feeds(x, t, labels)
        if self.provider != "CUDAExecutionProvider":
            return self.session.run([self.output_name], feeds)[0]
        binding, bufs = self.bind(x.shape[0])
        for name, value in feeds.items():
            bufs[name].update_inplace(np.ascontiguousarray(value))  # host -> device copy into a fixed buffer
        self.session.run_with_iobinding(binding)
        return bufs[self.output_name].numpy()  # device -> host

    def bind(self, batch: int) -> tuple[ort.IOBinding, dict[str, ort.OrtValue]]:
        """An IO binding whose inputs and output are GPU buffers for `batch` images, made once per batch size."""
        if batch not in self._bound:
            shapes = {"x": ((batch, *self.image_shape), np.float32), "t": ((batch,), np.int64),
                      self.output_name: ((batch, *self.image_shape), np.float32)}
            if self.class_conditional:
                shapes["labels"] = ((batch,), np.int64)
            bufs = {name: ort.OrtValue.ortvalue_from_shape_and_type(shape, dtype, "cuda", self.device_id)
                    for name, (shape, dtype) in shapes.items()}
            binding = self.session.io_binding()
            for name, value in bufs.items():
                if name == self.output_name:
                    binding.bind_ortvalue_output(name, value)
                else:
                    binding.bind_ortvalue_input(name, value)
            self._bound[batch] = binding, bufs
        return self._bound[batch]


def no_spin_options() -> ort.SessionOptions:
    """CPU session options whose idle threads sleep: for sessions that alternate with PyTorch on the same cores."""
    options = ort.SessionOptions()
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return options


def _open_session(path: Path, provider: str, cuda_options: dict[str, Any],
                  options: ort.SessionOptions | None) -> ort.InferenceSession:
    providers: list[Any] = ["CPUExecutionProvider"]
    if provider == "cuda":
        if "CUDAExecutionProvider" not in ort.get_available_providers():
            raise OnnxModelError(f"CUDA was asked for, but this onnxruntime ({ort.__version__}) has no "
                                 f"CUDAExecutionProvider (available: {ort.get_available_providers()}); install "
                                 f"onnxruntime-gpu, or use provider 'cpu'")
        if "torch" not in sys.modules and hasattr(ort, "preload_dlls"):
            ort.preload_dlls()  # the CUDA and cuDNN libraries of the nvidia-* wheels, which torch would load
        providers = [("CUDAExecutionProvider", cuda_options), "CPUExecutionProvider"]
    try:
        return ort.InferenceSession(str(path), sess_options=options, providers=providers)
    except Exception as exc:  # onnxruntime raises its own classes (InvalidProtobuf, Fail, InvalidGraph, ...)
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise OnnxModelError(f"ONNX model {path} could not be loaded; it is truncated, corrupt or not an ONNX "
                             f"model ({type(exc).__name__}: {first[:300]}); export it again with `ddpm export`"
                             ) from None


def _int64(a: Any, name: str, batch: int) -> Array:
    a = np.asarray(a)
    if not np.issubdtype(a.dtype, np.integer):
        raise OnnxModelError(f"{name} must hold integers (int64), got {a.dtype}")
    if a.shape != (batch,):
        raise OnnxModelError(f"{name} has shape {list(a.shape)}; expected [{batch}] (one per image)")
    return a.astype(np.int64, copy=False)


# ---- The samplers: numpy mirrors of ddpm.samplers, with the same signature and float32 arithmetic. ----

Denoiser = Callable[..., Array]


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


def ddim_timesteps(num_timesteps: int, steps: int) -> list[int]:
    """The `steps` timesteps DDIM visits, descending: uniform stride T // steps from 0 (Song et al. 2021, C.2)."""
    if not 0 < steps <= num_timesteps:
        raise ConfigError(f"steps: {steps} must be in [1, {num_timesteps}] (the schedule's T)")
    stride = num_timesteps // steps
    return list(range(0, stride * steps, stride))[::-1]


def ddim_sample_loop(model: Denoiser, s: NumpySchedule, x_T: Array, *, labels: Array | None = None,
                     guidance_scale: float = 1.0, prediction: str = "eps", clip_denoised: bool = True,
                     step_noise: Sequence[Array] | None = None, generator: np.random.Generator | None = None,
                     steps: int = 50, eta: float = 0.0) -> Array:
    """DDIM sampling (Song et al. 2021, eq. 12) over `steps` timesteps; eta = 0 is deterministic. x_T [B, C, H, W].

    step_noise[i] is the noise of the i-th step taken; only used when eta > 0.
    """
    model = _guided_if(model, labels, guidance_scale)
    seq = ddim_timesteps(s.num_timesteps, steps)
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
                       x_T: Array | None = None, variance: str = "beta_tilde", clip_denoised: bool = True) -> Array:
    """Generate n images as float32 [n, C, H, W] in [-1, 1] (x_0 before quantisation).

    Without `x_T`, batch k's starting noise and step noise come from numpy's PCG64 seeded with `seed`,
    drawn in order. `x_T` [n, C, H, W] and `step_noise` (indexable by step, each [n, C, H, W])
    replace them, e.g. to compare with ddpm.samplers from the same random numbers.
    """
    den = model if isinstance(model, OnnxDenoiser) else OnnxDenoiser(model, provider)
    if sampler not in ("ddpm", "ddim"):
        raise ConfigError(f"sampler: {sampler!r} is not allowed; choose 'ddpm' or 'ddim'")
    if n <= 0 or batch_size <= 0:
        raise ConfigError(f"n ({n}) and batch_size ({batch_size}) must be > 0")
    if eta < 0:
        raise ConfigError(f"eta: {eta} must be >= 0")
    if sampler == "ddim":
        ddim_timesteps(den.schedule.num_timesteps, steps)  # validates steps
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
        b = sl.stop - sl.start
        xb = (x_T[sl] if x_T is not None else rng.standard_normal((b, *den.image_shape), dtype=np.float32))
        noise = _BatchNoise(step_noise, sl) if step_noise is not None else None
        common = dict(labels=None if labels is None else labels[sl], guidance_scale=guidance_scale,
                      prediction=den.prediction, clip_denoised=clip_denoised, step_noise=noise, generator=rng)
        if sampler == "ddim":
            outs.append(ddim_sample_loop(den, den.schedule, xb, steps=steps, eta=eta, **common))
        else:
            outs.append(p_sample_loop(den, den.schedule, xb, variance=variance, **common))
    return np.concatenate(outs)


def sample(model: str | Path | OnnxDenoiser, n: int, sampler: str = "ddim", steps: int = 50, eta: float = 0.0,
           seed: int = 0, batch_size: int = 256, label: int | None = None, guidance_scale: float = 1.0,
           provider: str = "cpu", step_noise: Sequence[Array] | None = None, x_T: Array | None = None,
           **options: Any) -> Array:
    """Generate n images: uint8 [n, C, H, W]. Arguments as `sample_model_range`."""
    return to_uint8(sample_model_range(model, n, sampler, steps, eta, seed, batch_size, label, guidance_scale,
                                       provider, step_noise, x_T, **options))


class _BatchNoise:
    """step_noise restricted to one batch's images: entry i is step_noise[i][sl]."""

    def __init__(self, step_noise: Sequence[Array], sl: slice):
        self.step_noise, self.sl = step_noise, sl

    def __getitem__(self, i: int) -> Array:
        return np.asarray(self.step_noise[i])[self.sl]


def grid_png(images: Array, nrow: int | None = None, padding: int = 2) -> bytes | None:
    """uint8 [N, C, H, W] -> PNG bytes of a grid laid out as torchvision's make_grid; None without Pillow."""
    try:
        from PIL import Image
    except ImportError:
        return None
    n, c, h, w = images.shape
    ncol = min(nrow or max(int(n ** 0.5), 1), n)
    nrows = -(-n // ncol)
    grid = np.full((c, nrows * (h + padding) + padding, ncol * (w + padding) + padding), 255, np.uint8)
    for k, img in enumerate(images):
        r, col = divmod(k, ncol)
        y, x = r * (h + padding) + padding, col * (w + padding) + padding
        grid[:, y:y + h, x:x + w] = img
    pil = Image.fromarray(grid[0] if c == 1 else grid.transpose(1, 2, 0))
    buf = io.BytesIO()
    pil.save(buf, format="PNG")
    return buf.getvalue()


def main(args: Any) -> int:
    """`ddpm onnx-sample`: write samples.png (with Pillow) and samples.npz (images, labels) under args.out."""
    provider = args.provider
    if provider == "auto":
        provider = "cuda" if "CUDAExecutionProvider" in ort.get_available_providers() else "cpu"
    try:
        den = OnnxDenoiser(args.model, provider)
    except OnnxModelError:
        if args.provider != "auto" or provider == "cpu":
            raise
        print("provider auto: CUDA did not start, using the CPU", file=sys.stderr)
        den = OnnxDenoiser(args.model, "cpu")
    images = sample(den, args.num_images, args.sampler, args.steps, args.eta, args.seed, args.batch_size,
                    args.label, args.guidance)
    out = Path(args.out)
    arrays = {"images": images}
    if den.class_conditional:
        arrays["labels"] = class_labels(args.num_images, args.label, den.num_classes)
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    atomic_write_bytes(out / "samples.npz", buf.getvalue())
    png = grid_png(images)
    if png is not None:
        atomic_write_bytes(out / "samples.png", png)
    steps = args.steps if args.sampler == "ddim" else den.schedule.num_timesteps
    print(f"{len(images)} images ({args.sampler}, {steps} steps, seed {args.seed}) on {den.provider} -> "
          f"{out / 'samples.npz'}{' and ' + str(out / 'samples.png') if png is not None else ''}")
    return 0
