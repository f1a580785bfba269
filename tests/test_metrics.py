"""Tests for ddpm.metrics, ddpm.features and ddpm.evaluate.

Metric functions are checked against independent computations: scipy.linalg.sqrtm, closed-form
Gaussian Frechet distances, brute-force nearest neighbours and precision/recall. The behaviour of
FID with a trained feature net (rises with blur and noise, noise images far above the floor) uses
a small net trained here on a subset of real MNIST when data/mnist is present, otherwise on a
synthetic 10-class scribble dataset written in MNIST's IDX format, so CI (no data) still runs it;
DDPM_TEST_SYNTHETIC=1 forces the synthetic data.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from pathlib import Path

import numpy as np
import pytest
import scipy.linalg
import torch
from torchvision.transforms.functional import gaussian_blur

from ddpm import metrics
from ddpm.config import Config, DataConfig, DiffusionConfig, EvaluateConfig, RuntimeConfig, config_from_dict
from ddpm.errors import CheckpointError
from testkit import idx_bytes

REPO = Path(__file__).resolve().parents[1]
IDX_NAMES = {("train", "images"): "train-images-idx3-ubyte", ("train", "labels"): "train-labels-idx1-ubyte",
             ("test", "images"): "t10k-images-idx3-ubyte", ("test", "labels"): "t10k-labels-idx1-ubyte"}


def random_spd(d: int, rng: np.random.Generator, rank: int | None = None) -> np.ndarray:
    a = rng.standard_normal((d, rank or 2 * d))
    return a @ a.T / a.shape[1]


# ---- Frechet distance and the matrix square root ----

@pytest.mark.parametrize("d", [2, 16, 64])
def test_trace_sqrt_product_matches_scipy_sqrtm(d: int) -> None:
    rng = np.random.default_rng(d)
    c1, c2 = random_spd(d, rng), random_spd(d, rng)
    expected = np.trace(scipy.linalg.sqrtm(c1 @ c2)).real
    assert metrics.trace_sqrt_product(c1, c2) == pytest.approx(expected, rel=1e-8)
    s = metrics.sqrtm_psd(c1)
    np.testing.assert_allclose(s, scipy.linalg.sqrtm(c1).real, atol=1e-9)
    np.testing.assert_allclose(s @ s, c1, atol=1e-10)


def pytorch_fid_reference(mu1, cov1, mu2, cov2) -> float:
    """pytorch-fid's formula with scipy.linalg.sqrtm (no eps retry needed for these full-rank inputs)."""
    covmean = scipy.linalg.sqrtm(cov1 @ cov2).real
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(cov1) + np.trace(cov2) - 2 * np.trace(covmean))


def test_frechet_distance_matches_scipy_and_is_symmetric() -> None:
    rng = np.random.default_rng(1)
    d = 32
    mu1, mu2 = rng.standard_normal(d), rng.standard_normal(d)
    c1, c2 = random_spd(d, rng), random_spd(d, rng)
    fd = metrics.frechet_distance(mu1, c1, mu2, c2)
    assert fd == pytest.approx(pytorch_fid_reference(mu1, c1, mu2, c2), rel=1e-8)
    assert fd == pytest.approx(metrics.frechet_distance(mu2, c2, mu1, c1), rel=1e-10)
    assert metrics.frechet_distance(mu1, c1, mu1, c1) == pytest.approx(0.0, abs=1e-9 * np.trace(c1))


def test_frechet_distance_closed_forms() -> None:
    d = 10
    # N(0, I) vs N(0, 4I): sum over dims of (1 - 2)^2 = d.
    assert metrics.frechet_distance(np.zeros(d), np.eye(d), np.zeros(d), 4 * np.eye(d)) == pytest.approx(d)
    # Commuting diagonal covariances: |mu1 - mu2|^2 + sum (s1 - s2)^2 with s the standard deviations.
    rng = np.random.default_rng(2)
    s1, s2, mu = rng.uniform(0.1, 3, d), rng.uniform(0.1, 3, d), rng.standard_normal(d)
    expected = mu @ mu + ((s1 - s2) ** 2).sum()
    assert metrics.frechet_distance(mu, np.diag(s1 ** 2), np.zeros(d), np.diag(s2 ** 2)) == pytest.approx(expected)


