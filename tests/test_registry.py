"""From the registry to samples: `ddpm onnx-sample --model models:/<name>@<alias>` on a real sqlite MLflow
store, whose versions are registered by the export stage's own task (flows.export_tasks.log_export).

The two registered models are one-node ONNX graphs with the metadata `ddpm export` writes: eps = x and
eps = -x. Their samples differ, so comparing what a registry URI samples with what each file samples
shows which version the URI resolved to.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

pytest.importorskip("mlflow")

import mlflow  # noqa: E402
from mlflow.tracking._tracking_service.utils import _use_tracking_uri  # noqa: E402

from ddpm.cli import main  # noqa: E402
from ddpm.onnx_model import METADATA_KEY  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
NAME = "ddpm-unet-reg"
META = {"diffusion": {"timesteps": 50, "schedule": "linear", "beta_start": 1e-4, "beta_end": 0.02, "cosine_s": 0.008,
                      "prediction": "eps"}, "image_shape": [1, 28, 28], "class_conditional": False, "num_classes": 10,
        "step": 7}


def _model(path: Path, op: str) -> Path:
    """eps = op(x) for inputs x [B, 1, 28, 28] and t [B], with the ddpm metadata."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["B", 1, 28, 28])
    t = helper.make_tensor_value_info("t", TensorProto.INT64, ["B"])
    out = helper.make_tensor_value_info("eps", TensorProto.FLOAT, ["B", 1, 28, 28])
    graph = helper.make_graph([helper.make_node(op, ["x"], ["eps"])], "g", [x, t], [out])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=10)
    model.metadata_props.add(key=METADATA_KEY, value=json.dumps(META))
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))
    return path


def _register(uri: str, onnx_path: Path, alias: str) -> str:
    """Log and register as the export stage does; returns the version."""
    from mlflow.tracking import MlflowClient
    from PIL import Image

    from flows.export_tasks import log_export
    from flows.tracking import RunRef, artifact_location_for

    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("reg")
    exp_id = exp.experiment_id if exp else client.create_experiment("reg", artifact_location_for(uri))
    mlflow.set_experiment(experiment_id=exp_id)
    run = client.create_run(exp_id)
    report, png = onnx_path.parent / "export.json", onnx_path.parent / "samples.png"
    report.write_text(json.dumps({"accepted": True, "max_abs_diff": 0.0}))
    Image.new("L", (8, 8)).save(png)
    done = log_export.fn(RunRef(uri, run.info.run_id), str(onnx_path), str(report), str(png), NAME, alias, step=7)
    client.set_terminated(run.info.run_id)
    return done["version"]


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    """A project folder (params.yaml) whose default store mlflow/mlflow.db holds version 1 (eps = x, alias
    champion) and version 2 (eps = -x, alias challenger); and the two ONNX files."""
    root = tmp_path_factory.mktemp("project")
    (root / "params.yaml").write_text((REPO / "params.yaml").read_text())
    (root / "mlflow").mkdir()
    uri = f"sqlite:///{root / 'mlflow' / 'mlflow.db'}"
    files = {"1": _model(root / "m1" / "model.onnx", "Identity"), "2": _model(root / "m2" / "model.onnx", "Neg")}
    # Model logging reads the process-wide store and experiment, which flows.tracking.Tracker sets.
    with _use_tracking_uri(uri), pytest.MonkeyPatch.context() as mp:
        mp.setattr(mlflow.tracking.fluent, "_active_experiment_id", None)
        mp.setenv("MLFLOW_EXPERIMENT_ID", "0")
        assert _register(uri, files["1"], "champion") == "1"
        assert _register(uri, files["2"], "challenger") == "2"
    return root, files


