"""The feature network for FID: a small CNN classifier trained on the dataset itself.

Inception-v3 weights cannot be downloaded offline, and pytorch-fid's and TTUR's maintainers advise
against Inception features for MNIST anyway (shared/ENVIRONMENT.md), so FID here uses the
penultimate layer of a classifier trained on the real training split. Its numbers are comparable
only between runs that use the same feature-net file, so the MNIST and Fashion-MNIST nets ship with
the code, pinned by SHA-256 (ddpm.feature_pins); nets trained elsewhere are labelled unpinned.

Architecture: one stage per conv width w, each a stride-2 conv (5x5 in the first stage, else 3x3)
then `depth - 1` 3x3 convs, each followed by [BatchNorm] and ReLU; then flatten -> linear
(feature_dim) = the features -> ReLU -> linear (10) = the logits. The features are taken before
that ReLU so that no dimension is exactly zero for every image (which would make the covariance
singular). Strided convs rather than pooling keep an MNIST epoch near a minute on a 2-core CPU.
BatchNorm costs about a third of that but pays for itself: 99.1% MNIST test accuracy after 2
epochs with it, 97.6% without. The 32x32 RGB net (CIFAR-10) is deeper; its accuracy is untested
here (no offline CIFAR-10), expect roughly 80% without augmentation.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from ddpm.checkpoint import save_checkpoint, verify_content
from ddpm.data import DATASET_SHAPES, NUM_CLASSES, load_images, to_model_range
from ddpm.errors import CheckpointError
from ddpm.feature_pins import is_shipped, verify_shipped
from ddpm.fileio import file_sha256

log = logging.getLogger(__name__)

FEATURE_NET_KIND = "ddpm-feature-net"
FORMAT_VERSION = 1
# (widths, convs per stage, batch norm): 28x28 -> 14 -> 7, and 32x32 -> 16 -> 8 -> 4.
ARCHITECTURES: dict[str, tuple[tuple[int, ...], int, bool]] = {
    "mnist": ((32, 64), 1, True),
    "fashion_mnist": ((32, 64), 1, True),
    "cifar10": ((64, 128, 256), 2, True),
}


@dataclass(frozen=True)
class FeatureNetConfig:
    """Everything needed to rebuild a FeatureNet; stored in its checkpoint."""

    dataset: str
    in_channels: int
    image_size: int
    widths: tuple[int, ...]
    depth: int = 1
    batch_norm: bool = True
    feature_dim: int = 128
    num_classes: int = NUM_CLASSES

    @classmethod
    def for_dataset(cls, dataset: str, feature_dim: int = 128) -> "FeatureNetConfig":
        if dataset not in DATASET_SHAPES:
            raise ValueError(f"dataset: unknown {dataset!r}; choose one of {', '.join(DATASET_SHAPES)}")
        c, h, _ = DATASET_SHAPES[dataset]
        widths, depth, batch_norm = ARCHITECTURES[dataset]
        return cls(dataset, c, h, widths, depth, batch_norm, feature_dim)


class FeatureNet(nn.Module):
    """x uint8-derived float [N, C, H, W] in [-1, 1] -> (features [N, D], logits [N, 10])."""

    def __init__(self, cfg: FeatureNetConfig):
        super().__init__()
        self.cfg = cfg
        layers: list[nn.Module] = []
        ch = cfg.in_channels
        for stage, w in enumerate(cfg.widths):
            for i in range(cfg.depth):
                k, stride = (5 if stage == 0 else 3, 2) if i == 0 else (3, 1)
                layers.append(nn.Conv2d(ch, w, k, stride=stride, padding=k // 2, bias=not cfg.batch_norm))
                if cfg.batch_norm:
                    layers.append(nn.BatchNorm2d(w))
                layers.append(nn.ReLU(inplace=True))
                ch = w
        self.conv = nn.Sequential(*layers)
        side = cfg.image_size // 2 ** len(cfg.widths)
        self.fc1 = nn.Linear(ch * side * side, cfg.feature_dim)
        self.fc2 = nn.Linear(cfg.feature_dim, cfg.num_classes)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        feats = self.fc1(self.conv(x).flatten(1))  # [N, D], pre-activation
        return feats, self.fc2(F.relu(feats))


def dataset_hashes(dataset: str, root: str | Path) -> dict[str, str]:
    """SHA-256 of every raw file of `dataset` under root/<dataset>/ that exists: the dataset's version."""
    from ddpm.data import _expected_hashes  # the file list lives with the loader

    base = Path(root) / dataset
    return {rel: file_sha256(base / rel) for rel in sorted(_expected_hashes(dataset)) if (base / rel).is_file()}


