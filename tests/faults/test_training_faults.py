"""Fault injection on real training processes: SIGKILL at random points, SIGTERM, kills inside a checkpoint write.

Each case runs `ddpm train` as a subprocess on a tiny synthetic dataset (IDX files written here) and
checks what is on disk afterwards. Run alone with `pytest -m faults`.
"""

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from ddpm.checkpoint import load_checkpoint
from testkit import random_mnist

pytestmark = pytest.mark.faults

STEPS = 12
KILL_POINTS = 4


@pytest.fixture(scope="module")
def data_root(tmp_path_factory) -> Path:
    return random_mnist(tmp_path_factory.mktemp("data"))


def _args(data_root: Path, out_dir: Path) -> list[str]:
    return ["--params", "params.yaml", "--profile", "cpu", f"data.root={data_root}", f"train.out_dir={out_dir}",
            f"train.steps={STEPS}", "train.batch_size=4", "train.log_every=1", "train.checkpoint_every=2",
            "train.warmup_steps=2", "diffusion.timesteps=20", "model.base_channels=8", "model.channel_mult=[1,2]",
            "model.attention_levels=[1]", "model.num_heads=2", "model.norm_groups=4", "model.dropout=0.1",
            "sampler.steps=2",
            "train.lr_decay=none"]  # a constant rate: some cases resume with other train.steps


# A child that runs the CLI; with SLOW_WRITE set it pauses half-way through every checkpoint write,
# after the temporary file has been partly written, so that the test can kill it there.
CHILD = """
import os, sys, time
import ddpm.checkpoint as ck
if os.environ.get("SLOW_WRITE"):
    real = ck.atomic_write_bytes
    def slow(path, data):
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        tmp.write_bytes(data[: len(data) // 2])
        time.sleep(30)
        real(path, data)
    ck.atomic_write_bytes = slow
from ddpm.cli import main
sys.exit(main(["train", *sys.argv[1:]]))
"""


def _start(args: list[str], **env: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", CHILD, *args], env={**os.environ, "OMP_NUM_THREADS": "1", **env},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _run(args: list[str]) -> subprocess.CompletedProcess:
    p = _start(args)
    out, err = p.communicate(timeout=300)
    assert p.returncode == 0, err[-2000:]
    return subprocess.CompletedProcess(p.args, p.returncode, out, err)


def _weights(out_dir: Path) -> dict[str, torch.Tensor]:
    ckpt = load_checkpoint(out_dir / "checkpoint.pt")
    assert ckpt["step"] == STEPS
    return {**{f"model.{k}": v for k, v in ckpt["model"].items()}, **{f"ema.{k}": v for k, v in ckpt["ema"].items()}}


def _wait_for_rows(out_dir: Path, rows: int, proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    log = out_dir / "loss.csv"
    while time.time() < deadline and proc.poll() is None:
        if log.exists() and len(log.read_text().splitlines()) > rows:
            return
        time.sleep(0.02)


@pytest.fixture(scope="module")
def reference(data_root, tmp_path_factory) -> dict[str, torch.Tensor]:
    out = tmp_path_factory.mktemp("straight")
    _run(_args(data_root, out))
    return _weights(out)


def test_sigkill_at_random_points_then_resume_equals_uninterrupted(data_root, tmp_path, reference):
    rng = random.Random(1234)
    out = tmp_path / "killed"
    kills = 0
    for _ in range(KILL_POINTS):
        p = _start([*_args(data_root, out), "--resume"])
        _wait_for_rows(out, rng.randint(1, STEPS - 1), p)
        if p.poll() is None:
            p.send_signal(signal.SIGKILL)
            kills += 1
        p.communicate()
        # Whatever the kill interrupted, what is on disk must load or be absent; no temp file is ever trusted.
        if (out / "checkpoint.pt").exists():
            load_checkpoint(out / "checkpoint.pt")
    assert kills >= KILL_POINTS - 1
    _run([*_args(data_root, out), "--resume"])
    got = _weights(out)
    for name, tensor in reference.items():
        assert torch.equal(tensor, got[name]), name


def test_sigkill_during_a_checkpoint_write_keeps_the_previous_checkpoint(data_root, tmp_path, reference):
    out = tmp_path / "midwrite"
    _run([a if not a.startswith("train.steps=") else "train.steps=4" for a in _args(data_root, out)])
    before = (out / "checkpoint.pt").read_bytes()
    p = _start([*_args(data_root, out), "--resume"], SLOW_WRITE="1")
    deadline = time.time() + 120
    while time.time() < deadline and not list(out.glob(".checkpoint.pt.tmp-*")):
        time.sleep(0.02)
    assert list(out.glob(".checkpoint.pt.tmp-*")), "the child never started a checkpoint write"
    p.send_signal(signal.SIGKILL)
    p.communicate()
    assert (out / "checkpoint.pt").read_bytes() == before
    assert load_checkpoint(out / "checkpoint.pt")["step"] == 4
    _run([*_args(data_root, out), "--resume"])  # the stale temp file is ignored and the run completes
    got = _weights(out)
    for name, tensor in reference.items():
        assert torch.equal(tensor, got[name]), name


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_sigterm_and_sigint_save_a_checkpoint_and_exit_non_zero(data_root, tmp_path, sig):
    out = tmp_path / "term"
    args = [a if not a.startswith("train.steps=") else "train.steps=100000" for a in _args(data_root, out)]
    args = [a if not a.startswith("train.checkpoint_every=") else "train.checkpoint_every=100000" for a in args]
    p = _start(args)
    _wait_for_rows(out, 3, p)
    p.send_signal(sig)
    _, err = p.communicate(timeout=120)
    assert p.returncode == 2, err[-2000:]
    assert f"stopped by {sig.name}" in err and "--resume" in err
    ckpt = load_checkpoint(out / "checkpoint.pt")
    assert ckpt["step"] >= 3
    assert not list(out.glob(".checkpoint.pt.tmp-*"))
