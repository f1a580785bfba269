"""Real DVC in a temporary copy of the repository, with the real MNIST files and a tiny config:

* `dvc repro` runs every stage, a second `dvc repro` runs none, `dvc exp run -S evaluate.nearest_k=2`
  reruns only settings, distill, evaluate and export, and `dvc exp show --only-changed` then has a few columns;
* a `dvc repro` whose export check fails keeps the stages before it in dvc.lock, and once the fault
  is undone the next `dvc repro` runs distill (which reads the same setting) and export (marked `faults` too).

The stages log to a real `prefect server` on loopback and use the shipped pinned feature net, which the
features stage only verifies. MNIST as in tests/test_integration.py. Set DDPM_SKIP_INTEGRATION=1 to skip
this module.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from integration_kit import (  # noqa: F401 - fixtures, requested by name
    BIN, REPO, TINY, base_env, mnist_root, prefect_server, sha256)

pytestmark = [pytest.mark.integration, pytest.mark.slow,
              pytest.mark.skipif(os.environ.get("DDPM_SKIP_INTEGRATION") == "1", reason="DDPM_SKIP_INTEGRATION=1")]


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


def dvc_labels(env: dict[str, str]) -> list[tuple[str, str, str, str | None]]:
    """(stage, MLflow run name, tag dvc.stage, tag dvc.experiment) of every stage run, oldest first."""
    from mlflow.tracking import MlflowClient

    c = MlflowClient(env["MLFLOW_TRACKING_URI"])
    runs = c.search_runs([c.get_experiment_by_name("ddpm").experiment_id], order_by=["attributes.start_time ASC"])
    tags = [r.data.tags for r in runs]
    return [(t["ddpm.stage"], r.info.run_name, t.get("dvc.stage"), t.get("dvc.experiment")) for r, t in zip(runs, tags)]


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
    # each run says which DVC stage made it; `dvc repro` is no experiment
    assert all((name, dvc_stage, exp) == (stage, stage, None) for stage, name, dvc_stage, exp in dvc_labels(env))
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


def test_evaluating_again_with_the_same_results_leaves_the_export_current(dvc_repo, first_repro):
    """The sampling time is in eval/timings.json, not in the metrics.json the export stage reads."""
    repo, env = dvc_repo
    metrics = (repo / "runs" / "default" / "eval" / "metrics.json").read_bytes()
    timings = (repo / "runs" / "default" / "eval" / "timings.json").read_bytes()
    proc = dvc(repo, env, "repro", "--force", "--single-item", "evaluate")
    assert re.findall(r"Running stage '(\w+)'", proc.stdout) == ["evaluate"], proc.stdout
    assert (repo / "runs" / "default" / "eval" / "metrics.json").read_bytes() == metrics
    assert (repo / "runs" / "default" / "eval" / "timings.json").read_bytes() != timings  # it did sample again
    assert json.loads(dvc(repo, env, "status", "--json").stdout) == {}  # the export, too, is current
    subprocess.run(["git", "commit", "-q", "-m", "evaluate again", "dvc.lock"], cwd=repo, env=env, check=True)


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
    # the experiment's runs carry its name, as `dvc exp show` lists it: in the tag and in the MLflow UI's run list
    name = re.search(r"Ran experiment\(s\): (\S+)", proc.stdout).group(1)
    new = sorted(dvc_labels(env)[len(runs_before):])
    assert new == [(stage, f"{stage} ({name})", stage, name) for stage in ("distill", "evaluate", "export")], new
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
    assert len(shown) <= 10, shown  # the above, coverage and density
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
