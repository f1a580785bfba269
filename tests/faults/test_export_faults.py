"""A disk that fills during the ONNX export: ENOSPC while a model file is written or made durable.

A good export of checkpoint A (the float32 model and its float16 twin) is made once. Each case
exports checkpoint B over a copy of it with the fault at one point, then checks that A's files are
byte-identical (SHA-256), that no temporary file or folder is left beside them, and that the error
says the disk is full and names the model. B's graph is exported once and handed to every case, so
a case costs the parity checks and the float16 conversion, not a torch.onnx.export.
"""

from __future__ import annotations

import builtins
import errno
import hashlib
import json
import os
import shutil
from pathlib import Path

import onnx
import pytest
import torch

import ddpm.export as export
from ddpm.checkpoint import load_model, save_checkpoint
from ddpm.config import ExportConfig, config_from_dict, image_shape
from ddpm.export import export_onnx, fp16_path
from ddpm.onnx_model import METADATA_KEY
from ddpm.unet import build_unet

pytestmark = [pytest.mark.faults, pytest.mark.usefixtures("one_torch_thread")]

TINY = {"data": {"dataset": "mnist"}, "diffusion": {"timesteps": 50},
        "model": {"base_channels": 8, "channel_mult": [1, 2], "num_res_blocks": 1, "attention_levels": [1],
                  "num_heads": 2, "dropout": 0.0, "norm_groups": 4}}


class FullDisk:
    """ENOSPC at the `nth` write (after half of its bytes) or fsync of the files called `name` under `folder`.

    Writes are caught at builtins.open, through which onnx and ddpm.fileio write, so the fault does
    not depend on which library writes the model; an fsync is matched to the file by its inode.
    """

    def __init__(self, folder: Path, op: str, name: str, nth: int = 1):
        self.folder, self.op, self.name, self.nth = folder.resolve(), op, name, nth
        self.seen, self.fired = 0, False
        self._open, self._fsync = builtins.open, os.fsync

    def install(self, monkeypatch: pytest.MonkeyPatch) -> None:
        monkeypatch.setattr(builtins, "open", self.open)
        monkeypatch.setattr(os, "fsync", self.fsync)

    def _hit(self) -> bool:
        self.seen += 1
        self.fired = self.fired or self.seen == self.nth
        return self.seen == self.nth

    def open(self, file, mode="r", *args, **kwargs):
        f = self._open(file, mode, *args, **kwargs)
        if (self.op == "write" and set(mode) & set("wax+") and isinstance(file, (str, os.PathLike))
                and Path(file).name == self.name and Path(file).resolve().is_relative_to(self.folder) and self._hit()):
            return _FillingFile(f)
        return f

    def fsync(self, fd: int) -> None:
        if self.op == "fsync":
            st = os.fstat(fd)
            if any(os.path.samestat(st, os.stat(p)) for p in self.folder.rglob(self.name)) and self._hit():
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self._fsync(fd)


