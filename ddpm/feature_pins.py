"""The shipped FID feature nets, pinned by SHA-256, and which net a feature-net setting names.

An FID is comparable only with FIDs measured by the same feature-net file (ddpm.features), and a net
trained on each machine gives each machine its own FID scale. So the MNIST and Fashion-MNIST nets
were trained once, on a CPU with the evaluate.feature_* defaults, and ship in ddpm/feature_nets/,
each pinned below by its SHA-256. Every load of a file in that folder checks its
pin (ddpm.features.read_feature_checkpoint): a file whose bytes differ is refused with
FeatureNetHashMismatch, and nothing is ever trained into that folder.

A feature-net setting (pipeline.feature_net, `ddpm evaluate --feature-net`) is one of:
    pinned    the shipped net of the dataset. A dataset without one (cifar10: no offline data here)
              trains runs/features/<dataset>.pt on first use instead, and its FIDs are unpinned.
    retrain   runs/features/<dataset>.pt, trained here from the evaluate.feature_* settings (first
              use; the features stage with --force trains it again). Its FIDs are labelled unpinned
              and compare only with FIDs from the same file.
    a path    that file ("{dataset}" is replaced). The pipeline trains it there if it is missing; on the
              command line (`--feature-net`) it must exist, since a mistyped path would train a new net.
A net is labelled pinned when its SHA-256 is the pin of the dataset it scores, wherever it lies.

Torch-free, so that flows.runtime can resolve the setting without importing torch.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ddpm.errors import CheckpointError, FeatureNetHashMismatch
from ddpm.fileio import file_sha256

SHIPPED_DIR = Path(__file__).resolve().parent / "feature_nets"
SHIPPED_IN_GIT = "ddpm/feature_nets"  # the same folder, as git names it
RETRAINED = "runs/features/{dataset}.pt"
PINNED, RETRAIN = "pinned", "retrain"

# SHA-256 of ddpm/feature_nets/<dataset>.pt, made by ddpm.features.train_feature_net on the CPU with the
# evaluate.feature_* defaults and seed 0; each file records its settings, test accuracy and data hashes.
PINNED_SHA256: dict[str, str] = {
    "mnist": "dafe0346509dfa0d5d1119baab4577feb43707602eab07c94490e0d6899677bf",
    "fashion_mnist": "8a42870e3d0291074bcc421cda26ae2a3b386e8b965eb37329d01db17b21e6a6",
}


def resolve_feature_net(setting: str | Path, dataset: str) -> Path:
    """The feature-net file that `setting` (pinned | retrain | a path; see the module docstring) names."""
    if isinstance(setting, Path):
        return setting
    if setting == PINNED:
        return SHIPPED_DIR / f"{dataset}.pt" if dataset in PINNED_SHA256 else Path(RETRAINED.format(dataset=dataset))
    if setting == RETRAIN:
        return Path(RETRAINED.format(dataset=dataset))
    return Path(setting.format(dataset=dataset))


def is_shipped(path: str | Path) -> bool:
    """True for a path in the shipped folder (which holds pinned files only), whether or not it exists."""
    return Path(path).resolve().parent == SHIPPED_DIR


def verify_shipped(path: str | Path) -> None:
    """Refuse a file of the shipped folder that is missing or differs from its pin; other paths pass unchecked."""
    path = Path(path)
    if not is_shipped(path):
        return
    in_git = f"{SHIPPED_IN_GIT}/{path.name}"
    retrain = (f"or train one here explicitly with pipeline.feature_net={RETRAIN} "
               f"(`ddpm evaluate --feature-net {RETRAIN}`), whose FIDs are not comparable with pinned ones")
    expected = PINNED_SHA256.get(path.stem)
    if expected is None:
        raise CheckpointError(f"feature net {path}: no SHA-256 is pinned for a file of that name in the shipped "
                              f"folder, which holds only {', '.join(f'{d}.pt' for d in PINNED_SHA256)}; {retrain}")
    if not path.is_file():
        raise CheckpointError(f"the shipped feature net {path} is missing; restore it with "
                              f"`git checkout -- {in_git}`, {retrain}")
    actual = file_sha256(path)
    if actual != expected:
        raise FeatureNetHashMismatch(f"feature net {path} has SHA-256 {actual}, but {expected} is pinned; "
                                     f"restore it with `git checkout -- {in_git}`, {retrain}")


def describe(path: str | Path, dataset: str) -> dict[str, Any]:
    """{"path", "sha256", "pinned"}: which net measured an FID, for metrics.json and the tracking run."""
    sha = file_sha256(path)
    return {"path": str(path), "sha256": sha, "pinned": sha == PINNED_SHA256.get(dataset)}
