"""Helpers that several test modules share: IDX files written by hand, a learnable MNIST look-alike,
a free loopback port.

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
