"""The export gate: DDIM samples from onnxruntime against samples from PyTorch, from the same noise.

`check_export` loads the checkpoint's EMA U-Net and the exported model, checks that they are the same
model (diffusion, image shape, labels, step), samples n images with ddpm.samplers (float32, TF32
off) and with ddpm.onnx_sampler, and accepts the export when the images agree within the given
tolerances and, with a score function such as FID, when the scores agree.

`gate_export` is that check with the configured bounds (export.check_*, the FID margins, the int8
twin's own bounds), the sampler block's DDIM settings and the runtime block's device: the one gate
of `ddpm export` and of the pipeline's export stage.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch

from ddpm.checkpoint import load_model
from ddpm.config import Config, image_shape
from ddpm.errors import ExportRejected
from ddpm.onnx_model import OnnxDenoiser, no_spin_options
from ddpm.onnx_sampler import class_labels, ddim_sample_loop, to_uint8
from ddpm.samplers import ddim_sample_loop as torch_ddim_sample_loop
from ddpm.schedule import Schedule
from ddpm.schedule_math import sampling_timesteps


@contextlib.contextmanager
def _strict_fp32(device: torch.device) -> Iterator[None]:
    """Turn TF32 off on CUDA (cuDNN convolutions use it by default) so that PyTorch computes in float32."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    if device.type == "cuda":
        torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def check_export(onnx_path: str | Path, checkpoint: str | Path, n: int = 256, steps: int = 20, seed: int = 0,
                 score_fn: Callable[[np.ndarray], float] | None = None, fid_margin: float = 0.05, *,
                 fid_abs_floor: float = 0.5, atol: float | None = 0.02, mean_atol: float | None = None,
                 eta: float = 0.0, batch_size: int = 256, guidance_scale: float = 1.0, clip_denoised: bool = True,
                 device: str = "cpu", provider: str = "cpu") -> dict[str, Any]:
    """Sample n images by DDIM (`steps`, `eta`) from the same x_T with PyTorch float32 and with onnxruntime.

    Accepts when max |x_onnx - x_torch| in [-1, 1] space <= atol (None: not checked), the mean
    <= mean_atol (None: not checked) and, with `score_fn` (uint8 [n, C, H, W] -> float, e.g. FID),
    when |score_onnx - score_torch| <= fid_margin * score_torch + fid_abs_floor. Returns the
    measured numbers; raises ExportRejected with them otherwise.
    """
    dev = torch.device("cuda" if device == "auto" and torch.cuda.is_available() else
                       "cpu" if device == "auto" else device)
    model, cfg, ckpt = load_model(checkpoint, dev, use_ema=True)
    den = OnnxDenoiser(onnx_path, provider, session_options=no_spin_options() if provider == "cpu" else None,
                       cuda_options={"use_tf32": 0})  # strict float32 on both sides
    _check_same_model(den, cfg, ckpt, Path(checkpoint))
    schedule = Schedule.from_config(cfg.diffusion).to(dev)
    rng = np.random.default_rng(seed)
    x_T = rng.standard_normal((n, *den.image_shape), dtype=np.float32)
    noise = rng.standard_normal((max(steps - 1, 1), n, *den.image_shape), dtype=np.float32) if eta > 0 else None
    labels = class_labels(n, None, den.num_classes) if den.class_conditional else None
    common = dict(guidance_scale=guidance_scale, prediction=den.prediction, clip_denoised=clip_denoised, steps=steps,
                  eta=eta, timesteps=sampling_timesteps(cfg.diffusion.timesteps, steps, cfg.diffusion.distilled_steps))
    batches = [slice(s, min(s + batch_size, n)) for s in range(0, n, batch_size)]
    x_onnx = [ddim_sample_loop(den, den.schedule, x_T[sl], labels=None if labels is None else labels[sl],
                               step_noise=None if noise is None else noise[:, sl], **common) for sl in batches]
    x_torch = []
    with _strict_fp32(dev):
        for sl in batches:
            out = torch_ddim_sample_loop(model, schedule, torch.from_numpy(x_T[sl]).to(dev),
                                         labels=None if labels is None else torch.from_numpy(labels[sl]).to(dev),
                                         step_noise=None if noise is None else torch.from_numpy(noise[:, sl]),
                                         **common)
            x_torch.append(out.float().cpu().numpy())
    a, b = np.clip(np.concatenate(x_onnx), -1, 1), np.clip(np.concatenate(x_torch), -1, 1)
    u8_onnx, u8_torch = to_uint8(a), to_uint8(b)
    du8 = np.abs(u8_onnx.astype(np.int16) - u8_torch.astype(np.int16))
    result: dict[str, Any] = {
        "n": n, "steps": steps, "eta": eta, "seed": seed, "device": str(dev), "provider": den.provider,
        "max_abs_diff": float(np.abs(a - b).max()), "mean_abs_diff": float(np.abs(a - b).mean()),
        "max_abs_diff_uint8": int(du8.max()), "mean_abs_diff_uint8": float(du8.mean()),
        "frac_pixels_differ_uint8": float((du8 > 0).mean()), "atol": atol, "mean_atol": mean_atol,
    }
    problems = []
    if atol is not None and not result["max_abs_diff"] <= atol:
        problems.append(f"max |x_onnx - x_torch| = {result['max_abs_diff']:.3g} > {atol:.3g}")
    if mean_atol is not None and not result["mean_abs_diff"] <= mean_atol:
        problems.append(f"mean |x_onnx - x_torch| = {result['mean_abs_diff']:.3g} > {mean_atol:.3g}")
    if score_fn is not None:
        s_onnx, s_torch = float(score_fn(u8_onnx)), float(score_fn(u8_torch))
        allowed = fid_margin * abs(s_torch) + fid_abs_floor
        result.update(score_onnx=s_onnx, score_torch=s_torch, score_diff=abs(s_onnx - s_torch),
                      score_allowed=allowed)
        if not abs(s_onnx - s_torch) <= allowed:
            problems.append(f"score {s_onnx:.4g} (onnx) vs {s_torch:.4g} (torch) differ by more than {allowed:.3g}")
    result["accepted"] = not problems
    if problems:
        raise ExportRejected(f"{onnx_path}: {'; '.join(problems)} ({json.dumps(result)})")
    return result