def test_frechet_distance_singular_covariances() -> None:
    """Rank-deficient covariances (fewer samples than dims): finite, real, >= 0, where scipy's path
    needs an eps retry."""
    rng = np.random.default_rng(3)
    d = 48
    c1, c2 = random_spd(d, rng, rank=5), random_spd(d, rng, rank=7)
    fd = metrics.frechet_distance(np.zeros(d), c1, np.ones(d), c2)
    assert np.isfinite(fd) and fd > 0
    assert metrics.frechet_distance(np.zeros(d), c1, np.zeros(d), c1) == pytest.approx(0.0, abs=1e-6)
    # Against the eps-regularised scipy computation (pytorch-fid's fallback).
    eps = np.eye(d) * 1e-10
    expected = pytorch_fid_reference(np.zeros(d), c1 + eps, np.ones(d), c2 + eps)
    assert fd == pytest.approx(expected, rel=1e-4)


def test_feature_stats_and_shape_errors() -> None:
    x = np.random.default_rng(4).standard_normal((50, 6))
    mu, cov = metrics.feature_stats(x)
    np.testing.assert_allclose(mu, x.mean(0))
    np.testing.assert_allclose(cov, np.cov(x.T))
    with pytest.raises(ValueError):
        metrics.feature_stats(x[:1])
    with pytest.raises(ValueError):
        metrics.frechet_distance(mu, cov, mu[:3], cov)


# ---- precision / recall ----

def clusters(n: int, classes: list[int], rng: np.random.Generator, d: int = 16) -> np.ndarray:
    centres = np.random.default_rng(100).standard_normal((10, d)) * 6  # fixed, well-separated
    labels = rng.choice(classes, n)
    return centres[labels] + rng.standard_normal((n, d))


def brute_manifold(real: np.ndarray, fake: np.ndarray, k: int) -> dict[str, float]:
    """The papers' definitions, written out with full distance matrices."""
    def radii(x):
        d = np.linalg.norm(x[:, None] - x[None], axis=-1)
        return np.sort(d, axis=1)[:, k]

    rr, rf = radii(real), radii(fake)
    d = np.linalg.norm(fake[:, None] - real[None], axis=-1)  # [fake, real]
    in_real = d <= rr[None]  # fake i in the ball of real j
    return {"precision": in_real.any(1).mean(), "recall": (d.T <= rf[None]).any(1).mean(),
            "density": in_real.sum() / (k * len(fake)), "coverage": in_real.any(0).mean()}


def test_manifold_metrics_match_brute_force_and_batching() -> None:
    rng = np.random.default_rng(5)
    real, fake = clusters(300, list(range(10)), rng), clusters(250, [0, 1, 2, 3], rng) * 1.1
    expected = brute_manifold(real, fake, 3)
    assert metrics.manifold_metrics(real, fake, k=3, batch_size=64) == pytest.approx(expected)
    assert metrics.manifold_metrics(real, fake, k=3, batch_size=1000) == pytest.approx(expected)
    assert metrics.precision_recall(real, fake, k=3) == pytest.approx((expected["precision"], expected["recall"]))


def test_precision_recall_real_vs_real_and_missing_modes() -> None:
    """10 Gaussian clusters in 4-d (low intrinsic dimension, like classifier features): with 1000 points
    and k=3, two samples of the same distribution score about 0.92 each (the estimate nears 1 as N grows)."""
    rng = np.random.default_rng(6)
    real = clusters(1000, list(range(10)), rng, d=4)
    assert metrics.precision_recall(real, real, k=3) == (1.0, 1.0)
    p, r = metrics.precision_recall(real, clusters(1000, list(range(10)), rng, d=4), k=3)
    assert p > 0.85 and r > 0.85
    p, r = metrics.precision_recall(real, clusters(1000, [0, 1, 2], rng, d=4), k=3)  # 3 of 10 modes
    assert p > 0.85 and 0.2 < r < 0.35
    p, r = metrics.precision_recall(real, clusters(1000, list(range(10)), rng, d=4) + 10.0, k=3)  # off the manifold
    assert p < 0.1 and r < 0.1


