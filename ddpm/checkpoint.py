"""Checkpoints: plain state dicts plus the config, written atomically and loaded with weights_only=True."""

from __future__ import annotations

import io
import pickle
import zipfile
from pathlib import Path
from typing import Any

import torch

from ddpm.fileio import atomic_write_bytes  # noqa: F401  (re-exported)
from ddpm.errors import CheckpointError
from ddpm.config import Config, ConfigError, config_from_dict, image_shape
from ddpm.unet import UNet, build_unet


def save_checkpoint(path: str | Path, payload: dict[str, Any]) -> None:
    """Serialise `payload` (tensors, numbers, strings, lists, dicts) to `path` atomically."""
    buf = io.BytesIO()
    torch.save(payload, buf)
    atomic_write_bytes(path, buf.getvalue())


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a checkpoint with weights_only=True: a pickle that would run code is refused."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist; train a model first (`ddpm train`) or pass its path")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        raise CheckpointError(f"checkpoint {path} was refused: it holds objects other than weights and plain data, "
                              f"so loading it could run code ({str(exc).splitlines()[0]}). Only load checkpoints "
                              f"written by `ddpm train`.") from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError) as exc:
        raise CheckpointError(f"checkpoint {path} is truncated or corrupt ({type(exc).__name__}: "
                              f"{str(exc).splitlines()[0] if str(exc) else ''}); use an earlier checkpoint or retrain") from None
    missing = [k for k in ("model", "config", "step") if not isinstance(ckpt, dict) or k not in ckpt]
    if missing:
        raise CheckpointError(f"checkpoint {path} is not a ddpm checkpoint (missing {', '.join(missing)})")
    return ckpt


def config_of(ckpt: dict[str, Any], path: str | Path = "checkpoint") -> Config:
    try:
        return config_from_dict(ckpt["config"])
    except ConfigError as exc:
        raise CheckpointError(f"{path}: its stored config is invalid: {exc}") from None


def load_model(path: str | Path, device: str | torch.device = "cpu", use_ema: bool = True) -> tuple[UNet, Config, dict[str, Any]]:
    """Rebuild the U-Net from a checkpoint alone; returns (model in eval mode, config, checkpoint)."""
    ckpt = load_checkpoint(path)
    cfg = config_of(ckpt, path)
    model = build_unet(cfg.model, image_shape(cfg))
    state = ckpt["ema"] if use_ema and ckpt.get("ema") is not None else ckpt["model"]
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        raise CheckpointError(f"checkpoint {path}: weights do not fit the U-Net its config describes: "
                              f"{str(exc).splitlines()[0]}") from None
    return model.to(device).eval(), cfg, ckpt
