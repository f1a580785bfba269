"""Limits of the machine met during a run, and runs killed between two writes; the flows report expected
failures as the `ddpm` command does (ddpm.errors.user_error).

Memory that runs out during training (MemoryError, PyTorch's OutOfMemoryError), a file-size limit
(EFBIG) while the checkpoint is saved, a loss that diverges before the first checkpoint, SIGTERM
between the files of an evaluation, an export killed with its temporary folder, and an MLflow
sqlite store that cannot be written. Each expected failure is one line with exit status 2, and
what is on disk afterwards is checked: the last checkpoint, no temporary files, no mixed sets.
"""

from __future__ import annotations

import json
import os
import resource
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import ddpm.train_step as step_mod
from ddpm import cli
from ddpm.checkpoint import load_checkpoint, save_checkpoint
from ddpm.config import ExportConfig, config_from_dict, image_shape
from ddpm.unet import build_unet
from testkit import random_mnist

pytestmark = [pytest.mark.faults, pytest.mark.usefixtures("one_torch_thread")]

ROOT = Path(__file__).resolve().parents[2]
TINY = ["--params", "params.yaml", "--profile", "cpu", "train.batch_size=4", "train.lr=0.001", "train.log_every=1",
        "train.checkpoint_every=2", "train.warmup_steps=2", "diffusion.timesteps=20", "model.base_channels=8",
        "model.channel_mult=[1,2]", "model.attention_levels=[1]", "model.num_heads=2", "model.norm_groups=4",
        "sampler.steps=2"]

# The CLI, with FAULT=sigterm: the evaluation is sent SIGTERM right after it wrote samples.png.
CHILD = """
import os, signal, sys, time
import ddpm.evaluate as ev
fault = os.environ.get("FAULT")
real_grid = ev.save_grid
def save_grid(images, path, nrow=None):
    out = real_grid(images, path, nrow)
    if fault == "sigterm" and path.name == "samples.png":
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(30)
    return out
ev.save_grid = save_grid
from ddpm.cli import main
sys.exit(main(sys.argv[1:]))
"""


def _ddpm(*args: str, file_size_limit: int | None = None, **env: str) -> subprocess.CompletedProcess:
    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (file_size_limit, file_size_limit))
    return subprocess.run([sys.executable, "-c", CHILD, *args], cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1", **env},
                          preexec_fn=limit if file_size_limit else None)


def _error_line(result: subprocess.CompletedProcess, prog: str = "ddpm train") -> str:
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-3000:]
    lines = [line for line in result.stderr.splitlines() if line.startswith(f"{prog}: error: ")]
    assert len(lines) == 1, result.stderr[-3000:]
    return lines[0]


@pytest.fixture(scope="module")
def data_root(tmp_path_factory) -> Path:
    return random_mnist(tmp_path_factory.mktemp("data"))


@pytest.mark.parametrize("error, says", [
    (MemoryError(), "out of memory (MemoryError)"),
    (torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB"),
     "out of memory (CUDA out of memory. Tried to allocate 20.00 GiB)")], ids=["memory", "oom"])
