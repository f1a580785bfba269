"""Batched image generation with a trained model, and saving grids and arrays."""

from __future__ import annotations

import copy
import dataclasses
import io
import logging
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F

from ddpm import fileio, progress
from ddpm.checkpoint import atomic_write_bytes
from ddpm.config import Config, ConfigError, DiffusionConfig, SampleConfig, SamplerConfig, image_shape
from ddpm.data import from_model_range
from ddpm.graphed import GraphedDenoiser
from ddpm.layers import use_per_channel_group_norm
from ddpm.samplers import get_sampler
from ddpm.schedule import Schedule
from ddpm.schedule_math import sampling_timesteps
from ddpm.unet import UNet, pad_image_channels

log = logging.getLogger(__name__)


def cast_weights_for_autocast(model: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    """Cast `model`'s convolution and linear layers to `dtype`: what autocast casts them to at every call, once.

    Only for a model that will run under that autocast (outside it the dtypes would not match);
    embeddings and normalisation layers, which autocast leaves alone, keep their dtype.
    """
    for m in model.modules():
        if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)):
            m.to(dtype)
    return model


def sampling_network(model: torch.nn.Module, device: torch.device, cuda_graphs: bool = True,
                     compile: bool = False, autocast_dtype: torch.dtype | None = None) -> Callable[..., torch.Tensor]:
    """What the sampler calls on `device`: the model, or on CUDA its replayed CUDA graphs (`cuda_graphs`).

    `compile` (CUDA only): a copy of the model compiled by torch.compile with coordinate-descent
    tuning of the generated kernels, for one batch shape. The copy is channels-last, its GroupNorms
    use per-channel statistics (ddpm.layers.GroupNorm) and its image-channel convolutions are padded
    to 8 channels (ddpm.layers.ChannelPaddedConv2d). `autocast_dtype`: the dtype of the autocast the
    network will run under (call it under that autocast); the copy's convolution and linear weights
    are cast to it once (cast_weights_for_autocast), which saves the casts' kernels. Compiled, the
    step is several times faster than with CUDA graphs alone
    (docs/experiments/2026-11-26-sampling-throughput-h200.md), but the first compile on a machine is
    slow; later ones in the process reuse it. So it pays off for many images, not for a preview grid.
    """
    if device.type != "cuda":
        return model
    if compile:
        model = torch.compile(sampling_copy(model, autocast_dtype), dynamic=False,
                              options={"coordinate_descent_tuning": True})
    return GraphedDenoiser(model) if cuda_graphs else model


def sampling_copy(model: torch.nn.Module, autocast_dtype: torch.dtype | None = None) -> torch.nn.Module:
    """The copy of `model` that sampling compiles (sampling_network, ddpm.aot_package): channels-last, per-channel
    GroupNorm statistics, image-channel convolutions padded, weights cast once to `autocast_dtype` (if any)."""
    model = copy.deepcopy(model)
    if isinstance(model, UNet):  # see ChannelPaddedConv2d: 1 or 3 channels get no fast kernel
        model = pad_image_channels(model)
    model = use_per_channel_group_norm(model.to(memory_format=torch.channels_last))
    if autocast_dtype is not None:
        model = cast_weights_for_autocast(model, autocast_dtype)
    return model


def samples_in_bf16(cfg: Config, device: torch.device) -> bool:
    """Whether sampling on `device` runs the network under bf16 autocast: on CUDA, with runtime.bf16."""
    return device.type == "cuda" and cfg.runtime.bf16


def student_sampling(cfg: Config, distilled_steps: int) -> Config:
    """cfg, or for a student distilled to `distilled_steps` DDIM steps (diffusion.distilled_steps; 0: not
    distilled) cfg with the sampler it was distilled for: deterministic DDIM (eta 0) at those steps. Its samples,
    its evaluation and its export's check use that, from the CLI and the pipeline alike."""
    if not distilled_steps:
        return cfg
    return dataclasses.replace(cfg, sampler=dataclasses.replace(cfg.sampler, name="ddim", steps=distilled_steps,
                                                                eta=0.0))


def sampler_options(sp: SamplerConfig, diffusion: DiffusionConfig) -> dict[str, object]:
    """The sampler-specific keyword arguments that `sp` asks for; a distilled student (diffusion.distilled_steps)
    gets its own timestep grid, and ConfigError for another step count or sampler."""
    if sp.name == "ddim":
        return {"steps": sp.steps, "eta": sp.eta,
                "timesteps": sampling_timesteps(diffusion.timesteps, sp.steps, diffusion.distilled_steps)}
    if diffusion.distilled_steps:
        raise ConfigError(f"sampler.name: 'ddpm' asked of a student distilled to {diffusion.distilled_steps} DDIM "
                          f"steps; sample it with sampler 'ddim' and {diffusion.distilled_steps} steps")
    return {"variance": sp.variance}


@torch.no_grad()
def _counted(net: Callable[..., torch.Tensor], total: int,
             num_classes: int | None) -> tuple[Callable[..., torch.Tensor], Any]:
    """`net` that moves a progress bar (tqdm, on a terminal only) and ddpm.progress once per sampling step, and
    carries the model's `num_classes`, the null class that classifier-free guidance needs (ddpm.samplers.guided)."""
    from tqdm import tqdm

    bar = tqdm(total=total, desc="sampling", unit="step", dynamic_ncols=True, disable=None, leave=False)

    done = 0  # bar.n stays 0 when the bar is disabled (no terminal)

    def counted(*args: Any, **kwargs: Any) -> torch.Tensor:
        nonlocal done
        out = net(*args, **kwargs)
        bar.update(1)
        done += 1
        progress.advance("sampling (network calls)", done, total)
        return out

    counted.num_classes = num_classes  # type: ignore[attr-defined]
    return counted, bar


