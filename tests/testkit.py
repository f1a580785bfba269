"""Helpers that several test modules share: IDX files written by hand, a learnable MNIST look-alike,
a free loopback port, tiny random-weight checkpoints to export.

Importable as `testkit` from every test module: pytest puts tests/ (the first folder up without an
__init__.py, also for tests/faults/) on sys.path.
"""

from __future__ import annotations

import socket
import struct
from pathlib import Path

import numpy as np


def idx_bytes(array: np.ndarray) -> bytes:
    """IDX by hand: 0, 0, type 0x08 (uint8), ndim, then big-endian uint32 dims, then data."""
    header = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    return header + array.astype(np.uint8).tobytes()


def fake_mnist(root: Path, n_train: int = 384, n_test: int = 128) -> Path:
    """MNIST's four IDX files under root/mnist/. Class k is a bright bar at a k-dependent place plus noise:
    learnable, so features are not degenerate."""
    rng = np.random.default_rng(0)
    target = root / "mnist"
    target.mkdir(parents=True)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        labels = np.arange(n) % 10
        images = rng.integers(0, 60, (n, 28, 28))
        for i, k in enumerate(labels):
            images[i, 4 + 2 * k: 7 + 2 * k, 4:24] = 255
        (target / f"{prefix}-images-idx3-ubyte").write_bytes(idx_bytes(images))
        (target / f"{prefix}-labels-idx1-ubyte").write_bytes(idx_bytes(labels))
    return target


def random_mnist(root: Path, n_train: int = 64, n_test: int = 16) -> Path:
    """MNIST's four IDX files under root/mnist/ with uniform random pixels (seed 0), labels 0-9 in turn;
    returns root."""
    import torch

    (root / "mnist").mkdir()
    gen = torch.Generator().manual_seed(0)
    for split, n in (("train", n_train), ("t10k", n_test)):
        images = torch.randint(0, 256, (n, 28, 28), generator=gen, dtype=torch.uint8)
        (root / "mnist" / f"{split}-images-idx3-ubyte").write_bytes(idx_bytes(images.numpy()))
        (root / "mnist" / f"{split}-labels-idx1-ubyte").write_bytes(idx_bytes(np.arange(n) % 10))
    return root


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tiny_config(conditional: bool) -> dict:
    """The settings of a tiny U-Net (8 channels) as params.yaml's dict. The unconditional model predicts eps on
    the linear schedule, the conditional one v on the cosine schedule, so that both prediction paths and both
    schedules are exercised."""
    from ddpm.config import ModelConfig

    model = ModelConfig(base_channels=8, channel_mult=(1, 2), num_res_blocks=1, attention_levels=(1,), num_heads=2,
                        dropout=0.0, norm_groups=4, class_conditional=conditional)
    diffusion = ({"timesteps": 50, "schedule": "cosine", "prediction": "v"} if conditional
                 else {"timesteps": 50, "schedule": "linear", "prediction": "eps"})
    return {"data": {"dataset": "mnist"}, "diffusion": diffusion, "model": {
        k: list(v) if isinstance(v, tuple) else v for k, v in model.__dict__.items()},
        "sampler": {"steps": 10}}


def tiny_checkpoint(path: Path, conditional: bool, seed: int) -> Path:
    """A checkpoint of the tiny U-Net with random weights (step 1234 + seed); its EMA weights differ from its
    model weights, so an export that took the wrong ones would show."""
    import torch

    from ddpm.checkpoint import save_checkpoint
    from ddpm.config import config_from_dict, image_shape
    from ddpm.unet import build_unet

    cfg = config_from_dict(tiny_config(conditional))
    torch.manual_seed(seed)
    net = build_unet(cfg.model, image_shape(cfg))
    with torch.no_grad():  # the zero-initialised output layers would make every prediction 0
        for p in net.parameters():
            p.add_(0.2 * torch.randn_like(p))
    ema = {k: v + 0.01 for k, v in net.state_dict().items()}
    save_checkpoint(path, {"model": net.state_dict(), "ema": ema, "config": cfg.to_dict(), "step": 1234 + seed})
    return path


def with_sampler_entry(src: Path, entry: dict | None) -> bytes:
    """The export at `src` with its metadata's "sampler" entry replaced by `entry` (None: none, as before exports
    recorded it), as the bytes of an ONNX file."""
    import json

    import onnx

    proto = onnx.load(str(src))
    prop = next(p for p in proto.metadata_props if p.key == "ddpm")
    meta = json.loads(prop.value)
    meta.pop("sampler")
    prop.value = json.dumps(meta if entry is None else {**meta, "sampler": entry})
    return proto.SerializeToString()