def _shuffled_batches(n: int, batch_size: int, gen: torch.Generator) -> list[torch.Tensor]:
    return list(torch.randperm(n, generator=gen).split(batch_size))


@torch.no_grad()
def _accuracy(net: FeatureNet, images: torch.Tensor, labels: torch.Tensor, batch_size: int) -> float:
    _, logits = extract(net, images, batch_size)
    return float((logits.argmax(1) == labels.numpy()).mean())


def train_feature_net(dataset: str, root: str | Path, out_path: str | Path, epochs: int = 3, batch_size: int = 128,
                      lr: float = 2e-3, seed: int = 0, device: str | torch.device = "cpu") -> dict[str, Any]:
    """Train the classifier on the real train split, test it, save it atomically.

    Defaults are EvaluateConfig's, with which the shipped MNIST and Fashion-MNIST nets were trained on a CPU.
    Deterministic on the CPU for a given seed, but not bit-identical across machines or on CUDA: hence
    the shipped, pinned nets (ddpm.feature_pins). Never writes into their folder.
    Adam with a 100-step linear warm-up then cosine decay to 0; no augmentation. The checkpoint holds
    the state dict, the FeatureNetConfig, the test accuracy, the training settings and the SHA-256 of
    the dataset files, and loads with weights_only=True. Returns {"test_accuracy", "path", "seconds"}.
    """
    if is_shipped(out_path):
        raise CheckpointError(f"feature net {out_path}: the shipped folder holds only pinned nets; train into "
                              f"another path (runs/features/), and to pin a new net copy it there and update "
                              f"ddpm.feature_pins.PINNED_SHA256")
    device = torch.device(device)
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    x_train, y_train = load_images(dataset, root, "train")  # uint8 [N, C, H, W], int64 [N]
    x_test, y_test = load_images(dataset, root, "test")
    cfg = FeatureNetConfig.for_dataset(dataset)
    net = FeatureNet(cfg).to(device)
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    total = epochs * math.ceil(len(x_train) / batch_size)
    warmup = min(100, total // 10)

    def lr_at(step: int) -> float:
        if step < warmup:
            return lr * (step + 1) / warmup
        return 0.5 * lr * (1 + math.cos(math.pi * (step - warmup) / max(total - warmup, 1)))

    x_dev, y_dev = x_train.to(device), y_train.to(device)  # uint8: 47 MB for MNIST, 150 MB for CIFAR-10
    start, step = time.perf_counter(), 0
    net.train()
    for epoch in range(epochs):
        running = torch.zeros((), device=device)  # summed on the device: no sync per step
        for idx in _shuffled_batches(len(x_train), batch_size, gen):
            idx = idx.to(device)
            for group in opt.param_groups:
                group["lr"] = lr_at(step)
            _, logits = net(to_model_range(x_dev[idx]))
            loss = F.cross_entropy(logits, y_dev[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            running += loss.detach()
            step += 1
        log.info("feature net %s: epoch %d/%d, mean loss %.4f", dataset, epoch + 1, epochs,
                 float(running) / math.ceil(len(x_train) / batch_size))
    net.eval()
    accuracy = _accuracy(net, x_test, y_test, 1024)
    seconds = time.perf_counter() - start
    log.info("feature net %s: test accuracy %.4f after %d epochs (%.0f s)", dataset, accuracy, epochs, seconds)
    save_checkpoint(out_path, {
        "kind": FEATURE_NET_KIND,
        "format_version": FORMAT_VERSION,
        "state_dict": {k: v.cpu() for k, v in net.state_dict().items()},
        "config": {**asdict(cfg), "widths": list(cfg.widths)},
        "test_accuracy": accuracy,
        "train": {"epochs": epochs, "batch_size": batch_size, "lr": lr, "seed": seed, "device": device.type},
        "dataset_hashes": dataset_hashes(dataset, root),
    })
    return {"test_accuracy": accuracy, "path": str(out_path), "seconds": seconds}


def read_feature_checkpoint(path: str | Path) -> dict[str, Any]:
    """The checkpoint dict of a feature net, loaded with weights_only=True; CheckpointError if unusable.

    A shipped net is checked against its pin first (FeatureNetHashMismatch when its bytes differ).
    """
    path = Path(path)
    verify_shipped(path)
    if not path.is_file():
        raise CheckpointError(f"feature net {path} does not exist; train it with ddpm.features.train_feature_net "
                              f"or let `ddpm evaluate` train it")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any failure to unpickle means an unusable file
        first = str(exc).splitlines()[0] if str(exc) else ""
        raise CheckpointError(f"feature net {path} is truncated, corrupt or unsafe ({type(exc).__name__}: {first}); "
                              f"delete it so that it is retrained, or restore it (dvc checkout)") from None
    if not isinstance(ckpt, dict) or ckpt.get("kind") != FEATURE_NET_KIND:
        raise CheckpointError(f"feature net {path} is not a ddpm feature-net checkpoint "
                              f"(no kind={FEATURE_NET_KIND!r}); delete it so that it is retrained")
    if ckpt.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"feature net {path} has format version {ckpt.get('format_version')!r}, "
                              f"this code reads {FORMAT_VERSION}; delete it so that it is retrained")
    return verify_content(path, ckpt, missing_ok=True)  # the shipped nets have none: their pin checks every byte


def load_feature_net(path: str | Path, device: str | torch.device = "cpu") -> FeatureNet:
    """Rebuild a FeatureNet from its checkpoint alone, in eval mode on `device`."""
    ckpt = read_feature_checkpoint(path)
    try:
        raw = dict(ckpt["config"])
        cfg = FeatureNetConfig(**{**raw, "widths": tuple(raw["widths"])})
        net = FeatureNet(cfg)
        net.load_state_dict(ckpt["state_dict"])
    except (KeyError, TypeError, ValueError, RuntimeError) as exc:
        raise CheckpointError(f"feature net {path}: its config or weights do not fit a FeatureNet "
                              f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}); "
                              f"delete it so that it is retrained") from None
    return net.to(device).eval()