def gate_export(onnx_path: str | Path, checkpoint: str | Path, cfg: Config,
                score_fn: Callable[[np.ndarray], float] | None = None, int8: bool = False) -> dict[str, Any]:
    """check_export as `cfg` configures it: export.check_samples images by DDIM with sampler.steps, eta,
    clip_denoised and guidance_scale from noise seeded by sample.seed, PyTorch on runtime.device.

    The float32 model (onnxruntime on CUDA when runtime.device resolves to it) must match within
    export.check_atol and its score within export.fid_margin; the int8 twin (`int8`, a different
    network, always on the CPU provider) within export.int8_mean_atol on average and export.int8_fid_margin.
    """
    ec, sp = cfg.export, cfg.sampler
    bounds: dict[str, Any] = (dict(atol=None, mean_atol=ec.int8_mean_atol, fid_margin=ec.int8_fid_margin) if int8
                              else dict(atol=ec.check_atol, fid_margin=ec.fid_margin))
    return check_export(onnx_path, checkpoint, n=ec.check_samples, steps=sp.steps, seed=cfg.sample.seed,
                        score_fn=score_fn, fid_abs_floor=ec.fid_abs_floor, eta=sp.eta,
                        guidance_scale=sp.guidance_scale, clip_denoised=sp.clip_denoised, device=cfg.runtime.device,
                        provider="cpu" if int8 else ort_provider(cfg.runtime.device), **bounds)


def ort_provider(device: str) -> str:
    """The onnxruntime provider for runtime.device: CUDA when asked for (or auto and present), else the CPU."""
    import onnxruntime as ort

    from ddpm.train import resolve_device

    # onnxruntime-gpu lists the CUDA provider even on a machine without a GPU: ask torch instead.
    wants_cuda = resolve_device(device).type == "cuda"
    return "cuda" if wants_cuda and "CUDAExecutionProvider" in ort.get_available_providers() else "cpu"


def _check_same_model(den: OnnxDenoiser, cfg: Config, ckpt: dict[str, Any], checkpoint: Path) -> None:
    meta = den.metadata
    mine = {"diffusion": dict(cfg.to_dict()["diffusion"]), "image_shape": list(image_shape(cfg)),
            "class_conditional": cfg.model.class_conditional, "step": int(ckpt["step"])}
    theirs = {k: meta.get(k) for k in mine}
    if mine != theirs:
        diff = [k for k in mine if mine[k] != theirs[k]]
        raise ExportRejected(f"{den.path} was not exported from {checkpoint}: they differ in {', '.join(diff)} "
                             f"({ {k: theirs[k] for k in diff} } vs { {k: mine[k] for k in diff} })")
