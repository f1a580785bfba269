"""A run folder is owned and never lost by accident (issue 28): a second process on a held folder, stale
locks, reruns without --resume, resumes with changed settings, start-up crashes, symlinked log files,
and numbers written as 1e-3.

Each case runs `ddpm train` (or evaluate, export) on a tiny synthetic dataset and compares the folder's
files, byte for byte, with what was there before: as a subprocess where a second process, a memory limit
or a log line on stderr is part of the case, else through `ddpm.cli.main` in this process (a refusal
that stops before any work: the same error line and exit status, without an interpreter start-up).
"""

import hashlib
import json
import os
import resource
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from ddpm.checkpoint import load_checkpoint
from ddpm.cli import main
from ddpm.config import ConfigError, load_config
from ddpm.run_folder import LOCK_NAME, LossLog, owned
from testkit import random_mnist

pytestmark = pytest.mark.faults

STEPS = 4


@pytest.fixture(scope="module")
def data_root(tmp_path_factory) -> Path:
    return random_mnist(tmp_path_factory.mktemp("data"))


def _args(data_root: Path, out_dir: Path, *extra: str) -> list[str]:
    return ["--params", "params.yaml", "--profile", "cpu", f"data.root={data_root}", f"train.out_dir={out_dir}",
            f"train.steps={STEPS}", "train.batch_size=4", "train.lr=0.001", "train.log_every=1",
            "train.checkpoint_every=2", "train.warmup_steps=2", "diffusion.timesteps=20", "model.base_channels=8",
            "model.channel_mult=[1,2]", "model.attention_levels=[1]", "model.num_heads=2", "model.norm_groups=4",
            "sampler.steps=2", *extra]


# The CLI; with HOLD_FILE set, the third training step waits while that file exists, so that the
# test decides when a run that holds its folder may finish.
CHILD = """
import os, sys, time
import ddpm.train_step as tr
hold = os.environ.get("HOLD_FILE")
if hold:
    real, calls = tr.p_losses, [0]
    def held(*args, **kwargs):
        calls[0] += 1
        while calls[0] == 3 and os.path.exists(hold):
            time.sleep(0.05)
        return real(*args, **kwargs)
    tr.p_losses = held
from ddpm.cli import main
sys.exit(main(sys.argv[1:]))
"""


def _start(args: list[str], memory_limit: int | None = None, **env: str) -> subprocess.Popen:
    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (memory_limit, memory_limit))
    return subprocess.Popen([sys.executable, "-c", CHILD, *args], env={**os.environ, "OMP_NUM_THREADS": "1", **env},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=limit if memory_limit else None)


def _ddpm(*args: str, **kw) -> subprocess.CompletedProcess:
    p = _start(list(args), **kw)
    out, err = p.communicate(timeout=300)
    return subprocess.CompletedProcess(p.args, p.returncode, out, err)