@pytest.fixture
def cwd(tmp_path, monkeypatch, project):
    """A clean current directory and no MLFLOW_TRACKING_URI: the store must come from --params."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    return work


def _sample(model: str, out: Path, *extra: str) -> int:
    return main(["onnx-sample", "--model", model, "--out", str(out), "-n", "3", "--steps", "4", *extra])


def _images(out: Path) -> np.ndarray:
    return np.load(out / "samples.npz")["images"]


def test_a_registry_uri_samples_the_version_it_names_from_the_projects_store(project, cwd, capsys):
    root, files = project
    for version, path in files.items():
        assert _sample(str(path), cwd / f"file{version}") == 0
    assert not np.array_equal(_images(cwd / "file1"), _images(cwd / "file2"))
    params = str(root / "params.yaml")
    for uri, version in (("models:/ddpm-unet-reg@champion", "1"), ("models:/ddpm-unet-reg@challenger", "2"),
                         ("models:/ddpm-unet-reg/1", "1")):
        out = cwd / uri.replace("/", "_").replace(":", "").replace("@", "_")
        assert _sample(uri, out, "--params", params) == 0
        np.testing.assert_array_equal(_images(out), _images(cwd / f"file{version}"))
        said = capsys.readouterr().out
        assert f"version {version} of '{NAME}' in sqlite:///{root / 'mlflow' / 'mlflow.db'}" in said
    cached = cwd.parent / "xdg" / "ddpm" / "models" / NAME
    assert sorted(p.name for p in cached.iterdir()) == ["1", "2"]
    assert (cached / "1" / "model.onnx").read_bytes() == files["1"].read_bytes()
    # Nothing of MLflow's lands in the current directory (no stray mlflow.db or mlruns/).
    assert sorted(p.name for p in cwd.iterdir() if not p.name.startswith(("file", "models"))) == []


def test_a_cached_version_is_not_downloaded_again_unless_it_changed(project, cwd, monkeypatch):
    import mlflow.artifacts

    root, files = project
    params, uri = str(root / "params.yaml"), "models:/ddpm-unet-reg@champion"
    assert _sample(uri, cwd / "a", "--params", params) == 0
    cached = cwd.parent / "xdg" / "ddpm" / "models" / NAME / "1" / "model.onnx"
    calls = []
    real = mlflow.artifacts.download_artifacts
    monkeypatch.setattr(mlflow.artifacts, "download_artifacts", lambda **kw: calls.append(kw) or real(**kw))
    assert _sample(uri, cwd / "b", "--params", params) == 0
    assert calls == []
    cached.write_bytes(files["2"].read_bytes())  # another store's version 1: its hash is not the tag's
    assert _sample(uri, cwd / "c", "--params", params) == 0
    assert len(calls) == 1 and cached.read_bytes() == files["1"].read_bytes()
    np.testing.assert_array_equal(_images(cwd / "c"), _images(cwd / "a"))


def test_the_environment_store_wins_over_the_params_file(project, cwd, monkeypatch, tmp_path):
    root, _ = project
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{root / 'mlflow' / 'mlflow.db'}")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "params.yaml").write_text((REPO / "params.yaml").read_text())  # its own store does not exist
    assert _sample("models:/ddpm-unet-reg/2", cwd / "out", "--params", str(elsewhere / "params.yaml")) == 0
    assert not (elsewhere / "mlflow").exists()


@pytest.mark.parametrize("uri, says", [
    ("models:/ddpm-unet-reg@best", "registered model 'ddpm-unet-reg' has no alias 'best' in sqlite:///"),
    ("models:/ddpm-unet-reg/9", "registered model 'ddpm-unet-reg' has no version 9 in sqlite:///"),
    ("models:/other@champion", "has no registered model 'other' (it has: ddpm-unet-reg)"),
    ("models:/ddpm-unet-reg", "is not a registry URI; write models:/<name>@<alias>"),
])
def test_a_uri_that_names_nothing_is_one_line_and_exit_2(project, cwd, capsys, uri, says):
    root, _ = project
    store = root / "mlflow" / "mlflow.db"
    before = store.stat().st_mtime_ns
    assert _sample(uri, cwd / "out", "--params", str(root / "params.yaml")) == 2
    err = capsys.readouterr().err
    assert says in err and err.count("\n") == 1 and err.startswith("ddpm onnx-sample: error: "), err
    assert not (cwd / "out").exists() and store.stat().st_mtime_ns == before
    if uri.endswith("@best"):
        assert "(its aliases: challenger -> version 2, champion -> version 1)" in err


def test_a_missing_store_is_reported_and_not_created(cwd, capsys, tmp_path):
    fresh = tmp_path / "fresh"
    fresh.mkdir()
    (fresh / "params.yaml").write_text((REPO / "params.yaml").read_text())
    assert _sample("models:/ddpm-unet@champion", cwd / "out", "--params", str(fresh / "params.yaml")) == 2
    err = capsys.readouterr().err
    assert f"there is no MLflow store at {fresh / 'mlflow' / 'mlflow.db'}: run the pipeline" in err
    assert sorted(os.listdir(fresh)) == ["params.yaml"] and os.listdir(cwd) == []


@pytest.mark.parametrize("uri", ["./mlruns", "file:///tmp/mlruns", "mlruns"])
def test_a_folder_store_that_mlflow_would_refuse_is_one_line_and_exit_2(cwd, capsys, monkeypatch, uri):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.delenv("MLFLOW_ALLOW_FILE_STORE", raising=False)
    assert _sample("models:/ddpm-unet@champion", cwd / "out") == 2
    err = capsys.readouterr().err
    assert err.startswith(f"ddpm onnx-sample: error: the MLflow store {uri} (MLFLOW_TRACKING_URI or pipeline."), err
    assert "MLflow 3 refuses unless MLFLOW_ALLOW_FILE_STORE=true" in err and err.count("\n") == 1, err
    assert os.listdir(cwd) == []
    from flows.runtime import check_tracking_uri
    assert check_tracking_uri("databricks") is None  # a named backend, not a folder
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # the user opted in: MLflow takes it, and so do we
    assert check_tracking_uri(uri) is None


def test_ddpm_web_serves_the_registered_version_an_alias_names(project, tmp_path):
    import signal
    import subprocess
    import sys
    import urllib.request

    root, files = project
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    proc = subprocess.Popen([sys.executable, "-m", "ddpm.cli", "web", "--registered", f"{NAME}@challenger", "--params",
                             str(root / "params.yaml"), "--port", "0"], cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**env, "XDG_CACHE_HOME": str(tmp_path / "xdg")})
    try:
        resolved, serving = proc.stdout.readline(), proc.stdout.readline()
        assert f"{NAME}@challenger: version 2 of '{NAME}'" in resolved, (resolved, proc.stderr.read()[-2000:])
        url = serving.split(" at ")[1].split()[0]
        with urllib.request.urlopen(url + "model.onnx") as r:
            assert r.read() == files["2"].read_bytes()  # the alias's version, not the champion's
    finally:
        proc.send_signal(signal.SIGINT)
        proc.communicate(timeout=30)
    assert proc.returncode == 0