def generate(model: torch.nn.Module, schedule: Schedule, cfg: Config, n: int, seed: int = 0,
             sample_cfg: SampleConfig | None = None, label: int | None = None,
             return_trajectory: bool = False, cuda_graphs: bool = True, compile: bool | None = None,
             network: Callable[..., torch.Tensor] | None = None) -> (tuple[torch.Tensor, torch.Tensor | None]
                                              | tuple[torch.Tensor, torch.Tensor | None, list[torch.Tensor]]):
    """Generate n images in batches; returns (uint8 [n, C, H, W] on the CPU, labels [n] or None[, trajectory]).

    The starting noise of image i depends only on `seed` and i's batch, so results are reproducible.
    How they are drawn is cfg.sampler; how many per batch, which label and whether compiled, `sample_cfg`
    (None: cfg.sample). A conditional model without `label` gets its classes in turn (an even class mix).
    On CUDA the network runs as replayed CUDA graphs (`cuda_graphs`), in bf16 when cfg.runtime.bf16, compiled when
    `compile` (None: `sample.compile`; see sampling_network; a short last batch is then zero-padded to the batch size,
    so that one compiled shape serves every batch: its starting noise is unchanged, the step noise of
    DDPM or DDIM with eta > 0 is drawn for the padded shape). `network`: a compiled network that replaces
    the model's, for any batch size (ddpm.aot_package's), run as CUDA graphs on CUDA; `compile` is then ignored.
    """
    sc, sp = sample_cfg or cfg.sample, cfg.sampler
    label = sc.label if label is None else label
    device = next(model.parameters()).device
    schedule = schedule.to(device)
    sample_fn = get_sampler(sp.name)
    shape = image_shape(cfg)
    gen = torch.Generator(device=device).manual_seed(seed)
    outs, all_labels, traj = [], [], None
    was_training = model.training
    model.eval()
    # The cache must be off for CUDA-graph capture under autocast.
    bf16 = samples_in_bf16(cfg, device)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16, cache_enabled=False)
    compiled = (sc.compile if compile is None else compile) and network is None
    if compiled and device.type != "cuda":
        log.warning("sample.compile applies on CUDA only; sampling on %s uncompiled", device)
        compiled = False
    options = sampler_options(sp, cfg.diffusion)  # before any compile: a student asked for other steps fails now
    if network is not None:
        net = GraphedDenoiser(network) if cuda_graphs and device.type == "cuda" else network
    else:
        net = sampling_network(model, device, cuda_graphs, compiled, torch.bfloat16 if bf16 else None)
    calls = sp.steps if sp.name == "ddim" else schedule.num_timesteps
    net, bar = _counted(net, -(-n // sc.batch_size) * calls, getattr(model, "num_classes", None))
    try:
        for start in range(0, n, sc.batch_size):
            b = min(sc.batch_size, n - start)
            x_T = torch.randn((b, *shape), generator=gen, device=device)
            labels = None
            if cfg.model.class_conditional:
                labels = (torch.full((b,), label, device=device, dtype=torch.long) if label is not None
                          else torch.arange(start, start + b, device=device) % model.num_classes)
                all_labels.append(labels.cpu())
            if compiled and b < sc.batch_size:  # zero padding: the images' starting noise stays the same
                x_T = F.pad(x_T, (0, 0) * len(shape) + (0, sc.batch_size - b))
                labels = None if labels is None else F.pad(labels, (0, sc.batch_size - b))
            with autocast:
                result = sample_fn(net, schedule, x_T, labels=labels, guidance_scale=sp.guidance_scale,
                                   prediction=cfg.diffusion.prediction, clip_denoised=sp.clip_denoised,
                                   generator=gen, return_trajectory=return_trajectory and start == 0,
                                   **options)
            if return_trajectory and start == 0:
                result, traj = result
                traj = [x[:b] for x in traj]
            outs.append(from_model_range(result[:b].float()).cpu())
    finally:
        model.train(was_training)
        bar.close()
    images = torch.cat(outs)
    labels_out = torch.cat(all_labels) if all_labels else None
    if return_trajectory:
        return images, labels_out, [from_model_range(x.float()).cpu() for x in traj or []]
    return images, labels_out


def grid_png(images: torch.Tensor, nrow: int | None = None) -> bytes:
    """uint8 [N, C, H, W] -> PNG bytes of a grid (ddpm.fileio.grid_png: torchvision's make_grid layout)."""
    png = fileio.grid_png(images.cpu().numpy(), nrow)
    if png is None:
        raise RuntimeError("Pillow is not installed: reinstall from the lock file (make install) to write PNG grids")
    return png


def save_grid(images: torch.Tensor, path: str | Path, nrow: int | None = None) -> Path:
    atomic_write_bytes(path, grid_png(images, nrow))
    return Path(path)


def save_array(images: torch.Tensor, labels: torch.Tensor | None, path: str | Path) -> Path:
    """Save uint8 images [N, C, H, W] (and labels) as an .npz, atomically."""
    buf = io.BytesIO()
    arrays = {"images": images.numpy()}
    if labels is not None:
        arrays["labels"] = labels.numpy()
    np.savez(buf, **arrays)
    atomic_write_bytes(path, buf.getvalue())
    return Path(path)


def trajectory_strip(trajectory: list[torch.Tensor], n: int = 8) -> torch.Tensor:
    """The first n images at every saved step: [steps * n, C, H, W], one row per step."""
    return torch.cat([x[:n] for x in trajectory])