@pytest.fixture
def ddpm_here(capsys, monkeypatch):
    """`ddpm ARGS` through ddpm.cli.main in this process, as a CompletedProcess (status, stdout, stderr)."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # as the subprocesses have it; the CLI then adds nothing

    def call(*args: str) -> subprocess.CompletedProcess:
        capsys.readouterr()
        status = main(list(args))
        out, err = capsys.readouterr()
        return subprocess.CompletedProcess(["ddpm", *args], status, out, err)
    return call


def _error_line(result: subprocess.CompletedProcess, command: str = "train") -> str:
    """The one-line error of an expected failure: exit status 2, no traceback."""
    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    lines = [line for line in result.stderr.splitlines() if line.startswith(f"ddpm {command}: error: ")]
    assert len(lines) == 1, result.stderr[-3000:]
    return lines[0]


def _snapshot(folder: Path) -> dict[str, str]:
    """Every entry under `folder`, hidden ones included: a file's SHA-256, a link's target, or "folder"."""
    def entry(p: Path) -> str:
        if p.is_symlink():
            return f"-> {os.readlink(p)}"
        return hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "folder"
    return {str(p.relative_to(folder)): entry(p) for p in sorted(folder.rglob("*"))}


def _rows(out: Path) -> list[int]:
    return [int(line.split(",")[0]) for line in (out / "loss.csv").read_text().splitlines()[1:]]


@pytest.fixture(scope="module")
def finished(data_root, tmp_path_factory) -> Path:
    """A finished 4-step run; tests copy it."""
    out = tmp_path_factory.mktemp("finished") / "run"
    result = _ddpm("train", *_args(data_root, out))
    assert result.returncode == 0, result.stderr[-3000:]
    return out


@pytest.fixture
def run(finished, tmp_path) -> Path:
    out = tmp_path / "ref"
    shutil.copytree(finished, out)
    return out


def test_a_second_train_on_a_held_folder_fails_at_once_naming_the_holder(data_root, tmp_path, ddpm_here):
    out, hold = tmp_path / "run", tmp_path / "hold"
    hold.touch()
    first = _start(["train", *_args(data_root, out)], HOLD_FILE=str(hold))
    deadline = time.time() + 120
    while time.time() < deadline and first.poll() is None and not (out / "checkpoint.pt").is_file():
        time.sleep(0.05)  # the step-2 checkpoint is written: the run waits in step 3
    assert first.poll() is None, first.communicate()[1][-3000:]
    before = _snapshot(out)
    started = time.perf_counter()
    second = ddpm_here("train", *_args(data_root, out, "train.steps=2"))
    line = _error_line(second)
    assert f"{out} is in use by ddpm train (pid {first.pid} on host {socket.gethostname()}" in line
    assert time.perf_counter() - started < 60  # at once: no training, no wait for the holder
    assert _snapshot(out) == before
    hold.unlink()
    _, err = first.communicate(timeout=300)
    assert first.returncode == 0, err[-3000:]
    assert load_checkpoint(out / "checkpoint.pt")["step"] == STEPS
    assert _rows(out) == list(range(1, STEPS + 1))
    assert not (out / LOCK_NAME).exists()


def test_a_stale_lock_is_taken_over_with_a_warning(data_root, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    dead = subprocess.Popen(["true"])
    dead.wait()
    (out / LOCK_NAME).write_text(json.dumps({"command": "ddpm train", "pid": dead.pid, "host": socket.gethostname(),
                                             "started": "2020-01-01T00:00:00+00:00"}))
    result = _ddpm("train", *_args(data_root, out))
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"took over a stale lock of ddpm train (pid {dead.pid} on host" in result.stderr
    assert "is no longer running" in result.stderr
    assert load_checkpoint(out / "checkpoint.pt")["step"] == STEPS and not (out / LOCK_NAME).exists()


def test_evaluate_and_export_fail_at_once_on_a_held_folder(run, tmp_path):
    target = tmp_path / "held"
    with owned(target, "ddpm train"):
        before = _snapshot(target)
        export = _ddpm("export", "--checkpoint", str(run / "checkpoint.pt"), "--out", str(target / "model.onnx"))
        evaluate = _ddpm("evaluate", "--checkpoint", str(run / "checkpoint.pt"), "--out", str(target),
                         "evaluate.num_samples=8", "sampler.steps=2")
        for result, command in ((export, "export"), (evaluate, "evaluate")):
            assert f"{target} is in use by ddpm train (pid {os.getpid()} on host" in _error_line(result, command)
        assert _snapshot(target) == before


def test_train_over_a_run_needs_resume_or_overwrite(data_root, run, ddpm_here):
    before = _snapshot(run)
    line = _error_line(ddpm_here("train", *_args(data_root, run, "train.steps=2")))
    assert f"{run} already holds a run (checkpoint.pt)" in line and "--resume" in line and "--overwrite" in line
    assert _snapshot(run) == before

    # what later stages made from the old checkpoint goes with it; the records of settings, data and feature net
    # and the compile cache, which do not depend on the checkpoint, stay
    made = ("trajectory.png", "eval/metrics.json", "eval/samples.png", "model.onnx", "model.onnx.data",
            "model.int8.onnx", "export.json", "samples_onnx/samples.png", "aot_package.json", "distill/student.pt",
            "distill.json")
    kept = ("compile_cache/key.bin", "feature_net.json", "dataset.json", "resolved_params.yaml")
    for name in made + kept:
        (run / name).parent.mkdir(parents=True, exist_ok=True)
        (run / name).write_text(name)
    before = _snapshot(run)
    with owned(run / "eval", "ddpm evaluate"):  # an evaluation still writing there: nothing moves
        held = _ddpm("train", *_args(data_root, run, "train.steps=2", "--overwrite"))
        assert f"{run / 'eval'} is in use by ddpm evaluate (pid {os.getpid()}" in _error_line(held)
    assert _snapshot(run) == before and not list(run.parent.glob(f"{run.name}.replaced-*"))
    result = _ddpm("train", *_args(data_root, run, "train.steps=2", "--overwrite"))
    assert result.returncode == 0, result.stderr[-3000:]
    [aside] = run.parent.glob(f"{run.name}.replaced-*")
    assert f"--overwrite moved its files to {aside}" in result.stderr
    stays = {name.split("/")[0] for name in kept}
    assert _snapshot(aside) == {k: v for k, v in before.items() if k.split("/")[0] not in stays}  # the old run
    assert load_checkpoint(run / "checkpoint.pt")["step"] == 2 and _rows(run) == [1, 2]
    assert all((run / name).read_text() == name for name in kept) and not [n for n in made if (run / n).exists()]


@pytest.mark.parametrize("flag", ["--resume", "--overwrite"])
def test_a_start_up_crash_leaves_the_folder_as_it_was(data_root, run, flag):
    """train.batch_size=1e9 passes the config's checks and is refused before allocation: one batch needs more
    than the 4 GiB address space this process may use (ddpm.resources)."""
    before = _snapshot(run)
    result = _ddpm("train", *_args(data_root, run, "train.steps=6", "train.batch_size=1000000000", flag),
                   memory_limit=4 << 30)
    line = _error_line(result)
    assert "train.batch_size=1000000000 with model.base_channels=8 needs at least" in line and "is free" in line
    assert _snapshot(run) == before  # loss.csv, config.yaml and the checkpoint as they were
    assert not list(run.parent.glob(f"{run.name}.replaced-*"))


@pytest.mark.parametrize("change, key", [
    ("diffusion.timesteps=10", "diffusion.timesteps 20 -> 10"),
    ("model.base_channels=16", "model.base_channels 8 -> 16"),
    ("data.dataset=fashion_mnist", "data.dataset 'mnist' -> 'fashion_mnist'"),
    ("train.steps=2", "train.steps=2 is below its checkpoint's step 4"),
])
def test_resume_refuses_settings_that_change_what_was_trained(data_root, run, change, key, ddpm_here):
    before = _snapshot(run)
    line = _error_line(ddpm_here("train", *_args(data_root, run, "train.steps=6", change, "--resume")))
    assert line.startswith(f"ddpm train: error: cannot resume {run}: ") and key in line
    assert _snapshot(run) == before


def test_resume_with_allowed_changes_logs_and_records_them(data_root, run):
    result = _ddpm("train", *_args(data_root, run, "train.steps=6", "train.lr=5e-4", "--resume"))
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"resuming {run} with changed settings: " in result.stderr
    assert "train.steps 4 -> 6" in result.stderr and "train.lr 0.001 -> 0.0005" in result.stderr
    assert yaml.safe_load((run / "config.yaml").read_text())["train"]["lr"] == 0.0005
    ckpt = load_checkpoint(run / "checkpoint.pt")
    assert ckpt["step"] == 6 and ckpt["config"]["train"]["lr"] == 0.0005
    assert _rows(run) == list(range(1, 7))


def test_loss_csv_and_config_yaml_are_never_written_through_a_symlink(data_root, tmp_path):
    out, victims = tmp_path / "run", {"loss.csv": tmp_path / "precious.csv", "config.yaml": tmp_path / "precious.yaml"}
    out.mkdir()
    for name, victim in victims.items():
        victim.write_text(f"not yours: {name}\n")
        (out / name).symlink_to(victim)
    result = _ddpm("train", *_args(data_root, out))
    assert result.returncode == 0, result.stderr[-3000:]
    for name, victim in victims.items():
        assert victim.read_text() == f"not yours: {name}\n"
        assert not (out / name).is_symlink() and (out / name).is_file()
        assert f"{out / name} was a symbolic link to {victim}, which is left as it was" in result.stderr
    assert _rows(out) == list(range(1, STEPS + 1))


def test_loss_log_keeps_complete_rows_up_to_the_resumed_step(tmp_path):
    path = tmp_path / "loss.csv"
    path.write_text("step,loss,lr,images_per_sec\r\n1,0.5,0.1,9\r\n2,0.4,0.1,9\r\n3,0.3,0.1,9\r\n4,0.2,0.1,9\r\n4")
    log = LossLog(path, ("step", "loss", "lr", "images_per_sec"), keep_until=3)
    log.write({"step": 4, "loss": 0.25, "lr": 0.1, "images_per_sec": 8})
    log.close()
    assert path.read_text().splitlines() == ["step,loss,lr,images_per_sec", "1,0.5,0.1,9", "2,0.4,0.1,9",
                                             "3,0.3,0.1,9", "4,0.25,0.1,8"]
    victim = tmp_path / "victim.csv"
    victim.write_bytes(path.read_bytes())
    path.unlink()
    path.symlink_to(victim)
    LossLog(path, ("step", "loss", "lr", "images_per_sec"), keep_until=3).close()
    assert victim.read_text().count("\n") == 5 and not path.is_symlink()  # the target untouched


def test_numbers_written_with_an_exponent_are_floats(tmp_path):
    params = tmp_path / "params.yaml"
    params.write_text("train:\n  lr: 1e-3\n  weight_decay: 2E-2\n  out_dir: 1e-3\n")
    assert yaml.safe_load(params.read_text())["train"]["lr"] == "1e-3"  # what YAML 1.1 makes of it
    cfg = load_config(params)
    assert cfg.train.lr == 0.001 and cfg.train.weight_decay == 0.02 and cfg.train.out_dir == "1e-3"
    assert load_config(None, None, ["train.lr=5e-4", "diffusion.beta_end=+2e-2"]).train.lr == 0.0005
    for bad in ("train.lr=1e-3x", "train.lr=nan", "train.steps=1e3", "train.lr=1e999"):
        with pytest.raises(ConfigError, match=bad.split("=")[0]):
            load_config(None, None, [bad])
