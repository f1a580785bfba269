"""Checkpoints: plain state dicts plus the config, written atomically and loaded with weights_only=True.

Every checkpoint carries a content hash (CONTENT_HASH_KEY): the SHA-256 of its payload, each tensor's
dtype, shape and bytes and every other value, in key order. It is written by `save_checkpoint` and
checked by `load_checkpoint`, because torch.load reads a tensor's bytes without any check of its own:
a flipped byte in the weights would load and sample without a word. A checkpoint without the hash
(written before it existed) loads with a warning that it cannot be checked.

Training writes its checkpoints through a CheckpointWriter: a copy on the CPU is taken at once, and the hash,
serialisation and write run in a background thread while the next steps train.
"""

from __future__ import annotations

import hashlib
import io
import logging
import pickle
import zipfile
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch

from ddpm.fileio import atomic_write_bytes  # noqa: F401  (re-exported)
from ddpm.errors import CheckpointError
from ddpm.config import Config, ConfigError, config_from_dict, image_shape
from ddpm.config_moves import migrate_stored
from ddpm.unet import UNet, build_unet

log = logging.getLogger(__name__)

CONTENT_HASH_KEY = "content_sha256"


def content_sha256(payload: Any) -> str:
    """SHA-256 of a checkpoint payload (nested dicts, lists, tensors, plain values), the hash entry left out."""
    h = hashlib.sha256()
    _feed(h, {k: v for k, v in payload.items() if k != CONTENT_HASH_KEY} if isinstance(payload, dict) else payload)
    return h.hexdigest()


def _feed(h: Any, value: Any) -> None:
    if isinstance(value, torch.Tensor):
        t = value.detach().cpu().contiguous()
        h.update(f"T{t.dtype}{tuple(t.shape)}:".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().data)
    elif isinstance(value, dict):
        h.update(f"D{len(value)}:".encode())
        for key in sorted(value, key=lambda k: (type(k).__name__, repr(k))):
            _feed(h, key)
            _feed(h, value[key])
    elif isinstance(value, (list, tuple)):
        h.update(f"L{len(value)}:".encode())
        for item in value:
            _feed(h, item)
    else:
        text = repr(value).encode()
        h.update(f"V{type(value).__name__}{len(text)}:".encode() + text)


def verify_content(path: str | Path, ckpt: dict[str, Any], missing_ok: bool = False) -> dict[str, Any]:
    """`ckpt` without its hash entry; CheckpointError naming `path` when the content does not match the hash.

    A checkpoint without a hash is logged as unchecked (nothing is logged when `missing_ok`)."""
    stored = ckpt.get(CONTENT_HASH_KEY)
    if stored is None:
        if not missing_ok:
            log.warning("checkpoint %s carries no content hash (written before checkpoints had one), so it cannot "
                        "be checked for corruption; it is used as it is", path)
        return ckpt
    if stored != content_sha256(ckpt):
        raise CheckpointError(f"checkpoint {path} is corrupt: its content does not match the SHA-256 written with "
                              f"it (bytes changed on disk or in a copy); use an earlier checkpoint or retrain")
    return {k: v for k, v in ckpt.items() if k != CONTENT_HASH_KEY}


def save_checkpoint(path: str | Path, payload: dict[str, Any]) -> None:
    """Serialise `payload` (tensors, numbers, strings, lists, dicts) with its content hash to `path` atomically."""
    buf = io.BytesIO()
    torch.save({**payload, CONTENT_HASH_KEY: content_sha256(payload)}, buf)
    atomic_write_bytes(path, buf.getvalue())