# ---- Inception Score and class entropy ----

def test_inception_score_bounds() -> None:
    confident_uniform = 50.0 * np.eye(10)[np.arange(1000) % 10]
    mean, std = metrics.inception_score(confident_uniform)
    assert mean == pytest.approx(10.0, rel=1e-6) and std < 1e-6
    one_class = 50.0 * np.eye(10)[np.zeros(1000, dtype=int)]
    assert metrics.inception_score(one_class)[0] == pytest.approx(1.0, abs=1e-6)
    unsure = np.zeros((1000, 10))  # uniform p(y|x): no information
    assert metrics.inception_score(unsure)[0] == pytest.approx(1.0, abs=1e-9)
    half = 50.0 * np.eye(10)[np.arange(1000) % 5]  # 5 classes
    assert metrics.inception_score(half)[0] == pytest.approx(5.0, rel=1e-6)


def test_class_entropy_bounds() -> None:
    balanced = np.eye(10)[np.arange(1000) % 10]
    assert metrics.class_entropy(balanced) == pytest.approx(math.log(10))
    assert metrics.class_entropy(np.eye(10)[np.full(100, 3)]) == 0.0
    assert metrics.class_entropy(np.eye(10)[np.arange(100) % 2]) == pytest.approx(math.log(2))
    rand = np.random.default_rng(7).standard_normal((500, 10))
    assert 0.0 <= metrics.class_entropy(rand) <= math.log(10)


def test_confident_fraction_counts_top_probabilities_at_the_threshold() -> None:
    # softmax of [a, 0, ..., 0] puts e^a / (e^a + 9) on the top class: >= 0.9 exactly when a >= ln 81
    a = np.array([math.log(81) + 1e-9, math.log(81) - 1e-6, 10.0, 0.0])
    logits = np.zeros((4, 10))
    logits[:, 0] = a
    assert metrics.confident_fraction(logits) == 0.5
    assert metrics.confident_fraction(logits, threshold=0.1) == 1.0


# ---- pixel nearest neighbours ----

def test_nearest_neighbours_brute_force() -> None:
    rng = np.random.default_rng(8)
    real = torch.from_numpy(rng.integers(0, 256, (300, 1, 28, 28), dtype=np.uint8))
    fake = torch.from_numpy(rng.integers(0, 256, (40, 1, 28, 28), dtype=np.uint8))
    fake[:5] = real[[7, 0, 299, 150, 7]]  # exact copies
    dist, idx = metrics.nearest_neighbours(fake, real, batch_size=16)
    f, r = fake.flatten(1).double().numpy() / 255, real.flatten(1).double().numpy() / 255
    d = np.linalg.norm(f[:, None] - r[None], axis=-1)
    np.testing.assert_array_equal(idx, d.argmin(1))
    np.testing.assert_allclose(dist, d.min(1), rtol=1e-12)
    np.testing.assert_array_equal(idx[:5], [7, 0, 299, 150, 7])
    assert (dist[:5] == 0).all()


# ---- a trained feature net ----

def write_idx_dataset(root: Path, splits: dict[str, tuple[np.ndarray, np.ndarray]]) -> None:
    """Write images uint8 [N, 28, 28] and labels [N] per split as MNIST's IDX files under root/mnist/."""
    (root / "mnist").mkdir(parents=True)
    for split, (images, labels) in splits.items():
        (root / "mnist" / IDX_NAMES[split, "images"]).write_bytes(idx_bytes(images))
        (root / "mnist" / IDX_NAMES[split, "labels"]).write_bytes(idx_bytes(labels))


