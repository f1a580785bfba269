"""Evaluation: sample from a checkpoint (PyTorch or onnxruntime) and score the samples.

Metrics (all in one metrics.json, flat but for `feature_net`):
    fid                 Frechet distance to the real test set, in the feature net's space (ddpm.features)
    fid_floor           the same for a real training subset of the same size: the best reachable at this n
    precision, recall   Kynkaanniemi et al. 2019, k = evaluate.nearest_k, against a real training subset
    density, coverage   Naeem et al. 2020, the same balls; unlike precision, not fooled by real outliers
    inception_score     classifier-based IS (mean over 10 splits), from 1 to 10; and its std
    class_entropy       entropy of the predicted-class histogram, nats, ln 10 = 2.303 when balanced
    confident_fraction  fraction of samples the feature net classifies with probability >= 0.9, and
                        confident_fraction_real, the same for the real training subset of the same size
    nn_train_dist_*     L2 distance on [0, 1] pixels from each sample to its nearest training image
    memorised_fraction  fraction of samples closer to a training image than `memorisation_threshold`,
                        the evaluate.memorisation_quantile quantile of the same distance for real test
                        images (so a model that generalises like the test set scores about that quantile)
    feature_net         {"path", "sha256", "pinned"}: the net that measured them; pinned is false for a net
                        trained here, whose FIDs compare only with FIDs from the same file
How long the sampling took (sample_seconds) is in timings.json beside it, not among the results: it
differs on every rerun, and what reads metrics.json (DVC's export stage, the registry's tags) must not.

Real-data reference statistics (test-set feature mean/cov, training features, test-to-train pixel
distances) depend only on the dataset files and the feature net, so they are cached once as
`runs/fid_reference/<dataset>-<key>.npz` in the folder that holds data.root (the project root),
key = hash of the dataset files' and the feature net's SHA-256: never beside a shipped net, in git.
The cache holds the SHA-256 of its own arrays; one whose arrays do not match it (altered, corrupt) or
that has none is recomputed with a warning, so a changed cache can never change an FID.
FID values are comparable only between runs that use the same feature-net file: by default the
shipped net pinned by SHA-256 (ddpm.feature_pins).
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from ddpm import progress
from ddpm.checkpoint import atomic_write_bytes, load_checkpoint, load_model
from ddpm.config import Config, SampleConfig, config_from_dict
from ddpm.data import load_images
from ddpm.errors import CheckpointError, ConfigError, DataError
from ddpm.feature_pins import PINNED, describe, is_shipped, resolve_feature_net, verify_shipped
from ddpm.fileio import file_sha256, fsync_dir
from ddpm.features import (FeatureNet, dataset_hashes, extract, load_feature_net,
                           read_feature_checkpoint, train_feature_net)
from ddpm.generate import generate, save_grid
from ddpm.layout import EvalFiles, RunLayout
from ddpm.metrics import (class_entropy, confident_fraction, feature_stats, frechet_distance, inception_score,
                          manifold_metrics, nearest_neighbours)
from ddpm.run_folder import owned
from ddpm.train import resolve_device

log = logging.getLogger(__name__)

DEFAULT_FEATURE_NET = PINNED  # the shipped net of the dataset (ddpm.feature_pins)
REFERENCE_DIR = "runs/fid_reference"  # beside data.root
REFERENCE_VERSION = 1
CACHE_HASH_KEY = "content_sha256"  # the reference cache's arrays' SHA-256, checked at every load
REAL_SUBSET_SEED = 0  # fixes which training images stand in for "real" in precision/recall and fid_floor
GRID_IMAGES = 64
NEAREST_PAIRS = 16


@dataclass(frozen=True)
class Reference:
    """Real-data statistics of one dataset version under one feature net."""

    mu_test: np.ndarray          # [D] float64
    cov_test: np.ndarray         # [D, D] float64
    train_feats: np.ndarray      # [N_train, D] float32, in a fixed random order
    nn_test_train: np.ndarray    # [N_test] float64: pixel L2 from each test image to its nearest training image
    path: Path


def feature_net_path(cfg: Config, feature_net: str | Path | None = None) -> Path:
    """The file that `feature_net` (pinned | retrain | a path; None: pinned) names for cfg's dataset."""
    return resolve_feature_net(DEFAULT_FEATURE_NET if feature_net is None else feature_net, cfg.data.dataset)


