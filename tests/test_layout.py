"""The run layout: every path of a run named once (ddpm.layout.RunLayout), and dvc.yaml naming the same files.

The expected names are the ones users, DVC caches and earlier runs know (README, flows/README.md), written
out here as literals, so that renaming a file in the layout fails this test instead of orphaning old runs.
"""

from __future__ import annotations

from pathlib import Path

import yaml

from ddpm.layout import EvalFiles, RunLayout, SampleFiles

REPO = Path(__file__).resolve().parents[1]


def test_run_layout_names_every_file_of_a_run():
    run = RunLayout("runs/x")
    assert isinstance(run.out_dir, Path) and run == RunLayout(Path("runs/x"))
    named = {
        run.checkpoint: "runs/x/checkpoint.pt", run.loss_csv: "runs/x/loss.csv",
        run.config_yaml: "runs/x/config.yaml", run.preview(1200): "runs/x/samples_0001200.png",
        run.samples_final: "runs/x/samples_final.png", run.trajectory: "runs/x/trajectory.png",
        run.resolved_params: "runs/x/resolved_params.yaml", run.dataset_manifest: "runs/x/dataset.json",
        run.feature_net_record: "runs/x/feature_net.json", run.eval.metrics: "runs/x/eval/metrics.json",
        run.eval.timings: "runs/x/eval/timings.json",
        run.eval.samples: "runs/x/eval/samples.png", run.eval.nearest: "runs/x/eval/nearest.png",
        run.onnx_model: "runs/x/model.onnx", run.export_report: "runs/x/export.json",
        run.export_int8_report: "runs/x/export_int8.json", run.onnx_samples.grid: "runs/x/samples_onnx/samples.png",
        run.stamp("evaluate"): "runs/x/.stamps/evaluate.json", run.unended_runs: "runs/x/.mlflow-unended.json",
    }
    assert {str(path): want for path, want in named.items()} == {want: want for want in named.values()}
    assert (EvalFiles("e").metrics, SampleFiles("s").array) == (Path("e/metrics.json"), Path("s/samples.npz"))


def test_training_files_are_what_ddpm_train_writes_and_nothing_else(tmp_path):
    run = RunLayout(tmp_path)
    assert run.training_files() == []
    for name in ("checkpoint.pt", "loss.csv", "config.yaml", "samples_0000010.png", "samples_final.png",
                 "model.onnx", "export.json", "trajectory.png"):
        (tmp_path / name).write_text("x")
    (tmp_path / "eval").mkdir()
    (tmp_path / "eval" / "metrics.json").write_text("{}")
    assert [p.name for p in run.training_files()] == [
        "checkpoint.pt", "loss.csv", "config.yaml", "samples_0000010.png", "samples_final.png"]


def _paths(entries: list) -> list[str]:
    """The paths of a dvc.yaml list (deps, outs, metrics, plots, params files): a string, or a one-key mapping."""
    return [e if isinstance(e, str) else next(iter(e)) for e in entries or []]


def test_dvc_yaml_paths_are_the_run_layout_for_the_default_params():
    dvc = yaml.safe_load((REPO / "dvc.yaml").read_text())
    out_dir = yaml.safe_load((REPO / "params.yaml").read_text())["train"]["out_dir"]
    run = RunLayout(out_dir)
    want = {
        "settings": {"outs": [run.resolved_params]},
        "data": {"outs": [run.dataset_manifest]},
        "features": {"deps": [run.dataset_manifest], "outs": [run.feature_net_record]},
        "train": {"deps": [run.dataset_manifest], "outs": [run.checkpoint, run.samples_final, run.trajectory,
                                                              run.compile_cache],
                  "plots": [run.loss_csv]},
        "evaluate": {"deps": [run.checkpoint, run.feature_net_record], "outs": [run.eval.samples, run.eval.nearest,
                                                                                   run.eval.timings],
                     "metrics": [run.eval.metrics]},
        "distill": {"deps": [run.checkpoint, run.feature_net_record], "outs": [run.distill_dir],
                    "metrics": [run.distill_record]},
        "export": {"deps": [run.checkpoint, run.feature_net_record, run.eval.metrics, run.distill_record],
                   "outs": [run.onnx_model, run.onnx_samples.grid, run.aot_report], "metrics": [run.export_report]},
    }
    assert set(dvc["stages"]) == set(want)
    for name, stage in dvc["stages"].items():
        for kind in ("deps", "outs", "metrics", "plots"):
            in_run = [p.replace("${train.out_dir}", out_dir) for p in _paths(stage.get(kind))
                      if p.startswith("${train.out_dir}/")]
            assert in_run == [str(p) for p in want[name].get(kind, [])], (name, kind)
            assert not [p for p in _paths(stage.get(kind)) if p.startswith(f"{out_dir}/")], (name, kind)  # templated
        param_files = {p.replace("${train.out_dir}", out_dir) for p in _paths(stage.get("params")) if "/" in p}
        assert param_files <= {str(run.resolved_params)}, name
    plots = [p.replace("${train.out_dir}", out_dir) for p in _paths(dvc["plots"])]
    assert plots == [str(run.samples_final), str(run.trajectory), str(run.onnx_samples.grid)]