@contextlib.contextmanager
def _strict_fp32() -> Iterator[None]:
    """Turn TF32 off (cuDNN convolutions use it by default on CUDA) so that GPU features match CPU ones
    to float32 precision, and cached reference statistics stay valid across devices."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


@torch.no_grad()
def extract(net: FeatureNet, images_uint8: torch.Tensor | np.ndarray, batch_size: int = 500
            ) -> tuple[np.ndarray, np.ndarray]:
    """uint8 images [N, C, H, W] -> (features float64 [N, D], logits float64 [N, 10]) as numpy arrays.

    Runs on the net's device in strict float32 (no TF32), batch by batch; the net is put in eval mode.
    """
    images = torch.as_tensor(images_uint8)
    expect = (net.cfg.in_channels, net.cfg.image_size, net.cfg.image_size)
    if images.dtype != torch.uint8 or images.ndim != 4 or tuple(images.shape[1:]) != expect:
        raise ValueError(f"extract: expected uint8 images [N, {', '.join(map(str, expect))}], "
                         f"got {images.dtype} {list(images.shape)}")
    net.eval()
    device = next(net.parameters()).device
    feats, logits = [], []
    with _strict_fp32():
        for start in range(0, len(images), batch_size):
            f, lg = net(to_model_range(images[start:start + batch_size].to(device)))
            feats.append(f.double().cpu())
            logits.append(lg.double().cpu())
    if not feats:
        return np.zeros((0, net.cfg.feature_dim)), np.zeros((0, net.cfg.num_classes))
    return torch.cat(feats).numpy(), torch.cat(logits).numpy()