def ensure_feature_net(cfg: Config, feature_net: str | Path | None = None, device: torch.device | None = None) -> Path:
    """The feature net's path; trains it with the evaluate.feature_* settings if the file is missing.

    A shipped net is verified against its pin and never trained (FeatureNetHashMismatch, or
    CheckpointError when missing); any other file that exists but is corrupt raises CheckpointError
    rather than being silently replaced.
    """
    path = feature_net_path(cfg, feature_net)
    ev = cfg.evaluate
    if not path.exists() and not is_shipped(path):
        log.warning("feature net %s not found: training it on %s (%d epochs); its FIDs are unpinned, comparable "
                    "only between runs that use this file", path, cfg.data.dataset, ev.feature_epochs)
        result = train_feature_net(cfg.data.dataset, cfg.data.root, path, epochs=ev.feature_epochs,
                                   batch_size=ev.feature_batch_size, lr=ev.feature_lr, seed=ev.feature_seed,
                                   device=device or resolve_device(cfg.runtime.device))
        log.info("feature net %s: test accuracy %.4f (%.0f s)", path, result["test_accuracy"], result["seconds"])
    ckpt = read_feature_checkpoint(path)
    trained_on = ckpt.get("config", {}).get("dataset")
    if trained_on != cfg.data.dataset:
        raise CheckpointError(f"feature net {path} was trained on {trained_on!r}, but the samples are "
                              f"{cfg.data.dataset!r}; pass the feature net of {cfg.data.dataset}")
    return path


def _arrays_sha256(arrays: dict[str, np.ndarray]) -> str:
    """SHA-256 of named arrays: each name, dtype, shape and bytes, in name order."""
    h = hashlib.sha256()
    for name in sorted(arrays):
        a = np.ascontiguousarray(arrays[name])
        h.update(f"{name}:{a.dtype.str}{a.shape}:".encode())
        h.update(a.data)
    return h.hexdigest()


def _save_npz(path: Path, **arrays: np.ndarray) -> None:
    """Write `arrays` as an .npz atomically, with their SHA-256 as the array CACHE_HASH_KEY (_load_npz checks it)."""
    buf = io.BytesIO()
    np.savez(buf, **arrays, **{CACHE_HASH_KEY: np.array(_arrays_sha256(arrays))})
    atomic_write_bytes(path, buf.getvalue())


def _load_npz(path: Path) -> dict[str, np.ndarray]:
    """The arrays that _save_npz wrote; ValueError when the file has no hash or its arrays do not match it."""
    with np.load(path, allow_pickle=False) as z:
        arrays = {name: z[name] for name in z.files}
    stored = arrays.pop(CACHE_HASH_KEY, None)
    if stored is None:
        raise ValueError("it carries no content hash")
    if str(stored) != _arrays_sha256(arrays):
        raise ValueError("its arrays do not match the SHA-256 written with them: changed since it was written")
    return arrays


def reference_stats(cfg: Config, feature_net: str | Path, device: torch.device | None = None,
                    net: FeatureNet | None = None) -> Reference:
    """Load the cached real-data statistics for (dataset files, feature net), or compute and cache them."""
    dataset, root = cfg.data.dataset, cfg.data.root
    device = device or resolve_device(cfg.runtime.device)
    fn_path = feature_net_path(cfg, feature_net)
    hashes = dataset_hashes(dataset, root)
    if not hashes:
        raise DataError(f"no {dataset} files under {Path(root) / dataset}; run `ddpm data` first")
    stored = read_feature_checkpoint(fn_path).get("dataset_hashes")
    if stored != hashes:
        log.warning("feature net %s was trained on other %s files than those in %s (a different dataset "
                    "version); its FIDs are still self-consistent, but retrain it to match", fn_path, dataset, root)
    key_src = json.dumps({"version": REFERENCE_VERSION, "dataset": dataset, "files": hashes,
                          "feature_net": file_sha256(fn_path)}, sort_keys=True)
    key = hashlib.sha256(key_src.encode()).hexdigest()[:16]
    cache = Path(root).parent / REFERENCE_DIR / f"{dataset}-{key}.npz"
    if cache.is_file():
        try:
            z = _load_npz(cache)
            return Reference(z["mu_test"], z["cov_test"], z["train_feats"], z["nn_test_train"], cache)
        except Exception as exc:  # noqa: BLE001 - an unreadable or altered cache is recomputed, never used
            log.warning("reference cache %s is not used: %s; recomputing it", cache, exc)
    log.info("computing reference statistics of %s for %s -> %s", dataset, fn_path, cache)
    progress.advance("computing reference statistics")
    start = time.perf_counter()
    net = net or load_feature_net(fn_path, device)
    bs = cfg.evaluate.batch_size
    x_train, _ = load_images(dataset, root, "train")
    x_test, _ = load_images(dataset, root, "test")
    test_feats, _ = extract(net, x_test, bs)
    mu, cov = feature_stats(test_feats)
    order = np.random.default_rng(REAL_SUBSET_SEED).permutation(len(x_train))
    train_feats, _ = extract(net, x_train[torch.from_numpy(order)], bs)
    nn_test, _ = nearest_neighbours(x_test, x_train, device=device)
    _save_npz(cache, mu_test=mu, cov_test=cov, train_feats=train_feats.astype(np.float32), nn_test_train=nn_test)
    log.info("reference statistics cached in %s (%.0f s)", cache, time.perf_counter() - start)
    return Reference(mu, cov, train_feats.astype(np.float32), nn_test, cache)