def scribbles(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A synthetic 10-class MNIST stand-in: each class a fixed random 4-point stroke, jittered and shifted."""
    from PIL import Image, ImageDraw

    protos = np.random.default_rng(1234).uniform(6, 22, (10, 4, 2))
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 10, n)
    images = np.zeros((n, 28, 28), np.uint8)
    for i, c in enumerate(labels):
        pts = protos[c] + rng.normal(0, 1.0, (4, 2)) + rng.uniform(-2, 2, 2)
        img = Image.new("L", (28, 28))
        ImageDraw.Draw(img).line([tuple(p) for p in pts], fill=255, width=int(rng.integers(2, 4)))
        images[i] = np.asarray(img)
    return images, labels


@pytest.fixture(scope="module")
def small_data(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str, torch.Tensor]:
    """(data root holding a 4000/2000 MNIST subset, its description, 1000 held-out images [1000, 1, 28, 28]);
    synthetic scribbles when data/mnist is absent. The held-out images are in neither split."""
    from ddpm.data import load_images

    root = tmp_path_factory.mktemp("data")
    real_dir = REPO / "data" / "mnist"
    use_real = not os.environ.get("DDPM_TEST_SYNTHETIC")  # =1 runs the CI path (no data) here
    if use_real and all((real_dir / f).is_file() for f in IDX_NAMES.values()):
        xtr, ytr = load_images("mnist", REPO / "data", "train")
        xte, yte = load_images("mnist", REPO / "data", "test")
        write_idx_dataset(root, {"train": (xtr[:4000, 0].numpy(), ytr[:4000].numpy()),
                                 "test": (xte[:2000, 0].numpy(), yte[:2000].numpy())})
        return root, "mnist subset", xte[2000:3000]
    write_idx_dataset(root, {"train": scribbles(4000, 0), "test": scribbles(2000, 1)})
    return root, "synthetic scribbles (data/mnist absent)", torch.from_numpy(scribbles(1000, 2)[0][:, None])


@pytest.fixture(scope="module")
def trained(small_data: tuple[Path, str], tmp_path_factory: pytest.TempPathFactory) -> dict:
    from ddpm.features import train_feature_net

    root, kind, heldout = small_data
    path = tmp_path_factory.mktemp("features") / "mnist.pt"
    result = train_feature_net("mnist", root, path, epochs=2, batch_size=64, lr=2e-3, seed=0, device="cpu")
    cfg = Config(data=DataConfig("mnist", str(root)),
                 evaluate=EvaluateConfig(num_samples=500, batch_size=500), runtime=RuntimeConfig(device="cpu"))
    return {**result, "root": root, "kind": kind, "heldout": heldout, "path": path, "cfg": cfg}


def test_feature_net_trains_and_round_trips(trained: dict) -> None:
    from ddpm.data import load_images
    from ddpm.features import extract, load_feature_net

    assert trained["test_accuracy"] > 0.9, f"{trained['kind']}: accuracy {trained['test_accuracy']}"
    ckpt = torch.load(trained["path"], weights_only=True)  # plain data only
    assert ckpt["test_accuracy"] == trained["test_accuracy"] and set(ckpt["dataset_hashes"]) == set(IDX_NAMES.values())
    net = load_feature_net(trained["path"])
    x, y = load_images("mnist", trained["root"], "test")
    feats, logits = extract(net, x[:300], batch_size=64)
    feats2, _ = extract(net, x[:300], batch_size=300)
    assert feats.shape == (300, 128) and feats.dtype == np.float64 and logits.shape == (300, 10)
    np.testing.assert_allclose(feats, feats2, rtol=1e-4, atol=1e-4)  # batch size does not matter
    assert (logits.argmax(1) == y[:300].numpy()).mean() > 0.85


def test_fid_rises_with_blur_and_noise(trained: dict) -> None:
    """Held-out images, not training images: the net's features of images it was trained on differ
    from those of test images (overfitting), and a little noise can then make FID fall."""
    from ddpm.evaluate import reference_stats
    from ddpm.features import extract, load_feature_net

    cfg, net = trained["cfg"], load_feature_net(trained["path"])
    ref = reference_stats(cfg, trained["path"], torch.device("cpu"), net)
    x = trained["heldout"]

    def fid(images: torch.Tensor) -> float:
        return metrics.frechet_distance(*metrics.feature_stats(extract(net, images, 500)[0]), ref.mu_test, ref.cov_test)

    blurred = [fid(x if s == 0 else gaussian_blur(x, 7, s)) for s in (0, 0.7, 1.2, 2.0)]
    assert all(a < b for a, b in zip(blurred, blurred[1:])), blurred
    gen = torch.Generator().manual_seed(0)
    noisy = [fid((x.float() + s * 255 * torch.randn(x.shape, generator=gen)).clamp(0, 255).round().to(torch.uint8))
             for s in (0, 0.1, 0.25, 0.5)]
    assert all(a < b for a, b in zip(noisy, noisy[1:])), noisy
    pure_noise = torch.randint(0, 256, (1000, 1, 28, 28), generator=gen, dtype=torch.uint8)
    assert fid(pure_noise) > 20 * blurred[0], (fid(pure_noise), blurred[0])


def test_score_images_and_fid_floor(trained: dict) -> None:
    from ddpm.data import load_images
    from ddpm.evaluate import fid_floor, score_images

    cfg = trained["cfg"]
    floor = fid_floor(cfg, trained["path"])
    x_test, _ = load_images("mnist", trained["root"], "test")
    real = score_images(x_test[:500], cfg, trained["path"])
    noise = score_images(torch.randint(0, 256, (500, 1, 28, 28), dtype=torch.uint8), cfg, trained["path"])
    assert real["fid_floor"] == pytest.approx(floor)
    assert real["fid"] < 3 * floor + 1 and noise["fid"] > 20 * real["fid"]
    assert real["precision"] > 0.6 and real["recall"] > 0.6 and real["coverage"] > 0.6
    # Noise images collapse to one tight cluster in feature space; a single real outlier's big k-NN
    # ball can hold much of it, so precision may stay high (a known weakness); coverage cannot.
    assert noise["recall"] < 0.05 and noise["coverage"] < 0.05 and noise["density"] < real["density"]
    assert real["inception_score"] > 7 and real["class_entropy"] > 2.1
    # The real reference's share comes from its stored features through the classifier head: it must be
    # what the whole net gives on those training images (independent path: extract's logits).
    from ddpm.evaluate import REAL_SUBSET_SEED
    from ddpm.features import extract, load_feature_net
    x_train = load_images("mnist", trained["root"], "train")[0]
    order = np.random.default_rng(REAL_SUBSET_SEED).permutation(len(x_train))[:500]  # the reference's subset
    _, logits = extract(load_feature_net(trained["path"]), x_train[torch.from_numpy(order)])
    assert real["confident_fraction_real"] == metrics.confident_fraction(logits) > 0.5
    assert real["confident_fraction"] > 0.5 and noise["confident_fraction"] <= 1.0
    # Test images are as far from the training set as test images: about the quantile are "memorised".
    assert real["memorised_fraction"] < 0.05 and noise["memorised_fraction"] == 0.0
    copies = score_images(load_images("mnist", trained["root"], "train")[0][:500], cfg, trained["path"])
    assert copies["memorised_fraction"] == 1.0 and copies["nn_train_dist_min"] == 0.0


def test_reference_cache_is_reused_and_keyed_by_the_feature_net(trained: dict, tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    import shutil

    from ddpm import evaluate

    cfg = trained["cfg"]
    first = evaluate.reference_stats(cfg, trained["path"], torch.device("cpu"))
    calls = []
    monkeypatch.setattr(evaluate, "extract", lambda *a, **k: calls.append(1) or (_ for _ in ()).throw(AssertionError))
    again = evaluate.reference_stats(cfg, trained["path"], torch.device("cpu"))
    assert again.path == first.path and not calls
    np.testing.assert_array_equal(again.cov_test, first.cov_test)
    # Another feature-net file (different bytes) gets another cache entry.
    other = tmp_path / "other.pt"
    from ddpm.checkpoint import CONTENT_HASH_KEY, save_checkpoint
    ckpt = torch.load(trained["path"], weights_only=True)
    ckpt["test_accuracy"] = 0.5
    save_checkpoint(other, {k: v for k, v in ckpt.items() if k != CONTENT_HASH_KEY})
    monkeypatch.undo()
    assert evaluate.reference_stats(cfg, other, torch.device("cpu")).path.name != first.path.name
    # A corrupt cache is recomputed, not trusted.
    first.path.write_bytes(b"not an npz")
    assert evaluate.reference_stats(cfg, trained["path"], torch.device("cpu")).mu_test.shape == (128,)
    shutil.rmtree(tmp_path)


def test_corrupt_feature_net_gives_checkpoint_error(trained: dict, tmp_path: Path) -> None:
    from ddpm.evaluate import score_images
    from ddpm.features import load_feature_net

    good = trained["path"].read_bytes()
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(good[: len(good) // 2])
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"\x00" * 1000)
    foreign = tmp_path / "foreign.pt"
    torch.save({"model": {"w": torch.zeros(1)}}, foreign)
    for path in (truncated, garbage, foreign, tmp_path / "missing.pt"):
        with pytest.raises(CheckpointError, match=str(path.name)):
            load_feature_net(path)
    images = torch.zeros((10, 1, 28, 28), dtype=torch.uint8)
    with pytest.raises(CheckpointError, match="truncated"):  # an existing corrupt file is never silently retrained
        score_images(images, trained["cfg"], truncated)


def test_evaluate_checkpoint_writes_metrics(trained: dict, tmp_path: Path, tiny_model_cfg) -> None:
    import dataclasses

    from ddpm.checkpoint import save_checkpoint
    from ddpm.evaluate import evaluate_checkpoint
    from ddpm.unet import build_unet

    base = config_from_dict({"data": {"dataset": "mnist", "root": str(trained["root"])},
                             "diffusion": {"timesteps": 100}, "model": dataclasses.asdict(tiny_model_cfg)})
    model = build_unet(base.model, (1, 28, 28))
    save_checkpoint(tmp_path / "checkpoint.pt", {"model": model.state_dict(), "config": base.to_dict(), "step": 0})
    cfg = config_from_dict({**base.to_dict(), "evaluate": {"num_samples": 24, "batch_size": 12},
                            "sampler": {"steps": 2}, "runtime": {"device": "cpu"}})
    out = evaluate_checkpoint(tmp_path / "checkpoint.pt", cfg, tmp_path / "eval", feature_net=trained["path"])
    written = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    timings = json.loads((tmp_path / "eval" / "timings.json").read_text())
    # the results in metrics.json; how long the sampling took beside them, so that a rerun leaves metrics.json as it was
    assert {**written, **timings} == out and list(timings) == ["sample_seconds"] and "sample_seconds" not in written
    assert written["num_samples"] == 24 and written["steps"] == 2 and written["sampler"] == "ddim"
    for key in ("fid", "fid_floor", "precision", "recall", "inception_score", "class_entropy",
                "nn_train_dist_mean", "nn_train_dist_min", "memorised_fraction"):
        assert isinstance(written[key], float) and math.isfinite(written[key]), key
    assert written["fid"] > written["fid_floor"]  # an untrained U-Net
    # A net trained here is named and labelled unpinned: its FIDs compare only with its own.
    assert written["feature_net"] == {"path": str(trained["path"]), "pinned": False,
                                      "sha256": hashlib.sha256(trained["path"].read_bytes()).hexdigest()}
    for png in ("samples.png", "nearest.png"):
        assert (tmp_path / "eval" / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list((tmp_path / "eval").glob(".*tmp*"))
    # Evaluated again: the same metrics.json, byte for byte (DVC's export stage, which reads it, stays current).
    evaluate_checkpoint(tmp_path / "checkpoint.pt", cfg, tmp_path / "again", feature_net=trained["path"])
    assert (tmp_path / "again" / "metrics.json").read_bytes() == (tmp_path / "eval" / "metrics.json").read_bytes()


def test_the_shipped_net_is_the_default_labelled_pinned_and_its_reference_cache_stays_out_of_its_folder(
        trained: dict, tmp_path: Path, tiny_model_cfg) -> None:
    import dataclasses

    from ddpm.checkpoint import save_checkpoint
    from ddpm.evaluate import evaluate_checkpoint, reference_stats
    from ddpm.feature_pins import PINNED_SHA256, SHIPPED_DIR
    from ddpm.unet import build_unet

    shipped_before = sorted(p.name for p in SHIPPED_DIR.iterdir())
    cfg = config_from_dict({"data": {"dataset": "mnist", "root": str(trained["root"])}, "diffusion": {"timesteps": 100},
                            "model": dataclasses.asdict(tiny_model_cfg),
                            "evaluate": {"num_samples": 24, "batch_size": 12}, "sampler": {"steps": 2},
                            "runtime": {"device": "cpu"}})
    model = build_unet(cfg.model, (1, 28, 28))
    save_checkpoint(tmp_path / "checkpoint.pt", {"model": model.state_dict(), "config": cfg.to_dict(), "step": 0})
    out = evaluate_checkpoint(tmp_path / "checkpoint.pt", cfg, tmp_path / "eval")  # no feature net given
    assert out["feature_net"] == {"path": str(SHIPPED_DIR / "mnist.pt"), "sha256": PINNED_SHA256["mnist"],
                                  "pinned": True}
    cache = reference_stats(cfg, SHIPPED_DIR / "mnist.pt", torch.device("cpu")).path
    assert cache.parent == Path(trained["root"]).parent / "runs" / "fid_reference" and cache.is_file()
    assert sorted(p.name for p in SHIPPED_DIR.iterdir()) == shipped_before


def test_evaluate_rejects_a_feature_net_of_another_dataset(trained: dict, tmp_path: Path) -> None:
    from ddpm.evaluate import score_images

    cfg = Config(data=DataConfig("fashion_mnist", str(trained["root"])), diffusion=DiffusionConfig(),
                 evaluate=EvaluateConfig(), runtime=RuntimeConfig(device="cpu"))
    with pytest.raises(CheckpointError, match="trained on 'mnist'"):
        score_images(torch.zeros((10, 1, 28, 28), dtype=torch.uint8), cfg, trained["path"])


def test_onnx_backend_and_missing_feature_net(trained: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                              caplog: pytest.LogCaptureFixture) -> None:
    """backend=onnx goes through ddpm.onnx_sampler.sample (faked here: it returns test images) with the
    evaluate settings; a missing feature net is trained (and logged) with the evaluate.feature_* settings
    (training is faked too: it copies the module's net)."""
    import logging
    import shutil
    from ddpm import evaluate
    from ddpm.data import load_images

    calls = []
    x_test = load_images("mnist", trained["root"], "test")[0]

    def fake_sample(model_path, n, **kw):
        calls.append((Path(model_path), n, kw))
        return x_test[:n].numpy()

    def fake_train(dataset, root, out_path, **kw):
        calls.append(("train", dataset, kw))
        Path(out_path).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(trained["path"], out_path)
        return {"test_accuracy": trained["test_accuracy"], "path": str(out_path), "seconds": 0.0}

    import ddpm.onnx_sampler
    monkeypatch.setattr(ddpm.onnx_sampler, "sample", fake_sample)
    monkeypatch.setattr(evaluate, "train_feature_net", fake_train)
    cfg = config_from_dict({"data": {"dataset": "mnist", "root": str(trained["root"])},
                            "evaluate": {"backend": "onnx", "num_samples": 200, "seed": 3, "feature_seed": 5,
                                         "batch_size": 100, "feature_epochs": 1},
                            "sampler": {"steps": 7}, "runtime": {"device": "cpu"}})
    feature_net = tmp_path / "features" / "mnist.pt"
    with caplog.at_level(logging.WARNING, logger="ddpm.evaluate"):
        out = evaluate.evaluate_checkpoint(tmp_path / "no-checkpoint.pt", cfg, tmp_path / "eval",
                                           onnx_model=tmp_path / "m.onnx", feature_net=feature_net)
    assert feature_net.is_file() and "not found: training it" in caplog.text
    (path, n, kw), (what, dataset, train_kw) = calls  # sampling comes first
    assert what == "train" and dataset == "mnist"
    assert train_kw == {"epochs": 1, "batch_size": 128, "lr": 2e-3, "seed": 5, "device": torch.device("cpu")}
    assert path == tmp_path / "m.onnx" and n == 200
    assert kw["sampler"] == "ddim" and kw["steps"] == 7 and kw["seed"] == 3 and kw["batch_size"] == 100
    assert kw["provider"] == "cpu" and "guidance_scale" not in kw  # unconditional model
    assert out["backend"] == "onnx" and out["num_samples"] == 200
    assert out["fid"] < 5 * out["fid_floor"] + 5  # real test images score near the floor
