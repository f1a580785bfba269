"""An exported U-Net as a numpy callable on onnxruntime: its metadata, schedule and checked inputs.

`ddpm export` writes the model's diffusion config, image shape, class-conditioning, null label,
training step and the DDIM settings its check used into the ONNX metadata (key "ddpm", JSON).
OnnxDenoiser opens the file, checks its metadata and its inputs against them, rebuilds the schedule
(NumpySchedule, the float64 arithmetic of `ddpm.schedule` via `ddpm.schedule_math`, stored in float32)
and is then called like the PyTorch network: eps = model(x, t[, labels]). No PyTorch is imported. The
samplers are in ddpm.onnx_sampler.

On CUDA the network's inputs and output live in preallocated GPU buffers bound through IO binding.
"""

from __future__ import annotations

import ctypes
import functools
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from ddpm.errors import ConfigError, OnnxModelError
from ddpm.schedule_math import SCHEDULE_ARRAYS, check_eta, check_guidance_scale, make_betas, schedule_arrays

METADATA_KEY = "ddpm"  # the metadata_props entry that `ddpm.export` writes
METADATA_VERSION = 1
MAX_REASON_CHARS = 4000  # onnxruntime's messages, kept whole on one line up to this length
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


def _check_sizes(meta: dict[str, Any], path: Path) -> None:
    """The metadata's diffusion settings and image shape within what `ddpm train` accepts, before any array is
    made from them (a T of 1e11 would ask for 800 GB per schedule array)."""
    from ddpm.config import IMAGE_SHAPES, section_from_dict  # torch-free

    try:
        section_from_dict("diffusion", meta["diffusion"])
    except ConfigError as exc:
        raise OnnxModelError(f"{path}: its {METADATA_KEY!r} metadata is invalid ({exc}); re-export the model with "
                             f"`ddpm export`") from None
    shape = meta["image_shape"]
    if not isinstance(shape, list) or tuple(shape) not in set(IMAGE_SHAPES.values()):
        raise OnnxModelError(f"{path}: its {METADATA_KEY!r} metadata gives image shape {shape!r}, none of the "
                             f"datasets' {sorted(set(IMAGE_SHAPES.values()))}; re-export the model with `ddpm export`")


def _sampler_defaults(meta: dict[str, Any], path: Path, num_timesteps: int) -> dict[str, Any]:
    """The metadata's "sampler" entry (steps, eta, guidance_scale), checked; {} where the export has none."""
    if "sampler" not in meta:
        return {}
    found = meta["sampler"]
    try:
        steps, eta, scale = found["steps"], found["eta"], found["guidance_scale"]
        if type(steps) is not int or not 1 <= steps <= num_timesteps:
            raise ValueError(f"steps {steps!r} is not an integer in [1, {num_timesteps}]")
        if not all(type(v) in (int, float) for v in (eta, scale)):
            raise ValueError("eta and guidance_scale must be numbers")
        check_eta(eta)
        check_guidance_scale(scale)
    except (KeyError, TypeError, ValueError, ConfigError) as exc:
        raise OnnxModelError(f"{path}: its {METADATA_KEY!r} metadata has an invalid sampler entry {found!r} ({exc}); "
                             f"re-export the model with `ddpm export`") from None
    return {"steps": steps, "eta": float(eta), "guidance_scale": float(scale)}


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
        _check_sizes(meta, self.path)
        try:
            self.schedule = NumpySchedule.from_diffusion(meta["diffusion"])
            self.image_shape = tuple(int(d) for d in meta["image_shape"])
            self.class_conditional = bool(meta["class_conditional"])
            self.num_classes = int(meta["num_classes"])  # also the null label
        except (ValueError, TypeError) as exc:
            raise OnnxModelError(f"{self.path}: its {METADATA_KEY!r} metadata is invalid ({exc}); re-export the "
                                 f"model with `ddpm export`") from None
        # a student of ddpm.distill samples with this many DDIM steps and no other count (0: any)
        self.distilled_steps = int(meta["diffusion"].get("distilled_steps", 0))  # checked by _check_sizes
        # the DDIM settings the export was checked with ({} from an export that predates them): defaults
        self.sampler_defaults = _sampler_defaults(meta, self.path, self.schedule.num_timesteps)
        self.prediction = str(meta["diffusion"]["prediction"])
        if self.prediction not in ("eps", "v", "x0"):
            raise OnnxModelError(f"{self.path}: unknown prediction {self.prediction!r} in its metadata")
        self.output_name = self._check_signature()
        if self.provider == "CPUExecutionProvider":
            from ddpm.quantize import warn_if_saturating  # ddpm.quantize imports this module

            warn_if_saturating(self.path, meta)
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