class _FillingFile:
    """A file on a disk that fills up half-way through the next write, as Python reports it (no file name)."""

    def __init__(self, f):
        self._f = f

    def write(self, data: bytes) -> int:
        self._f.write(data[: len(data) // 2])
        self._f.flush()
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self._f.close()

    def __getattr__(self, name: str):
        return getattr(self._f, name)


def _checkpoint(path: Path, seed: int) -> Path:
    cfg = config_from_dict(TINY)
    torch.manual_seed(seed)
    net = build_unet(cfg.model, image_shape(cfg))
    with torch.no_grad():  # the zero-initialised output layers would make every prediction 0
        for p in net.parameters():
            p.add_(0.2 * torch.randn_like(p))
    save_checkpoint(path, {"model": net.state_dict(), "ema": net.state_dict(), "config": cfg.to_dict(), "step": seed})
    return path


def _files(folder: Path) -> dict[str, str]:
    """Every entry under `folder` (temporary folders included) and the SHA-256 of each file."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "folder"
            for p in sorted(folder.rglob("*"))}


def _step(path: Path) -> int:
    return json.loads({p.key: p.value for p in onnx.load(str(path)).metadata_props}[METADATA_KEY])["step"]


@pytest.fixture(scope="module")
def exports(tmp_path_factory) -> tuple[Path, Path, bytes]:
    """(A's good export with its float16 twin, checkpoint B, B's exported graph serialised)."""
    d = tmp_path_factory.mktemp("export-faults")
    good = export_onnx(_checkpoint(d / "a.pt", seed=0), d / "good" / "model.onnx", ExportConfig(fp16=True))
    ckpt_b = _checkpoint(d / "b.pt", seed=1)
    model, cfg, _ = load_model(ckpt_b, "cpu")
    return good, ckpt_b, export._to_onnx(model, cfg, ExportConfig()).SerializeToString()


@pytest.fixture
def previous(exports, tmp_path, monkeypatch) -> Path:
    """A copy of A's export in tmp_path, with the exporter handing out B's graph; returns the model's path."""
    good, _, graph = exports
    for p in (good, fp16_path(good)):
        shutil.copy2(p, tmp_path / p.name)
    monkeypatch.setattr(export, "_to_onnx", lambda *args: onnx.ModelProto.FromString(graph))
    return tmp_path / good.name


def _fails_and_keeps_the_previous_export(ckpt: Path, out: Path, disk: FullDisk, fp16: bool = True) -> None:
    before = _files(out.parent)
    with pytest.MonkeyPatch.context() as mp:
        disk.install(mp)
        with pytest.raises(OSError, match="No space left on device") as info:
            export_onnx(ckpt, out, ExportConfig(fp16=fp16))
    assert disk.fired, f"the export never reached {disk.op} #{disk.nth} of {disk.name}"
    assert _files(out.parent) == before  # byte-identical, and no temporary file or folder left
    assert info.value.errno == errno.ENOSPC and str(out) in str(info.value)


# The export writes the float32 model, the float16 model, the float16 model again and the float32 model
# again (both with their measured parity), then fsyncs both and renames them: a full disk at each point.
@pytest.mark.parametrize("op, name, nth", [
    ("write", "model.onnx", 1), ("write", "model.fp16.onnx", 1), ("write", "model.onnx", 2),
    ("fsync", "model.fp16.onnx", 1), ("fsync", "model.onnx", 1),
], ids=lambda v: str(v))
def test_full_disk_during_export_keeps_the_previous_export(exports, previous, op, name, nth):
    assert sorted(_files(previous.parent)) == ["model.fp16.onnx", "model.onnx"]
    _fails_and_keeps_the_previous_export(exports[1], previous, FullDisk(previous.parent, op, name, nth))


@pytest.mark.parametrize("name", ["model.onnx.data", "model.fp16.onnx.data", "model.onnx"])
def test_full_disk_with_external_weights_keeps_the_previous_export(exports, previous, monkeypatch, name):
    """Above export.EXTERNAL_DATA_BYTES (1 GiB) the weights go to `<model>.data`; here they do at any size.

    onnx writes that file through os.fdopen, not open, so only its fsync is failed.
    """
    monkeypatch.setattr(export, "EXTERNAL_DATA_BYTES", 0)
    _fails_and_keeps_the_previous_export(exports[1], previous, FullDisk(previous.parent, "fsync", name))


def test_full_disk_keeps_the_float16_twin_and_a_retry_replaces_both(exports, previous):
    """A float32-only export over one with a float16 twin: the twin goes only once the new model is in place."""
    _fails_and_keeps_the_previous_export(exports[1], previous, FullDisk(previous.parent, "fsync", "model.onnx"),
                                         fp16=False)
    export_onnx(exports[1], previous, ExportConfig(fp16=False))  # space again
    assert sorted(_files(previous.parent)) == ["model.onnx"] and _step(previous) == 1
