"""What the integration modules share: the tiny settings, process helpers, and module-scoped fixtures (real MNIST,
a feature net on a subset, a `prefect server`, an `mlflow server`), each made once per module that asks."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest

from testkit import free_port

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
TINY = {
    "model": {"base_channels": 8, "channel_mult": [1, 2], "attention_levels": [1], "num_res_blocks": 1,
              "num_heads": 2, "norm_groups": 4, "dropout": 0.0},
    "diffusion": {"timesteps": 50},
    "train": {"steps": 12, "batch_size": 8, "log_every": 4, "checkpoint_every": 4, "warmup_steps": 2,
              "sample_every": 0},
    "runtime": {"device": "cpu"},
    "sampler": {"steps": 5},
    "sample": {"num_images": 16, "batch_size": 16},
    "evaluate": {"num_samples": 48, "batch_size": 48, "feature_epochs": 1, "feature_batch_size": 64},
    "export": {"check_samples": 8},
}
TINY_OVERRIDES = [f"{s}.{k}={json.dumps(v)}" for s, values in TINY.items() for k, v in values.items()]
FEATURE_SUBSET = {"train": 2000, "test": 500}


def wait_http(url: str, proc: subprocess.Popen, log: Path, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"{proc.args} exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    pytest.fail(f"{url} did not answer within {timeout:.0f} s:\n{log.read_text()[-3000:]}")


def start(cmd: list[str], log: Path, env: dict[str, str], cwd: Path = REPO) -> subprocess.Popen:
    return subprocess.Popen(cmd, cwd=cwd, env=env, stdout=open(log, "w"), stderr=subprocess.STDOUT,
                            start_new_session=True)


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, 15)  # our own process group (start_new_session): the server and its workers
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, 9)
            proc.wait()


def base_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "MLFLOW_"))}
    env.update(PATH=f"{BIN}{os.pathsep}{env.get('PATH', '')}", MLFLOW_DISABLE_TELEMETRY="true", DO_NOT_TRACK="1",
               PREFECT_SERVER_ANALYTICS_ENABLED="false", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    env.update(extra)
    return env


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# --- shared inputs ---------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def mnist_root(tmp_path_factory) -> Path:
    from ddpm.data import fetch_dataset, verify_dataset

    try:
        verify_dataset("mnist", REPO / "data")
        return REPO / "data"
    except Exception:  # noqa: BLE001 - not there or not verified: fetch a copy for this session
        root = tmp_path_factory.mktemp("data")
        try:
            fetch_dataset("mnist", root)
        except Exception as exc:  # noqa: BLE001
            pytest.skip(f"no MNIST: data/mnist does not verify and fetching failed ({exc})")
        return root


@pytest.fixture(scope="module")
def feature_net(mnist_root, tmp_path_factory) -> Path:
    """The feature net (on a subset, to be quick) and its cached reference statistics, made once."""
    import torch

    import ddpm.data
    import ddpm.features
    from ddpm.config import load_config
    from ddpm.evaluate import reference_stats
    from flows import tasks

    load = ddpm.data.load_images

    def subset(name, root, split="train"):
        x, y = load(name, root, split)
        n = FEATURE_SUBSET[split]
        return x[:n], y[:n]

    path = tmp_path_factory.mktemp("features") / "mnist.pt"
    cfg = load_config(REPO / "params.yaml", None, [*TINY_OVERRIDES, f"data.root={mnist_root}"])
    ev = cfg.evaluate
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(ddpm.data, "load_images", subset)
        mp.setattr(ddpm.features, "load_images", subset)
        tasks.ensure_feature_net.fn("mnist", str(mnist_root), str(path), ev.feature_epochs, ev.feature_batch_size,
                                    ev.feature_lr, ev.seed, "cpu")
        reference_stats(cfg, path, torch.device("cpu"))
    torch.set_num_threads(threads)
    return path


@pytest.fixture(scope="module")
def prefect_server(tmp_path_factory):
    home = tmp_path_factory.mktemp("prefect-home")
    port = free_port()
    api = f"http://127.0.0.1:{port}/api"
    log = home / "server.log"
    proc = start([str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port), "--no-ui"],
                 log, base_env(PREFECT_HOME=str(home)))
    try:
        wait_http(f"{api}/health", proc, log, 180)
        yield api, home
    finally:
        stop(proc)


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    root = tmp_path_factory.mktemp("mlflow-server")
    port = free_port()
    log = root / "server.log"
    proc = start([str(BIN / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
                  "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}",
                  "--artifacts-destination", str(root / "artifacts")], log, base_env())
    try:
        wait_http(f"http://127.0.0.1:{port}/health", proc, log, 120)
        yield f"http://127.0.0.1:{port}"
    finally:
        stop(proc)
