"""Whether a training run can fit in memory, decided from its settings before anything is allocated.

Values such as train.batch_size=1000000000 or model.base_channels=100000000 pass the config's type
and range checks and then fail deep inside PyTorch's allocator. `check_training_fits` compares a
lower bound of what one training step holds with the memory the device has free, and refuses the
run in one line naming the settings. The bound counts only what must exist at once:

    weights, their gradients, the EMA copy and AdamW's two moments: 5 * 4 bytes per parameter
    one batch: x_0, the noise and x_t (3 * C * H * W floats per image), plus the first convolution's
    output (base_channels * H * W floats per image), kept for the backward pass

Real use is higher (every other activation), so a run refused here could never have run; a run
that passes may still run out of memory later, which the CLI reports as one line too
(ddpm.errors.user_error). The parameter count comes from the U-Net built on PyTorch's "meta"
device, which allocates nothing.
"""

from __future__ import annotations

import resource
from pathlib import Path

import torch

from ddpm.config import Config, image_shape
from ddpm.errors import ResourceError
from ddpm.unet import build_unet

FLOAT_BYTES = 4
WEIGHT_COPIES = 5  # weights, gradients, EMA, AdamW exp_avg and exp_avg_sq


def parameter_count(cfg: Config) -> int:
    """The U-Net's number of parameters, counted without allocating them."""
    with torch.device("meta"):
        model = build_unet(cfg.model, image_shape(cfg))
    return sum(p.numel() for p in model.parameters())


def training_bytes(cfg: Config) -> tuple[int, int]:
    """Lower bounds of one training step's memory: (weights and optimizer state, one batch), in bytes."""
    c, h, w = image_shape(cfg)
    weights = WEIGHT_COPIES * FLOAT_BYTES * parameter_count(cfg)
    batch = FLOAT_BYTES * cfg.train.batch_size * h * w * (3 * c + cfg.model.base_channels)
    return weights, batch


def free_bytes(device: torch.device) -> int | None:
    """Memory this process may still allocate on `device`; None when unknown."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    if device.type != "cpu":
        return None
    limits = [_proc_bytes("/proc/meminfo", "MemAvailable")]
    soft, _ = resource.getrlimit(resource.RLIMIT_AS)
    if soft != resource.RLIM_INFINITY:
        limits.append(soft - (_proc_bytes("/proc/self/status", "VmSize") or 0))
    known = [n for n in limits if n is not None]
    return max(min(known), 0) if known else None


def check_training_fits(cfg: Config, device: torch.device) -> None:
    """Raise ResourceError, naming train.batch_size and model.base_channels, when one training step cannot fit."""
    weights, batch = training_bytes(cfg)
    free = free_bytes(device)
    if free is None or weights + batch <= free:
        return
    raise ResourceError(
        f"train.batch_size={cfg.train.batch_size} with model.base_channels={cfg.model.base_channels} needs at least "
        f"{_size(weights + batch)} on {device} ({_size(weights)} for the weights and optimizer state, {_size(batch)} "
        f"for one batch), but {_size(free)} is free; lower train.batch_size or model.base_channels")


def _proc_bytes(path: str, key: str) -> int | None:
    """The `key:` line of a /proc status file (given in kB) in bytes; None where it cannot be read."""
    try:
        for line in Path(path).read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def _size(n: int) -> str:
    for unit in ("bytes", "KiB", "MiB", "GiB", "TiB", "PiB"):
        if n < 1024 or unit == "PiB":
            return f"{n:,.0f} {unit}" if unit == "bytes" else f"{n:,.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")