def _real_subset(ref: Reference, n: int) -> np.ndarray:
    if n > len(ref.train_feats):
        raise ConfigError(f"evaluate.num_samples: {n} exceeds the {len(ref.train_feats)} training images used as "
                          f"the real reference; use at most {len(ref.train_feats)}")
    return ref.train_feats[:n].astype(np.float64)


@torch.no_grad()
def _logits_of_features(net: FeatureNet, feats: np.ndarray) -> np.ndarray:
    """The classifier head on features [N, D] that `extract` returned (they are taken before its ReLU)."""
    head = torch.as_tensor(feats, dtype=torch.float32, device=next(net.parameters()).device)
    return net.fc2(torch.relu(head)).double().cpu().numpy()


def _score(images: torch.Tensor | np.ndarray, cfg: Config, feature_net: str | Path | None,
           device: torch.device) -> tuple[dict[str, float], np.ndarray, np.ndarray]:
    """Metrics of uint8 images [N, C, H, W], plus each image's nearest-training-image distance and index."""
    images = torch.as_tensor(images)
    if len(images) < max(2, cfg.evaluate.nearest_k + 1):
        raise ConfigError(f"cannot score {len(images)} images: FID and precision/recall need more than "
                          f"evaluate.nearest_k ({cfg.evaluate.nearest_k}) images")
    ev = cfg.evaluate
    fn_path = ensure_feature_net(cfg, feature_net, device)
    net = load_feature_net(fn_path, device)
    ref = reference_stats(cfg, fn_path, device, net)
    feats, logits = extract(net, images, ev.batch_size)
    real = _real_subset(ref, len(images))
    mu, cov = feature_stats(feats)
    manifold = manifold_metrics(real, feats, k=ev.nearest_k, device=device)
    is_mean, is_std = inception_score(logits)
    x_train, _ = load_images(cfg.data.dataset, cfg.data.root, "train")
    dists, idx = nearest_neighbours(images, x_train, device=device)
    threshold = float(np.quantile(ref.nn_test_train, ev.memorisation_quantile))
    metrics = {
        "fid": frechet_distance(mu, cov, ref.mu_test, ref.cov_test),
        "fid_floor": frechet_distance(*feature_stats(real), ref.mu_test, ref.cov_test),
        **manifold,  # precision, recall, density, coverage
        "inception_score": is_mean,
        "inception_score_std": is_std,
        "class_entropy": class_entropy(logits),
        "confident_fraction": confident_fraction(logits),
        "confident_fraction_real": confident_fraction(_logits_of_features(net, real)),
        "nn_train_dist_mean": float(dists.mean()),
        "nn_train_dist_min": float(dists.min()),
        "nn_test_train_dist_mean": float(ref.nn_test_train.mean()),
        "memorisation_threshold": threshold,
        "memorised_fraction": float((dists < threshold).mean()),
    }
    return metrics, dists, idx


def score_images(images_uint8: torch.Tensor | np.ndarray, cfg: Config, feature_net_path: str | Path | None = None,
                 device: str | torch.device | None = None) -> dict[str, float]:
    """Score uint8 images [N, C, H, W] of cfg.data.dataset: the metrics listed in the module docstring.

    The feature net defaults to the shipped, pinned one (ddpm.feature_pins).
    """
    dev = torch.device(device) if device is not None else resolve_device(cfg.runtime.device)
    return _score(images_uint8, cfg, feature_net_path, dev)[0]


