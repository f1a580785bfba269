"""Fault injection on real `python -m flows.pipeline` processes: SIGTERM during training and outside the
training loop, and the MLflow tracking server SIGKILLed while training runs.

Each case runs the pipeline's `main` in a subprocess (only the dataset fetch is replaced, since its
SHA-256 pins are those of the real MNIST files) on a small MNIST look-alike and a tiny model, with a
temporary Prefect API (PREFECT_HOME in a temporary folder, shared by the module). Afterwards it
checks the files on disk, the MLflow runs (through MlflowClient) and the Prefect flow-run states
(read from the temporary API's database, since that API stops with the process). The cases of one
fault share their runs, in order: the faulted run, then a rerun that must resume and finish.
"""

from __future__ import annotations

import csv
import json
import os
import re
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from ddpm.checkpoint import load_checkpoint
from testkit import fake_mnist, free_port

pytestmark = [pytest.mark.faults, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
TINY = [
    "model.base_channels=8", "model.channel_mult=[1,2]", "model.attention_levels=[1]", "model.num_res_blocks=1",
    "model.num_heads=2", "model.norm_groups=4", "model.dropout=0.0", "diffusion.timesteps=50",
    "train.batch_size=8", "train.log_every=1", "train.warmup_steps=2", "train.sample_every=0", "runtime.device=cpu",
    "sampler.steps=5", "sample.num_images=16", "sample.batch_size=16", "evaluate.num_samples=48",
    "evaluate.batch_size=48", "evaluate.feature_epochs=1", "evaluate.feature_batch_size=64",
    "export.check_samples=8", "pipeline.registered_model=ddpm-unet-faults",
]
FOREVER = 100_000  # train.steps of a run that only a fault ends
STEPS = 60  # train.steps of the runs whose tracking server is killed

# `python -m flows.pipeline`, with the fetch of the look-alike files accepted as it is.
CHILD = """
import sys
from pathlib import Path
import ddpm.data
ddpm.data.fetch_dataset = lambda name, root, sources=None: Path(root) / name
from flows.pipeline import main
sys.exit(main(sys.argv[1:]))
"""


# --- the project, the processes ---------------------------------------------------------------------

@pytest.fixture(scope="module")
def shared(tmp_path_factory) -> dict[str, Path]:
    """The look-alike dataset (class k: a bright bar at a k-dependent place), the feature net's path and
    the temporary Prefect API's home, shared by every run of the module."""
    root = tmp_path_factory.mktemp("shared")
    fake_mnist(root / "data", n_train=384, n_test=128)
    (root / "prefect").mkdir()
    return {"data": root / "data", "feature_net": root / "features" / "mnist.pt", "prefect_home": root / "prefect"}


def make_project(root: Path, shared: dict[str, Path], experiment: str) -> list[str]:
    """A project folder with params.yaml; returns the pipeline's arguments for it."""
    root.mkdir()
    shutil.copy(REPO / "params.yaml", root / "params.yaml")
    return ["--params", str(root / "params.yaml"), "--profile", "cpu", *TINY, f"data.root={shared['data']}",
            f"pipeline.feature_net={shared['feature_net']}", f"pipeline.experiment={experiment}"]


def start(args: list[str], log: Path, shared: dict[str, Path], tracking_uri: str) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "MLFLOW_"))}
    env.update(PREFECT_HOME=str(shared["prefect_home"]), PREFECT_SERVER_EPHEMERAL_ENABLED="true",
               MLFLOW_TRACKING_URI=tracking_uri, MLFLOW_DISABLE_TELEMETRY="true", DO_NOT_TRACK="1",
               PREFECT_SERVER_ANALYTICS_ENABLED="false", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    with open(log, "w") as f:
        return subprocess.Popen([sys.executable, "-c", CHILD, *args], cwd=REPO, env=env, stdout=f,
                                stderr=subprocess.STDOUT)


def finish(proc: subprocess.Popen, log: Path, timeout: float = 240) -> str:
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        pytest.fail(f"the pipeline did not exit within {timeout:.0f} s:\n{log.read_text()[-4000:]}")
    return log.read_text()


def wait_for(what: str, ready, proc: subprocess.Popen, log: Path, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while not ready():
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"never saw {what} (exit status {proc.wait()}):\n{log.read_text()[-4000:]}")
        time.sleep(0.05)


def loss_rows(out: Path) -> list[dict[str, str]]:
    path = out / "loss.csv"
    if not path.is_file():
        return []
    with open(path, newline="") as f:
        return [row for row in csv.DictReader(f) if row.get("images_per_sec")]  # not a half-written last line


def last_line(output: str) -> str:
    return [line for line in output.splitlines() if line.strip() and "Stopping temporary server" not in line][-1]


def runs_between(uri: str, experiment: str, started: float, ended: float = float("inf")) -> dict[str, object]:
    """The MLflow runs of one attempt (started within [started, ended), in seconds since the epoch), by stage."""
    from mlflow.tracking import MlflowClient

    c = MlflowClient(uri)
    exp = c.get_experiment_by_name(experiment)
    runs = [r for r in c.search_runs([exp.experiment_id]) if started * 1000 <= r.info.start_time < ended * 1000]
    stages = [r.data.tags["ddpm.stage"] for r in runs]
    assert len(set(stages)) == len(stages), stages  # one attempt: one run per stage
    return dict(zip(stages, runs))


def loss_history(uri: str, run) -> list[tuple[int, float]]:
    from mlflow.tracking import MlflowClient

    return sorted((m.step, m.value) for m in MlflowClient(uri).get_metric_history(run.info.run_id, "loss"))


def prefect_state(shared: dict[str, Path], run) -> str:
    """The state type of the Prefect flow run that an MLflow run was logged from."""
    with sqlite3.connect(shared["prefect_home"] / "prefect.db") as db:
        (state,) = db.execute("SELECT state_type FROM flow_run WHERE id = ?",
                              (run.data.tags["prefect.flow_run_id"],)).fetchone()
    return state


# --- SIGTERM --------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def sigterm(shared, tmp_path_factory) -> dict:
    """A pipeline run whose training would go on for ever, sent SIGTERM once it logs its third step.
    Checkpoints are written only at the end of train.steps, so any checkpoint comes from the signal."""
    root = tmp_path_factory.mktemp("sigterm") / "project"
    args = make_project(root, shared, "faults-sigterm")
    uri = f"sqlite:///{root.parent / 'mlflow.db'}"
    out, log = root / "runs" / "default", root.parent / "first.log"
    started = time.time()
    proc = start([*args, f"train.steps={FOREVER}", f"train.checkpoint_every={FOREVER}"], log, shared, uri)
    wait_for("three training steps", lambda: len(loss_rows(out)) >= 3, proc, log)
    rows_seen = len(loss_rows(out))
    proc.send_signal(signal.SIGTERM)
    signalled = time.monotonic()
    output = finish(proc, log)
    return {"args": args, "uri": uri, "out": out, "root": root, "started": started, "rows_seen": rows_seen,
            "status": proc.returncode, "output": output, "seconds": time.monotonic() - signalled}


def test_sigterm_during_training_saves_the_last_step_and_ends_the_runs_killed(sigterm, shared):
    out, output = sigterm["out"], sigterm["output"]
    assert sigterm["status"] == 2, output[-4000:]
    assert sigterm["seconds"] < 30  # a step, a checkpoint, and ending the runs
    ckpt = load_checkpoint(out / "checkpoint.pt")
    step = int(ckpt["step"])
    rows = loss_rows(out)
    assert step >= sigterm["rows_seen"] and step == int(rows[-1]["step"])  # the last finished step
    assert [int(r["step"]) for r in rows] == list(range(1, step + 1))
    assert not list(out.glob(".checkpoint.pt.tmp-*"))
    line = last_line(output)
    assert line.startswith(f"flows.pipeline: error: stopped by SIGTERM at step {step}; checkpoint saved"), line
    assert "rerun without --force" in line and "--resume" not in line  # flows.pipeline has no --resume

    runs = runs_between(sigterm["uri"], "faults-sigterm", sigterm["started"])
    assert set(runs) == {"pipeline", "data", "train"}
    assert runs["data"].info.status == "FINISHED"
    for stage in ("train", "pipeline"):
        assert runs[stage].info.status == "KILLED", stage
        assert runs[stage].data.tags["error"].startswith(f"TrainingInterrupted: stopped by SIGTERM at step {step}")
    assert [s for s, _ in loss_history(sigterm["uri"], runs["train"])] == list(range(1, step + 1))  # sent live
    assert prefect_state(shared, runs["pipeline"]) == "FAILED"
    assert prefect_state(shared, runs["train"]) == "FAILED"


@pytest.fixture(scope="module")
def resumed(sigterm, shared) -> dict:
    """The same command, run again after the SIGTERM with train.steps set 4 past the checkpoint."""
    step = int(load_checkpoint(sigterm["out"] / "checkpoint.pt")["step"])
    log = sigterm["root"].parent / "rerun.log"
    started = time.time()
    proc = start([*sigterm["args"], f"train.steps={step + 4}", "train.checkpoint_every=2"], log, shared,
                 sigterm["uri"])
    output = finish(proc, log)
    return {"interrupted_at": step, "status": proc.returncode, "output": output, "started": started,
            "seconds": time.time() - started}


def test_rerun_after_sigterm_resumes_from_the_checkpoint_and_finishes(sigterm, resumed, shared):
    out, output, step = sigterm["out"], resumed["output"], resumed["interrupted_at"]
    assert resumed["status"] == 0, output[-4000:]
    assert f"resumed from {out / 'checkpoint.pt'} at step {step}" in output
    assert "ddpm-pipeline finished: step" in output
    assert int(load_checkpoint(out / "checkpoint.pt")["step"]) == step + 4
    rows = loss_rows(out)
    assert [int(r["step"]) for r in rows] == list(range(1, step + 5))  # the interrupted run's rows, then 4 new
    runs = runs_between(sigterm["uri"], "faults-sigterm", resumed["started"])
    assert set(runs) == {"pipeline", "data", "train", "distill", "evaluate", "export"}
    assert all(r.info.status == "FINISHED" for r in runs.values())
    assert loss_history(sigterm["uri"], runs["train"]) == [(int(r["step"]), float(r["loss"])) for r in rows]
    assert prefect_state(shared, runs["pipeline"]) == "COMPLETED"


def test_sigterm_outside_the_training_loop_ends_the_runs_killed_and_the_process_cleanly(sigterm, resumed, shared):
    """SIGTERM during the export stage: Prefect raises it in the flow; the runs must still end KILLED and
    the process must exit through its shutdown (status 143), stopping the temporary Prefect API."""
    step = resumed["interrupted_at"] + 4
    log = sigterm["root"].parent / "export.log"
    started = time.time()
    # A changed export setting makes the export stale; data, train and evaluate are current.
    proc = start([*sigterm["args"], f"train.steps={step}", "export.parity_atol=0.0002"], log, shared, sigterm["uri"])
    in_export = re.compile(r"for flow 'ddpm-export'.*Task run 'feature-net", re.S)  # its MLflow run exists
    wait_for("the export stage", lambda: in_export.search(log.read_text()), proc, log)
    proc.send_signal(signal.SIGTERM)
    output = finish(proc, log, timeout=60)
    assert proc.returncode == 128 + signal.SIGTERM, output[-4000:]
    assert last_line(output) == ("flows.pipeline: stopped by SIGTERM; what finished is kept, and a rerun without "
                                 "--force resumes from it")
    runs = runs_between(sigterm["uri"], "faults-sigterm", started)
    assert {s: r.info.status for s, r in runs.items()} == {
        "pipeline": "KILLED", "data": "FINISHED", "train": "FINISHED", "distill": "FINISHED",  # off in the cpu profile
        "evaluate": "FINISHED", "export": "KILLED"}
    # Prefect's TerminationSignal; or, when the signal lands in the first import of a C extension (onnx),
    # what that import made of it: "stopped by SIGTERM, which surfaced as ImportError: ..."
    assert "stopped by SIGTERM" in runs["export"].data.tags["error"]
    assert prefect_state(shared, runs["pipeline"]) in ("CRASHED", "FAILED")
    assert prefect_state(shared, runs["export"]) in ("CRASHED", "FAILED")
    port = int(re.search(r"Starting temporary server on http://127\.0\.0\.1:(\d+)", output).group(1))
    with pytest.raises(OSError):  # the temporary Prefect API stopped with the process
        socket.create_connection(("127.0.0.1", port), timeout=2).close()


# --- the MLflow tracking server dies ------------------------------------------------------------------------

def start_mlflow_server(store: Path, port: int) -> subprocess.Popen:
    log = store / f"server-{time.monotonic_ns()}.log"
    with open(log, "w") as f:
        proc = subprocess.Popen(
            [str(BIN / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
             "--backend-store-uri", f"sqlite:///{store / 'mlflow.db'}", "--artifacts-destination",
             str(store / "artifacts")],
            env={**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true"}, stdout=f, stderr=subprocess.STDOUT,
            start_new_session=True)  # its own process group: the server and its workers die together
    deadline = time.monotonic() + 120
    while True:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as r:
                if r.status == 200:
                    return proc
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                kill_group(proc)
                pytest.fail(f"mlflow server did not start:\n{log.read_text()[-3000:]}")
            time.sleep(0.3)


def kill_group(proc: subprocess.Popen, sig: int = signal.SIGKILL) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, sig)
        proc.wait()



@pytest.fixture(scope="module")
def server_killed(shared, tmp_path_factory) -> dict:
    """A pipeline logging to a real `mlflow server`; the server gets SIGKILL after 10 training steps."""
    root = tmp_path_factory.mktemp("server") / "project"
    args = make_project(root, shared, "faults-server")
    store, port = root.parent / "store", free_port()
    store.mkdir()
    uri = f"http://127.0.0.1:{port}"
    out, log = root / "runs" / "default", root.parent / "first.log"
    server = start_mlflow_server(store, port)
    started = time.time()
    try:
        proc = start([*args, f"train.steps={STEPS}", "train.checkpoint_every=10"], log, shared, uri)
        wait_for("ten training steps", lambda: len(loss_rows(out)) >= 10, proc, log)
    finally:
        kill_group(server)
    rows_seen = len(loss_rows(out))
    output = finish(proc, log)
    exited = time.time()
    return {"args": args, "uri": uri, "out": out, "root": root, "store": store, "port": port, "started": started,
            "rows_seen": rows_seen, "status": proc.returncode, "output": output,
            "after_training": exited - (out / "checkpoint.pt").stat().st_mtime}


@pytest.mark.integration
def test_tracking_server_killed_mid_training_keeps_every_step_and_fails_clearly(server_killed):
    """Decided behaviour (flows/tracking.py): training does not stop for the tracking server. It runs to
    train.steps, writing checkpoints and loss.csv; the stage fails at its end, when its record cannot be
    sent, with an error that names the server and says what to do, in seconds rather than after minutes of
    retries; the runs that could not be ended are listed on disk for the next run."""
    out, output = server_killed["out"], server_killed["output"]
    assert server_killed["status"] == 2, output[-4000:]
    assert server_killed["after_training"] < 20, output[-4000:]
    ckpt = load_checkpoint(out / "checkpoint.pt")
    assert ckpt["step"] == STEPS >= server_killed["rows_seen"]
    assert [int(r["step"]) for r in loss_rows(out)] == list(range(1, STEPS + 1))
    assert "MLflow logging failed at step" in output and "training goes on" in output
    line = last_line(output)
    assert line.startswith(f"flows.pipeline: error: the MLflow tracking server at {server_killed['uri']} stopped "
                           f"answering ("), line
    assert f"What finished is on disk in {out}" in line and "Start the server again" in line
    unended = json.loads((out / ".mlflow-unended.json").read_text())
    assert sorted(r["status"] for r in unended) == ["FAILED", "FAILED"]


@pytest.fixture(scope="module")
def server_back(server_killed, shared):
    """The server restarted on the same port and backend store (it serves until the module ends), and the
    same command run again."""
    server = start_mlflow_server(server_killed["store"], server_killed["port"])
    try:
        log = server_killed["root"].parent / "rerun.log"
        started = time.time()
        proc = start([*server_killed["args"], f"train.steps={STEPS}", "train.checkpoint_every=10"], log, shared,
                     server_killed["uri"])
        output = finish(proc, log)
        yield {"status": proc.returncode, "output": output, "started": started}
    finally:
        kill_group(server, signal.SIGTERM)


@pytest.mark.integration
def test_after_the_server_returns_a_rerun_ends_the_stale_runs_and_sends_the_whole_curve(server_killed, server_back,
                                                                                        shared):
    out, uri, output = server_killed["out"], server_killed["uri"], server_back["output"]
    assert server_back["status"] == 0, output[-4000:]
    assert f"{out / 'checkpoint.pt'} is already at step {STEPS}; training skipped" in output  # not from step 0
    assert not (out / ".mlflow-unended.json").exists()
    first = runs_between(uri, "faults-server", server_killed["started"], server_back["started"])
    assert set(first) == {"pipeline", "data", "train"}
    for stage in ("train", "pipeline"):  # ended by the rerun, with the error that stopped them
        assert first[stage].info.status == "FAILED", stage
        assert "stopped answering" in first[stage].data.tags["error"]
    assert prefect_state(shared, first["pipeline"]) == "FAILED"
    rerun = runs_between(uri, "faults-server", server_back["started"])
    assert set(rerun) == {"pipeline", "data", "train", "distill", "evaluate", "export"}
    assert all(r.info.status == "FINISHED" for r in rerun.values())
    assert rerun["train"].data.tags["train.skipped"] == "true"
    rows = [(int(r["step"]), float(r["loss"])) for r in loss_rows(out)]
    assert loss_history(uri, rerun["train"]) == rows  # every step, none dropped
    live = loss_history(uri, first["train"])  # what reached the server before it died
    assert 1 <= len(live) < STEPS and live == rows[:len(live)]