def cuda_problem() -> str | None:
    """Why onnxruntime's CUDA provider cannot run here, or None when it can.

    onnxruntime-gpu lists CUDAExecutionProvider on every machine, GPU or not, and a session that asks
    for it without a driver logs errors before it falls back to the CPU. So the driver is asked first,
    quietly: a CUDA provider is requested only when this returns None.
    """
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        return (f"this onnxruntime ({ort.__version__}) has no CUDAExecutionProvider (available: "
                f"{ort.get_available_providers()}); install onnxruntime-gpu")
    return _driver_problem()


@functools.cache
def _driver_problem() -> str | None:
    """The CUDA driver's answer: None when it loads and counts at least one GPU."""
    name = "nvcuda.dll" if sys.platform == "win32" else "libcuda.so.1"
    try:
        driver = ctypes.CDLL(name)
    except OSError:
        return f"there is no NVIDIA driver ({name} cannot be loaded)"
    count = ctypes.c_int(0)
    if driver.cuInit(0) != 0 or driver.cuDeviceGetCount(ctypes.byref(count)) != 0 or count.value < 1:
        return "the NVIDIA driver finds no usable GPU"
    return None


def resolve_provider(provider: str) -> str:
    """"auto" -> "cuda" where the CUDA provider can run (cuda_problem), else "cpu"; other names unchanged."""
    if provider == "auto":
        return "cuda" if cuda_problem() is None else "cpu"
    return provider


def _open_session(path: Path, provider: str, cuda_options: dict[str, Any],
                  options: ort.SessionOptions | None) -> ort.InferenceSession:
    providers: list[Any] = ["CPUExecutionProvider"]
    if provider == "cuda":
        problem = cuda_problem()
        if problem is not None:
            raise OnnxModelError(f"CUDA was asked for, but {problem}; use provider 'cpu'")
        if "torch" not in sys.modules and hasattr(ort, "preload_dlls"):
            ort.preload_dlls()  # the CUDA and cuDNN libraries of the nvidia-* wheels, which torch would load
        providers = [("CUDAExecutionProvider", cuda_options), "CPUExecutionProvider"]
    try:
        return ort.InferenceSession(str(path), sess_options=options, providers=providers)
    except Exception as exc:  # onnxruntime raises its own classes (InvalidProtobuf, Fail, InvalidGraph, ...)
        reason = " ".join(str(exc).split()) or type(exc).__name__  # the whole message, on one line
        if len(reason) > MAX_REASON_CHARS:
            reason = reason[:MAX_REASON_CHARS] + " [...]"
        raise OnnxModelError(f"ONNX model {path} could not be loaded; it is truncated, corrupt or not an ONNX "
                             f"model ({type(exc).__name__}: {reason}); export it again with `ddpm export`"
                             ) from None


def _int64(a: Any, name: str, batch: int) -> Array:
    a = np.asarray(a)
    if not np.issubdtype(a.dtype, np.integer):
        raise OnnxModelError(f"{name} must hold integers (int64), got {a.dtype}")
    if a.shape != (batch,):
        raise OnnxModelError(f"{name} has shape {list(a.shape)}; expected [{batch}] (one per image)")
    return a.astype(np.int64, copy=False)