def fid_score(cfg: Config, feature_net: str | Path | None = None) -> Callable[[np.ndarray], float]:
    """The export gate's score: uint8 images [N, C, H, W] -> their FID under `feature_net` (None: pinned)."""
    def fid(images: np.ndarray) -> float:
        return float(score_images(images, cfg, feature_net)["fid"])
    return fid


def fid_floor(cfg: Config, feature_net: str | Path | None = None, n: int | None = None) -> float:
    """FID between n = evaluate.num_samples real training images and the test set: the best a model can score."""
    device = resolve_device(cfg.runtime.device)
    ref = reference_stats(cfg, ensure_feature_net(cfg, feature_net, device), device)
    return frechet_distance(*feature_stats(_real_subset(ref, n or cfg.evaluate.num_samples)), ref.mu_test, ref.cov_test)


def scored_on(dataset: str, cfg: Config) -> Config:
    """cfg with data.dataset = `dataset`, the one the checkpoint was trained on: its feature net and real images
    score the checkpoint's samples, whatever the settings name (a warning where they name another). Only the
    dataset changes: the settings' own model, which may not fit that dataset's images, is not used to score."""
    if dataset == cfg.data.dataset:
        return cfg
    log.warning("the checkpoint was trained on %s; scoring against %s, not data.dataset=%s", dataset, dataset,
                cfg.data.dataset)
    return dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, dataset=dataset))


def _eval_config(model_cfg: Config, cfg: Config) -> Config:
    """The checkpoint's data/diffusion/model/train settings with cfg's data root and its sampler, runtime,
    sample and evaluate settings, validated together (sampler.steps against the checkpoint's timesteps)."""
    scored_on(model_cfg.data.dataset, cfg)  # says so where the settings name another dataset
    raw = model_cfg.to_dict()
    raw["data"] = {**raw["data"], "root": cfg.data.root}
    ours = cfg.to_dict()
    raw.update({k: ours[k] for k in ("sampler", "runtime", "evaluate")}, sample={**ours["sample"], "label": None})
    return config_from_dict(raw)


def evaluation_draw(cfg: Config) -> SampleConfig:
    """What evaluation draws: evaluate.num_samples images of every class in turn, in evaluate.batch_size
    batches from evaluate.seed (sample.compile still applies)."""
    ev = cfg.evaluate
    return SampleConfig(num_images=ev.num_samples, batch_size=ev.batch_size, label=None, seed=ev.seed,
                        compile=cfg.sample.compile)


def _generate(checkpoint: str | Path, cfg: Config, onnx_model: str | Path | None, device: torch.device,
              aot: str | Path | None) -> tuple[torch.Tensor, Config, str, dict[str, Any] | None]:
    """Sample evaluate.num_samples uint8 images; returns (images [N, C, H, W], the evaluation config, backend,
    the torch backend's network: ddpm.aot_package.choose_package's record)."""
    ev = cfg.evaluate
    backend = "onnx" if onnx_model is not None or ev.backend == "onnx" else "torch"
    if backend == "torch":
        model, model_cfg, _ = load_model(checkpoint, device)
        run_cfg = _eval_config(model_cfg, cfg)
        from ddpm.aot_package import choose_package
        from ddpm.generate import samples_in_bf16
        from ddpm.schedule import Schedule
        network, used = choose_package(aot, checkpoint, device, samples_in_bf16(run_cfg, device))
        images, _ = generate(model, Schedule.from_config(run_cfg.diffusion), run_cfg, ev.num_samples, seed=ev.seed,
                             sample_cfg=evaluation_draw(run_cfg), network=network)
        return images, run_cfg, backend, used
    from ddpm import onnx_sampler  # lazily: onnxruntime is needed only here

    onnx_path = Path(onnx_model) if onnx_model is not None else RunLayout(Path(checkpoint).parent).onnx_model
    # The ONNX file carries its schedule; the checkpoint (if present) tells the dataset.
    run_cfg = _eval_config(_config_of_checkpoint(checkpoint), cfg) if Path(checkpoint).is_file() else cfg
    sp = run_cfg.sampler
    options: dict[str, Any] = {"variance": sp.variance, "clip_denoised": sp.clip_denoised}
    if run_cfg.model.class_conditional:
        options["guidance_scale"] = sp.guidance_scale
    arr = onnx_sampler.sample(onnx_path, ev.num_samples, sampler=sp.name, steps=sp.steps, eta=sp.eta, seed=ev.seed,
                              batch_size=ev.batch_size, provider="cuda" if device.type == "cuda" else "cpu", **options)
    return torch.from_numpy(np.ascontiguousarray(arr)), run_cfg, backend, None


