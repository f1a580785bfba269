"""Bytes that change after they were written: a checkpoint with flipped bytes, a checkpoint from before
content hashes, an altered FID reference cache.

torch.load reads a tensor's bytes without checking them, and np.load an array's, so each case first
shows that the altered file still loads with the library alone, then that the project refuses it
(checkpoint) or recomputes it (reference cache) and says so.
"""

from __future__ import annotations

import logging
import struct
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from ddpm.checkpoint import CONTENT_HASH_KEY, content_sha256, load_checkpoint, load_model, save_checkpoint
from ddpm.cli import main
from ddpm.config import config_from_dict, image_shape
from ddpm.errors import CheckpointError
from ddpm.unet import build_unet
from testkit import random_mnist

pytestmark = [pytest.mark.faults, pytest.mark.usefixtures("one_torch_thread")]

TINY = {"data": {"dataset": "mnist"}, "diffusion": {"timesteps": 20},
        "model": {"base_channels": 8, "channel_mult": [1, 2], "num_res_blocks": 1, "attention_levels": [1],
                  "num_heads": 2, "dropout": 0.0, "norm_groups": 4},
        "sampler": {"steps": 2}}


def _payload() -> dict:
    cfg = config_from_dict(TINY)
    torch.manual_seed(0)
    net = build_unet(cfg.model, image_shape(cfg))
    return {"model": net.state_dict(), "ema": net.state_dict(), "config": cfg.to_dict(), "step": 7}


def _flip_bytes(path: Path, n: int = 8) -> str:
    """Overwrite n bytes in the middle of the largest tensor's record of a torch.save zip; returns its name."""
    with zipfile.ZipFile(path) as z:
        record = max((i for i in z.infolist() if "/data/" in i.filename), key=lambda i: i.file_size)
    data = bytearray(path.read_bytes())
    name_len, extra_len = struct.unpack("<HH", data[record.header_offset + 26: record.header_offset + 30])
    start = record.header_offset + 30 + name_len + extra_len + record.file_size // 2
    data[start: start + n] = bytes(b ^ 0x7F for b in data[start: start + n])
    path.write_bytes(bytes(data))
    return record.filename


def test_flipped_bytes_in_a_checkpoint_are_refused_naming_the_file(tmp_path, capsys, monkeypatch):
    ckpt = tmp_path / "run" / "checkpoint.pt"
    save_checkpoint(ckpt, _payload())
    _flip_bytes(ckpt)
    raw = torch.load(ckpt, weights_only=True)  # PyTorch alone takes the altered weights as they are
    assert raw[CONTENT_HASH_KEY] != content_sha256(raw)
    with pytest.raises(CheckpointError, match=f"checkpoint {ckpt} is corrupt: its content does not match"):
        load_checkpoint(ckpt)

    out = tmp_path / "samples"
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # the CLI then adds no thread settings to this process
    capsys.readouterr()
    status = main(["sample", "--checkpoint", str(ckpt), "--out", str(out), "-n", "2", "--steps", "2"])
    err = capsys.readouterr().err  # ddpm.cli.main in this process: an unexpected error would raise here
    assert status == 2 and "Traceback" not in err, err[-3000:]
    [line] = [x for x in err.splitlines() if x.startswith("ddpm sample: error: ")]
    assert f"checkpoint {ckpt} is corrupt" in line
    assert not list(out.glob("samples.*"))


def test_the_content_hash_sees_every_tensor_byte_and_every_value():
    payload = _payload()
    digest = content_sha256(payload)
    assert content_sha256({**payload, CONTENT_HASH_KEY: "anything"}) == digest  # its own entry left out
    name, tensor = next(iter(payload["model"].items()))
    one_bit = tensor.clone()
    one_bit.view(-1).view(torch.int32)[0] ^= 1
    altered = [
        {**payload, "model": {**payload["model"], name: one_bit}},
        {**payload, "model": {**payload["model"], name: tensor.double()}},  # same values, another dtype
        {**payload, "model": {**payload["model"], name: tensor.reshape(-1)}},  # same bytes, another shape
        {**payload, "step": 8},
        {**payload, "config": {**payload["config"], "train": {**payload["config"]["train"], "lr": 0.5}}},
    ]
    assert all(content_sha256(p) != digest for p in altered)


def test_a_checkpoint_without_a_hash_loads_with_a_warning(tmp_path, caplog):
    old = tmp_path / "old.pt"
    payload = _payload()
    torch.save(payload, old)  # as checkpoints were written before they carried a hash
    with caplog.at_level(logging.WARNING, logger="ddpm.checkpoint"):
        model, _, ckpt = load_model(old)
    assert f"checkpoint {old} carries no content hash" in caplog.text and "cannot be checked" in caplog.text
    assert ckpt["step"] == 7 and CONTENT_HASH_KEY not in ckpt
    assert all(torch.equal(v, payload["ema"][k]) for k, v in model.state_dict().items())


def test_an_altered_reference_cache_is_recomputed_never_used(tmp_path, caplog):
    from ddpm import evaluate
    from ddpm.features import train_feature_net

    (tmp_path / "data").mkdir()
    root = random_mnist(tmp_path / "data")
    net_path = tmp_path / "features" / "mnist.pt"
    train_feature_net("mnist", root, net_path, epochs=1, batch_size=32)
    cfg = config_from_dict({"data": {"root": str(root)}, "runtime": {"device": "cpu"},
                            "evaluate": {"batch_size": 32}})
    first = evaluate.reference_stats(cfg, net_path)
    assert first.path.parent == tmp_path / "runs" / "fid_reference"

    with np.load(first.path) as z:  # poisoned: the test set's mean moved, the stored hash kept
        arrays = {k: z[k] for k in z.files}
    arrays["mu_test"] = arrays["mu_test"] + 1.0
    np.savez(first.path, **arrays)
    with np.load(first.path) as z:
        assert not np.array_equal(z["mu_test"], first.mu_test)  # numpy alone would hand it out
    with caplog.at_level(logging.WARNING, logger="ddpm.evaluate"):
        again = evaluate.reference_stats(cfg, net_path)
    assert f"reference cache {first.path} is not used: its arrays do not match the SHA-256" in caplog.text
    np.testing.assert_array_equal(again.mu_test, first.mu_test)
    np.testing.assert_array_equal(again.cov_test, first.cov_test)

    caplog.clear()  # rewritten with its hash: the next load uses it without a word
    with caplog.at_level(logging.WARNING, logger="ddpm.evaluate"):
        np.testing.assert_array_equal(evaluate.reference_stats(cfg, net_path).mu_test, first.mu_test)
    assert "reference cache" not in caplog.text

    arrays.pop(evaluate.CACHE_HASH_KEY)  # a cache without a hash (or from before caches had one)
    np.savez(first.path, **arrays)
    with caplog.at_level(logging.WARNING, logger="ddpm.evaluate"):
        np.testing.assert_array_equal(evaluate.reference_stats(cfg, net_path).mu_test, first.mu_test)
    assert "it carries no content hash" in caplog.text
