"""The shipped FID feature nets: the files in git match their pins, load and classify, and an altered,
missing or stray file in their folder is refused (one line, exit status 2), never trained over.

The hashes are recomputed here with hashlib from the files themselves, and the data hashes the nets
record are compared with the dataset pins of shared/ENVIRONMENT.md (ddpm.data.SHA256), so a net
trained on other files, or a pin edited to fit a file, fails. Real test images are used when
data/<dataset> is present and verifies; otherwise that test is skipped.
"""

from __future__ import annotations

import hashlib
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from ddpm import cli, feature_pins
from ddpm.config import EvaluateConfig, config_from_dict
from ddpm.errors import CheckpointError, FeatureNetHashMismatch
from ddpm.feature_pins import PINNED_SHA256, resolve_feature_net

REPO = Path(__file__).resolve().parents[1]
SHIPPED = REPO / "ddpm" / "feature_nets"
MIN_ACCURACY = {"mnist": 0.99, "fashion_mnist": 0.90}


def test_every_shipped_file_has_the_sha256_pinned_for_it():
    found = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in SHIPPED.iterdir()}
    assert found == {f"{d}.pt": sha for d, sha in PINNED_SHA256.items()}
    assert feature_pins.SHIPPED_DIR == SHIPPED.resolve()
    tracked = subprocess.run(["git", "-C", str(REPO), "ls-files", "ddpm/feature_nets"], capture_output=True,
                             text=True).stdout.split()
    if tracked:  # a git checkout: the files are in git, not only on this disk
        assert sorted(tracked) == sorted(f"ddpm/feature_nets/{name}" for name in found)


@pytest.mark.parametrize("dataset", sorted(PINNED_SHA256))
def test_shipped_nets_load_and_were_trained_on_the_pinned_data_with_the_defaults(dataset):
    from ddpm.data import SHA256
    from ddpm.features import load_feature_net, read_feature_checkpoint

    path = resolve_feature_net("pinned", dataset)
    ckpt = read_feature_checkpoint(path)
    ev = EvaluateConfig()
    assert ckpt["config"]["dataset"] == dataset and ckpt["test_accuracy"] >= MIN_ACCURACY[dataset]
    assert ckpt["dataset_hashes"] == SHA256[dataset]
    assert ckpt["train"] == {"epochs": ev.feature_epochs, "batch_size": ev.feature_batch_size, "lr": ev.feature_lr,
                             "seed": ev.feature_seed, "device": "cpu"}
    feats, logits = load_feature_net(path)(torch.zeros(3, 1, 28, 28))
    assert feats.shape == (3, 128) and logits.shape == (3, 10)


@pytest.mark.parametrize("dataset", sorted(PINNED_SHA256))
def test_shipped_nets_classify_the_real_test_set_as_recorded(dataset):
    from ddpm.data import load_images, verify_dataset
    from ddpm.features import extract, load_feature_net, read_feature_checkpoint

    try:
        verify_dataset(dataset, REPO / "data")
    except Exception as exc:  # noqa: BLE001
        pytest.skip(f"no verified data/{dataset} ({exc})")
    path = resolve_feature_net("pinned", dataset)
    x, y = load_images(dataset, REPO / "data", "test")
    _, logits = extract(load_feature_net(path), x, 1000)
    accuracy = float((logits.argmax(1) == y.numpy()).mean())
    assert accuracy >= MIN_ACCURACY[dataset]
    assert accuracy == pytest.approx(read_feature_checkpoint(path)["test_accuracy"], abs=2e-3)


def test_settings_name_the_shipped_net_a_retrained_one_or_a_path():
    assert resolve_feature_net("pinned", "mnist") == SHIPPED.resolve() / "mnist.pt"
    assert resolve_feature_net("pinned", "cifar10") == Path("runs/features/cifar10.pt")  # none ships: trained here
    assert resolve_feature_net("retrain", "fashion_mnist") == Path("runs/features/fashion_mnist.pt")
    assert resolve_feature_net("nets/{dataset}.pt", "mnist") == Path("nets/mnist.pt")


@pytest.fixture
def shipped_copy(tmp_path, monkeypatch) -> Path:
    """A stand-in for the shipped folder, holding an altered MNIST net: still a valid checkpoint."""
    folder = (tmp_path / "feature_nets").resolve()
    folder.mkdir()
    ckpt = torch.load(SHIPPED / "mnist.pt", weights_only=True)
    ckpt["state_dict"]["fc2.bias"] += 0.01
    torch.save(ckpt, folder / "mnist.pt")
    monkeypatch.setattr(feature_pins, "SHIPPED_DIR", folder)
    return folder / "mnist.pt"


def test_an_altered_shipped_net_is_refused_in_one_line_with_exit_status_2(shipped_copy, tmp_path, capsys):
    from ddpm.features import load_feature_net

    actual = hashlib.sha256(shipped_copy.read_bytes()).hexdigest()
    with pytest.raises(FeatureNetHashMismatch) as err:
        load_feature_net(resolve_feature_net("pinned", "mnist"))
    message = str(err.value)
    assert "\n" not in message and str(shipped_copy) in message
    assert PINNED_SHA256["mnist"] in message and actual in message
    assert "git checkout -- ddpm/feature_nets/mnist.pt" in message and "pipeline.feature_net=retrain" in message
    # `ddpm evaluate` refuses it before sampling anything (and there are no MNIST files here to sample against).
    from testkit import tiny_checkpoint

    checkpoint = tiny_checkpoint(tmp_path / "checkpoint.pt", conditional=False, seed=0)
    code = cli.main(["evaluate", "--checkpoint", str(checkpoint), "--out", str(tmp_path / "eval"),
                     f"data.root={tmp_path / 'data'}"])
    assert code == 2 and capsys.readouterr().err.strip().splitlines()[-1] == f"ddpm evaluate: error: {message}"
    assert not (tmp_path / "eval").exists()


def test_a_missing_or_stray_file_in_the_shipped_folder_is_refused_and_nothing_trains_into_it(
        shipped_copy, tmp_path, monkeypatch):
    from ddpm import evaluate
    from ddpm.features import read_feature_checkpoint, train_feature_net

    shipped_copy.unlink()
    monkeypatch.setattr(evaluate, "train_feature_net", lambda *a, **k: pytest.fail("trained into the shipped folder"))
    cfg = config_from_dict({"data": {"dataset": "mnist", "root": str(tmp_path / "data")}})
    with pytest.raises(CheckpointError,
                       match="is missing; restore it with `git checkout -- ddpm/feature_nets/mnist.pt`"):
        evaluate.ensure_feature_net(cfg)
    stray = shipped_copy.with_name("cifar10.pt")
    shutil.copy(SHIPPED / "mnist.pt", stray)
    with pytest.raises(CheckpointError, match="no SHA-256 is pinned"):
        read_feature_checkpoint(stray)
    with pytest.raises(CheckpointError, match="holds only pinned nets"):
        train_feature_net("mnist", tmp_path / "data", shipped_copy)


def test_git_ignores_the_reference_statistics_cache_but_not_the_shipped_nets():
    from ddpm.evaluate import REFERENCE_DIR

    if shutil.which("git") is None or not (REPO / ".git").exists():
        pytest.skip("not a git checkout")

    def ignored(rel: str) -> bool:
        return subprocess.run(["git", "-C", str(REPO), "check-ignore", "-q", rel]).returncode == 0

    assert ignored(f"{REFERENCE_DIR}/mnist-0123456789abcdef.npz")
    assert not ignored("ddpm/feature_nets/mnist.pt")