def _config_of_checkpoint(checkpoint: str | Path) -> Config:
    from ddpm.checkpoint import config_of
    return config_of(load_checkpoint(checkpoint), checkpoint)


def evaluate_checkpoint(checkpoint: str | Path, cfg: Config, out_dir: str | Path, onnx_model: str | Path | None = None,
                        feature_net: str | Path | None = None, aot: str | Path | None = "auto") -> dict[str, Any]:
    """Sample evaluate.num_samples images from `checkpoint` (or from `onnx_model` with onnxruntime) and score them.

    Writes out_dir/metrics.json (the returned dict less sample_seconds: floats plus sampler, steps, num_samples,
    backend, feature_net: {"path", "sha256", "pinned"}, the net that measured the FIDs, and with the torch backend
    sampling: {"network": "aot", "package", "device"} or {"network": "eager", "reason"}, whether the AOT
    package `aot` (ddpm.aot_package.choose_package: a path, "auto" or None) sampled), out_dir/timings.json
    ({"sample_seconds"}), out_dir/samples.png (64 samples) and out_dir/nearest.png (the samples closest to a
    training image, each followed by that training image). `out_dir` is held for the run (ddpm.run_folder.owned).
    The files are one set: metrics.json is removed before the others are written and written last, so a
    metrics.json is always that of the files beside it.
    """
    net = feature_net_path(cfg, feature_net)  # cfg names the checkpoint's dataset (ddpm evaluate: scored_on)
    if net.is_file():  # an altered pinned net, or a corrupt file, fails now: no folder, no sampling
        read_feature_checkpoint(net)
    else:
        verify_shipped(net)
    with owned(out_dir, "ddpm evaluate"):
        return _evaluate_checkpoint(checkpoint, cfg, Path(out_dir), onnx_model, feature_net, aot)


def _evaluate_checkpoint(checkpoint: str | Path, cfg: Config, out: Path, onnx_model: str | Path | None,
                         feature_net: str | Path | None, aot: str | Path | None) -> dict[str, Any]:
    sp = cfg.sampler
    device = resolve_device(cfg.runtime.device)
    start = time.perf_counter()
    images, run_cfg, backend, network = _generate(checkpoint, cfg, onnx_model, device, aot)
    sample_seconds = time.perf_counter() - start
    log.info("sampled %d images with %s/%s in %.1f s", len(images), backend, sp.name, sample_seconds)
    progress.advance("scoring the samples")
    fn_path = ensure_feature_net(run_cfg, feature_net, device)
    metrics, dists, idx = _score(images, run_cfg, fn_path, device)
    steps = sp.steps if sp.name == "ddim" else run_cfg.diffusion.timesteps
    result: dict[str, Any] = {**metrics, "sampler": sp.name, "steps": steps, "num_samples": len(images),
                              "backend": backend, "feature_net": describe(fn_path, run_cfg.data.dataset)}
    if network is not None:
        result["sampling"] = network
    # One set: the old metrics.json goes first and the new one comes last, so metrics.json never stands beside
    # grids of another run, whatever moment a signal or a crash strikes.
    files = EvalFiles(out)
    files.metrics.unlink(missing_ok=True)
    fsync_dir(out)
    save_grid(images[:GRID_IMAGES], files.samples, nrow=8)
    closest = np.argsort(dists, kind="stable")[:NEAREST_PAIRS]
    x_train, _ = load_images(run_cfg.data.dataset, run_cfg.data.root, "train")
    pairs = torch.stack([torch.stack([images[i], x_train[idx[i]]]) for i in closest]).flatten(0, 1)
    save_grid(pairs, files.nearest, nrow=8)  # 4 (sample, nearest training image) pairs per row
    timings = {"sample_seconds": sample_seconds}
    atomic_write_bytes(files.timings, _json_bytes(timings))
    atomic_write_bytes(files.metrics, _json_bytes(result))
    return {**result, **timings}


def _json_bytes(record: dict[str, Any]) -> bytes:
    return (json.dumps(record, indent=2, sort_keys=True) + "\n").encode()