def cpu_copy(value: Any) -> Any:
    """`value` (nested dicts, lists, tensors, plain values) with every tensor copied to the CPU: a snapshot that
    later training steps, which update tensors in place, do not change."""
    if isinstance(value, torch.Tensor):
        return value.detach().to("cpu", copy=True)
    if isinstance(value, dict):
        return {k: cpu_copy(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(cpu_copy(v) for v in value) if type(value) in (list, tuple) else value
    return value


class CheckpointWriter:
    """save_checkpoint in a background thread, one checkpoint at a time.

    `save` waits for the previous write, copies the payload to the CPU and returns; the hash, serialisation and
    atomic write follow in the worker. A write's error is raised once, by `poll` after the write has ended, or by
    the next `save` or `wait` (the file then holds the checkpoint before it, as save_checkpoint leaves it).
    `wait` returns once the last checkpoint saved is on disk."""

    def __init__(self) -> None:
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="checkpoint-writer")
        self._pending: Future | None = None

    def save(self, path: str | Path, payload: dict[str, Any]) -> None:
        self.wait()
        self._pending = self._pool.submit(save_checkpoint, path, cpu_copy(payload))

    def poll(self) -> None:
        """Raise the error of a write that has ended; cheap enough for every training step."""
        if self._pending is not None and self._pending.done():
            self.wait()

    def wait(self) -> None:
        pending = self._pending
        if pending is None:
            return
        try:
            pending.result()
        except BaseException:
            if pending.done():  # the write's own error, raised here once (not an interrupt of this wait)
                self._pending = None
            raise
        self._pending = None

    def close(self) -> None:
        """Wait for the last write and stop the worker; the write's error is raised."""
        try:
            self.wait()
        finally:
            self._pool.shutdown()


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a checkpoint with weights_only=True (a pickle that would run code is refused) and check its content hash.

    Returns the payload as it was saved, without the hash entry; a config stored before settings moved
    to the sampler and runtime blocks comes back with them there (ddpm.config_moves.migrate_stored)."""
    path = Path(path)
    if not path.is_file():
        what = "is not a file" if path.exists() else "does not exist"
        raise CheckpointError(f"checkpoint {path} {what}; train a model first (`ddpm train`) or pass its path")
    if not _is_zip(path):  # every torch.save since PyTorch 1.6 writes a zip archive
        raise CheckpointError(f"{path} is not a checkpoint, or is truncated or corrupt: it is not the complete "
                              f"zip archive that torch.save writes; pass the checkpoint.pt of a `ddpm train` run, or "
                              f"use an earlier checkpoint")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        raise CheckpointError(f"checkpoint {path} was refused: it holds objects other than weights and plain data, "
                              f"so loading it could run code ({_first_line(exc)}). Only load checkpoints "
                              f"written by `ddpm train`.") from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError, IndexError, KeyError, ValueError) as exc:
        # IndexError, KeyError, ValueError: what the weights-only unpickler raises on bytes that are no pickle
        raise CheckpointError(f"checkpoint {path} is not a checkpoint, or is truncated or corrupt "
                              f"({type(exc).__name__}: {_first_line(exc)}); use an earlier checkpoint or "
                              f"retrain") from None
    missing = [k for k in ("model", "config", "step") if not isinstance(ckpt, dict) or k not in ckpt]
    if missing:
        raise CheckpointError(f"checkpoint {path} is not a ddpm checkpoint (missing {', '.join(missing)})")
    ckpt = verify_content(path, ckpt)
    if isinstance(ckpt["config"], dict):
        ckpt["config"] = migrate_stored(ckpt["config"])
    return ckpt


def _is_zip(path: Path) -> bool:
    try:
        return zipfile.is_zipfile(path)
    except OSError as exc:
        raise CheckpointError(f"checkpoint {path} cannot be read ({exc.strerror or exc})") from None


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [""])[0]


def config_of(ckpt: dict[str, Any], path: str | Path = "checkpoint") -> Config:
    try:
        return config_from_dict(ckpt["config"])
    except ConfigError as exc:
        raise CheckpointError(f"{path}: its stored config is invalid: {exc}") from None


def load_model(path: str | Path, device: str | torch.device = "cpu",
               use_ema: bool = True) -> tuple[UNet, Config, dict[str, Any]]:
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