def test_memory_that_runs_out_while_training_is_one_line_and_keeps_the_checkpoint(data_root, tmp_path, monkeypatch,
                                                                                  capsys, error, says):
    """The 3rd loss computation raises; `ddpm train` runs in this process (ddpm.cli.main), as the NaN case below."""
    real, calls = step_mod.p_losses, []

    def p_losses(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise error
        return real(*args, **kwargs)
    monkeypatch.setattr(step_mod, "p_losses", p_losses)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # as the subprocesses have it; the CLI then adds nothing
    out = tmp_path / "run"
    status = cli.main(["train", *TINY, f"data.root={data_root}", f"train.out_dir={out}", "train.steps=4"])
    line = _error_line(subprocess.CompletedProcess("ddpm train", status, *capsys.readouterr()))
    assert says in line and "lower the batch size (train.batch_size" in line
    ckpt = load_checkpoint(out / "checkpoint.pt")  # the step-2 checkpoint, its content hash intact
    assert ckpt["step"] == 2 and all(torch.isfinite(v).all() for v in ckpt["ema"].values())
    assert not (out / ".ddpm.lock").exists()


def test_a_file_size_limit_while_saving_the_checkpoint_names_the_file(data_root, tmp_path):
    out = tmp_path / "run"
    line = _error_line(_ddpm("train", *TINY, f"data.root={data_root}", f"train.out_dir={out}", "train.steps=4",
                             file_size_limit=256 << 10))
    assert f"[Errno 27] File too large: '{out / 'checkpoint.pt'}'" in line and "ulimit -f" in line
    assert not (out / "checkpoint.pt").exists()
    assert sorted(p.name for p in out.iterdir()) == ["config.yaml", "loss.csv"]  # no temporary file left


def test_a_loss_that_diverges_before_any_checkpoint_does_not_claim_one(data_root, tmp_path, monkeypatch, capsys):
    real = step_mod.p_losses
    monkeypatch.setattr(step_mod, "p_losses", lambda *a, **k: real(*a, **k) * float("nan"))
    out = tmp_path / "run"
    assert cli.main(["train", *TINY, f"data.root={data_root}", f"train.out_dir={out}", "train.steps=4"]) == 2
    [line] = [x for x in capsys.readouterr().err.splitlines() if x.startswith("ddpm train: error: ")]
    assert "loss became non-finite at step 1; no checkpoint was written before it (the first is due at step 2)" in line
    assert "was kept" not in line and not (out / "checkpoint.pt").exists()


def _checkpoint(path: Path) -> Path:
    cfg = config_from_dict({"diffusion": {"timesteps": 20}, "sampler": {"steps": 2},
                            "model": {"base_channels": 8, "channel_mult": [1, 2], "num_res_blocks": 1,
                                      "attention_levels": [1], "num_heads": 2, "dropout": 0.0, "norm_groups": 4}})
    torch.manual_seed(0)
    net = build_unet(cfg.model, image_shape(cfg))
    save_checkpoint(path, {"model": net.state_dict(), "ema": net.state_dict(), "config": cfg.to_dict(), "step": 4})
    return path


def test_sigterm_between_the_files_of_an_evaluation_leaves_no_old_metrics_beside_new_samples(data_root, tmp_path):
    out = tmp_path / "eval"
    out.mkdir()
    (out / "samples.png").write_bytes(b"the old grid")
    (out / "metrics.json").write_text(json.dumps({"fid": 1.0}))
    result = _ddpm("evaluate", "--checkpoint", str(_checkpoint(tmp_path / "checkpoint.pt")), "--out", str(out),
                   f"data.root={data_root}", "evaluate.num_samples=8", "evaluate.batch_size=8",
                   "sampler.steps=2", "runtime.device=cpu", FAULT="sigterm")
    assert result.returncode == -signal.SIGTERM, result.stderr[-3000:]
    assert (out / "samples.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"  # the new grid was written
    assert not (out / "metrics.json").exists()  # and the old scores went before it

    result = _ddpm("evaluate", "--checkpoint", str(tmp_path / "checkpoint.pt"), "--out", str(out),
                   f"data.root={data_root}", "evaluate.num_samples=8", "evaluate.batch_size=8",
                   "sampler.steps=2", "runtime.device=cpu")
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads((out / "metrics.json").read_text())["num_samples"] == 8


def test_a_killed_exports_temporary_folder_is_removed_at_the_next_export(tmp_path, monkeypatch, caplog):
    import ddpm.export as export

    out = tmp_path / "exported" / "model.onnx"
    stale = out.parent / ".model.onnx.tmp-k1ll3d"  # as tempfile names them; a killed export leaves it
    (stale / "sub").mkdir(parents=True)
    (stale / "model.onnx").write_bytes(b"\0" * 4096)
    other = out.parent / ".other.onnx.tmp-k1ll3d"  # another export's name: not this export's to remove
    other.mkdir()

    class Stop(Exception):
        pass

    def stop(*args, **kwargs):
        raise Stop
    monkeypatch.setattr(export, "_to_onnx", stop)  # the export stops right after taking its folder
    with caplog.at_level("WARNING", logger="ddpm.export"), pytest.raises(Stop):
        export.export_onnx(_checkpoint(tmp_path / "checkpoint.pt"), out, ExportConfig())
    assert f"removing {stale}, left by an export that was killed" in caplog.text
    assert sorted(p.name for p in out.parent.iterdir()) == [".other.onnx.tmp-k1ll3d"]


def test_an_mlflow_store_that_cannot_be_written_fails_at_once_in_one_line(tmp_path):
    db = Path("/proc/self/mlflow.db")  # a folder that takes no new file, even for root
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    result = subprocess.run([sys.executable, "-m", "flows.pipeline", "--params", "params.yaml",
                             f"pipeline.tracking_uri=sqlite:///{db}", f"train.out_dir={tmp_path / 'run'}"],
                            cwd=ROOT, capture_output=True, text=True, timeout=300, env={**env, "OMP_NUM_THREADS": "1"})
    line = _error_line(result, "flows.pipeline")
    assert f"the MLflow store {db} cannot be written" in line and "MLFLOW_TRACKING_URI" in line
    assert "mlflow" not in result.stderr.replace(line, "").lower()  # refused before MLflow was asked anything
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("error, says", [
    (MemoryError(), "out of memory (MemoryError); lower the batch size"),
    (OSError(27, "File too large", "/runs/x/checkpoint.pt"),
     "[Errno 27] File too large: '/runs/x/checkpoint.pt'; the file size limit (ulimit -f)"),
    (OSError(28, "No space left on device", "/runs/x/model.onnx"), "No space left on device: '/runs/x/model.onnx'"),
])
def test_the_flows_report_expected_failures_as_the_ddpm_command_does(capsys, error, says):
    from ddpm.errors import user_error
    from flows.stages import run_cli

    def main(argv):
        raise error
    assert run_cli(main, [], "flows.pipeline") == 2
    err = capsys.readouterr().err
    assert err == f"flows.pipeline: error: {user_error(error)}\n" and says in err


def test_a_bug_keeps_its_traceback_in_the_flows():
    from flows.stages import run_cli

    def main(argv):
        raise KeyError("a bug")
    with pytest.raises(KeyError, match="a bug"):
        run_cli(main, [], "flows.pipeline")
