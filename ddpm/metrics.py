"""Sample-quality metrics on feature vectors and pixels: FID, precision/recall, IS, class entropy, nearest neighbours.

All feature-space functions take numpy arrays [N, D] (any float dtype; computed in float64) and
return Python floats. Pixel-space nearest neighbours use torch so that they can run on the GPU.

Matrix square root: the Frechet distance needs only tr(sqrt(C1 C2)), and C1 C2 has the same
eigenvalues as the symmetric PSD matrix sqrt(C1) C2 sqrt(C1). So we take sqrt(C1) from a symmetric
eigendecomposition (eigh, negative round-off eigenvalues clipped to 0) and sum the square roots of
the eigenvalues of sqrt(C1) C2 sqrt(C1). Unlike scipy.linalg.sqrtm on the non-symmetric product
C1 C2 (pytorch-fid), this never returns complex values, needs no epsilon-offset retry when a
covariance is singular (fewer samples than dimensions, dead features), and is about as fast.
Tests check it against scipy.linalg.sqrtm.
"""

from __future__ import annotations

import numpy as np
import torch


def sqrtm_psd(a: np.ndarray) -> np.ndarray:
    """The symmetric PSD square root of a symmetric PSD matrix [D, D] (eigenvalues below 0 taken as 0)."""
    a = np.asarray(a, dtype=np.float64)
    w, v = np.linalg.eigh((a + a.T) / 2)
    return (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T


def trace_sqrt_product(cov1: np.ndarray, cov2: np.ndarray) -> float:
    """tr(sqrt(cov1 @ cov2)) for symmetric PSD cov1, cov2 [D, D], via sqrt(cov1) cov2 sqrt(cov1)."""
    s1 = sqrtm_psd(cov1)
    m = s1 @ np.asarray(cov2, dtype=np.float64) @ s1
    w = np.linalg.eigvalsh((m + m.T) / 2)
    return float(np.sqrt(np.clip(w, 0.0, None)).sum())


def frechet_distance(mu1: np.ndarray, cov1: np.ndarray, mu2: np.ndarray, cov2: np.ndarray) -> float:
    """Squared Frechet distance between N(mu1, cov1) and N(mu2, cov2) (Heusel et al. 2017, eq. 6):

        d^2 = |mu1 - mu2|^2 + tr(cov1) + tr(cov2) - 2 tr(sqrt(cov1 cov2)).

    mu [D], cov [D, D]. Symmetric in its two distributions, 0 for identical ones, clipped at 0.
    """
    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    cov1, cov2 = np.asarray(cov1, np.float64), np.asarray(cov2, np.float64)
    if mu1.shape != mu2.shape or cov1.shape != cov2.shape or cov1.shape != (mu1.size, mu1.size):
        raise ValueError(f"frechet_distance: shapes do not fit: mu {mu1.shape} {mu2.shape}, "
                         f"cov {cov1.shape} {cov2.shape}")
    diff = mu1 - mu2
    d2 = diff @ diff + np.trace(cov1) + np.trace(cov2) - 2.0 * trace_sqrt_product(cov1, cov2)
    return float(max(d2, 0.0))


def feature_stats(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(mean [D], unbiased covariance [D, D]) of features [N, D], N >= 2, in float64."""
    f = np.asarray(features, dtype=np.float64)
    if f.ndim != 2 or len(f) < 2:
        raise ValueError(f"feature_stats: need features [N >= 2, D], got shape {f.shape}")
    return f.mean(axis=0), np.cov(f, rowvar=False)


def _sq_dists(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Squared Euclidean distances [len(a), len(b)], clamped at 0 against round-off."""
    d = (a * a).sum(1, keepdim=True) - 2.0 * a @ b.T + (b * b).sum(1)[None, :]
    return d.clamp_min_(0.0)


def knn_radii(feats: np.ndarray, k: int = 3, batch_size: int = 1000, device: str | torch.device = "cpu") -> np.ndarray:
    """Squared distance from each row of feats [N, D] to its k-th nearest other row: [N] float64.

    Each point is its own 0th neighbour, so this is the (k+1)-th smallest distance in its row, as in
    Kynkaanniemi et al.'s reference code. Rows are processed `batch_size` at a time.
    """
    x = torch.as_tensor(np.asarray(feats, dtype=np.float64), device=device)
    if not 0 < k < len(x):
        raise ValueError(f"knn_radii: k={k} needs more than k points, got {len(x)}")
    # topk is several times faster than kthvalue on the CPU.
    out = [_sq_dists(x[i:i + batch_size], x).topk(k + 1, dim=1, largest=False).values[:, -1]
           for i in range(0, len(x), batch_size)]
    return torch.cat(out).cpu().numpy()


def _balls(points: torch.Tensor, centres: torch.Tensor, radii_sq: torch.Tensor, batch_size: int
           ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Which points fall in which balls (centre j, squared radius radii_sq[j]), `batch_size` points at a time.

    Returns (point inside any ball: bool [P], balls containing each point: int64 [P],
    ball contains any point: bool [C]).
    """
    any_ball, counts, hit = [], [], torch.zeros(len(centres), dtype=torch.bool, device=centres.device)
    for i in range(0, len(points), batch_size):
        inside = _sq_dists(points[i:i + batch_size], centres) <= radii_sq[None, :]  # [b, C]
        any_ball.append(inside.any(1))
        counts.append(inside.sum(1))
        hit |= inside.any(0)
    return torch.cat(any_ball), torch.cat(counts), hit


def manifold_metrics(real_feats: np.ndarray, fake_feats: np.ndarray, k: int = 3, batch_size: int = 1000,
                     device: str | torch.device = "cpu") -> dict[str, float]:
    """k-NN manifold metrics of fake features [M, D] against real features [N, D]:

    precision, recall  Kynkaanniemi et al. 2019. The real manifold is the union of balls around each
                       real feature with radius its k-NN distance among the reals; likewise for fakes.
                       precision = fraction of fakes inside the real manifold, recall = fraction of
                       reals inside the fake manifold. Both in [0, 1].
    density, coverage  Naeem et al. 2020, on the real balls only, robust to outliers: one real outlier
                       with a huge ball can swallow a whole cluster of bad fakes and raise precision,
                       but adds at most 1/(kM) per fake to density (mean number of real balls holding
                       a fake, / k; about 1 when fake matches real, may exceed 1) and one ball to
                       coverage (fraction of real balls holding at least one fake, in [0, 1]).

    Distances are computed `batch_size` rows at a time in float64 on `device`: 10k x 10k needs about
    80 MB per batch, not 800 MB. Use M = N: all four numbers depend on the sample sizes.
    """
    real = torch.as_tensor(np.asarray(real_feats, dtype=np.float64), device=device)
    fake = torch.as_tensor(np.asarray(fake_feats, dtype=np.float64), device=device)
    real_r = torch.as_tensor(knn_radii(real_feats, k, batch_size, device), device=device)
    fake_r = torch.as_tensor(knn_radii(fake_feats, k, batch_size, device), device=device)
    fake_in_real, counts, real_hit = _balls(fake, real, real_r, batch_size)
    real_in_fake, _, _ = _balls(real, fake, fake_r, batch_size)
    return {
        "precision": float(fake_in_real.double().mean()),
        "recall": float(real_in_fake.double().mean()),
        "density": float(counts.double().sum()) / (k * len(fake)),
        "coverage": float(real_hit.double().mean()),
    }


def precision_recall(real_feats: np.ndarray, fake_feats: np.ndarray, k: int = 3, batch_size: int = 1000,
                     device: str | torch.device = "cpu") -> tuple[float, float]:
    """Improved precision and recall (Kynkaanniemi et al. 2019), in [0, 1]; see `manifold_metrics`."""
    m = manifold_metrics(real_feats, fake_feats, k, batch_size, device)
    return m["precision"], m["recall"]


def _softmax(logits: np.ndarray) -> np.ndarray:
    z = np.asarray(logits, dtype=np.float64)
    z = z - z.max(axis=1, keepdims=True)
    p = np.exp(z)
    return p / p.sum(axis=1, keepdims=True)


def inception_score(logits: np.ndarray, splits: int = 10) -> tuple[float, float]:
    """Classifier-based Inception Score (Salimans et al. 2016): exp(E_x KL(p(y|x) || p(y))).

    logits [N, K] of the dataset's own classifier. Computed on `splits` equal parts, as is customary;
    returns (mean, std) over the parts. Ranges from 1 (one class, or no confidence) to K.
    """
    p = _softmax(logits)
    splits = max(1, min(splits, len(p)))
    scores = []
    for part in np.array_split(p, splits):
        py = part.mean(axis=0, keepdims=True)
        kl = (part * (np.log(np.clip(part, 1e-300, None)) - np.log(np.clip(py, 1e-300, None)))).sum(axis=1)
        scores.append(np.exp(kl.mean()))
    return float(np.mean(scores)), float(np.std(scores))


def confident_fraction(logits: np.ndarray, threshold: float = 0.9) -> float:
    """Fraction of images whose top class gets softmax probability >= threshold (logits [N, K]).

    A sample that a classifier trained on the real data recognises with confidence looks like a member
    of one class; blurred or malformed samples fall below. Compare with the same fraction for real images.
    """
    return float((_softmax(np.asarray(logits)).max(axis=1) >= threshold).mean())


def class_entropy(logits: np.ndarray) -> float:
    """Entropy (nats) of the histogram of predicted classes argmax(logits [N, K]): 0 to ln K.

    ln 10 = 2.303 for evenly spread classes; low values reveal mode collapse onto a few classes.
    """
    logits = np.asarray(logits)
    counts = np.bincount(logits.argmax(axis=1), minlength=logits.shape[1]).astype(np.float64)
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log(p)).sum())


@torch.no_grad()
def nearest_neighbours(fake: torch.Tensor | np.ndarray, real: torch.Tensor | np.ndarray, batch_size: int = 1000,
                       device: str | torch.device = "cpu") -> tuple[np.ndarray, np.ndarray]:
    """For each fake image, its nearest real image by L2 distance on [0, 1] pixels.

    fake uint8 [M, C, H, W], real uint8 [N, C, H, W] -> (distances float64 [M], indices int64 [M]).
    The search runs in float32 on `device`, `batch_size` fakes at a time; the winners' distances are
    then recomputed exactly in float64. For MNIST sqrt(784) = 28 is the largest possible distance.
    """
    fake, real = torch.as_tensor(fake), torch.as_tensor(real)
    if fake.shape[1:] != real.shape[1:]:
        raise ValueError(f"nearest_neighbours: image shapes differ: {list(fake.shape[1:])} vs {list(real.shape[1:])}")
    real_dev = real.flatten(1).to(device=device, dtype=torch.float32) / 255.0
    real_sq = (real_dev * real_dev).sum(1)[None, :]
    idx = []
    for i in range(0, len(fake), batch_size):
        f = fake[i:i + batch_size].flatten(1).to(device=device, dtype=torch.float32) / 255.0
        # |f - r|^2 less |f|^2, which is the same along a row: one pass over the [batch, N] block, not four
        idx.append(torch.addmm(real_sq, f, real_dev.T, alpha=-2.0).argmin(1).cpu())
    indices = torch.cat(idx) if idx else torch.zeros(0, dtype=torch.long)
    diff = fake.flatten(1).double() / 255.0 - real.flatten(1)[indices].double() / 255.0
    return diff.norm(dim=1).numpy(), indices.numpy()
