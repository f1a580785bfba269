"""`ddpm-pipeline`: data -> train -> distill -> evaluate (with the feature net) -> export, as one Prefect flow.

    python -m flows.pipeline                      # params.yaml with its default profile (cpu)
    python -m flows.pipeline --profile auto       # gpu-fast where torch sees a CUDA device, else the default
    python -m flows.pipeline --profile gpu train.steps=40000
    python -m flows.pipeline --force              # redo every stage instead of resuming

Each stage is a subflow (flows.stages) and gets an MLflow run nested under this flow's run. A rerun
after a failure resumes: the dataset is kept once verified, training continues from its
checkpoint, and evaluation and export are skipped when their outputs are current.
Without PREFECT_API_URL the flow runs on Prefect's temporary local API.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from prefect import flow
from prefect.runtime import flow_run

from flows import artifacts, stages
from flows.observe import bridge_library_logs, echoed_to, log_failure
from flows.runtime import load_settings
from flows.tracking import Tracker


@flow(name="ddpm-pipeline", on_failure=[log_failure])
def ddpm_pipeline(profile: str | None = None, overrides: list[str] | None = None, params_path: str = "params.yaml",
                  force: bool = False) -> dict[str, Any]:
    """Run every stage under one MLflow parent run; returns where the results are.

    profile: a profile of the params file (None: its `profile:` key); overrides: `section.key=value`
    strings applied last; force: redo stages whose outputs are current.
    """
    bridge_library_logs()
    s = load_settings(params_path, profile, overrides)
    tracker = Tracker(s)
    with echoed_to(flow_run.id), \
            tracker.run(flow_run.name or "ddpm-pipeline", tags={"ddpm.stage": "pipeline"}) as parent:
        common = dict(params_path=str(s.params_path), profile=s.profile, overrides=list(s.overrides),
                      parent_run_id=parent.run_id, force=force)
        stages.data_flow(**common)
        trained = stages.train_flow(**common)
        distilled = stages.distill_flow(**common)
        metrics = stages.evaluate_flow(**common)
        exported = stages.export_flow(**common)
        parent.logger().metrics({"train_loss": trained["loss"], "images_per_sec": trained["images_per_sec"],
                                 **metrics}, trained["step"])
    result = {
        "tracking_uri": tracker.uri, "experiment_id": tracker.experiment_id, "run_id": parent.run_id,
        "checkpoint": trained["checkpoint"], "step": trained["step"], "samples": trained["samples"],
        "trajectory": trained["trajectory"], "metrics": metrics, "eval_samples": str(s.layout.eval.samples),
        **{k: exported[k] for k in (
            "onnx_model", "onnx_samples", "model_uri", "registered_model", "version", "alias", "champion_alias",
            "promoted", "already_champion")},
        "distilled": distilled,
    }
    from prefect.artifacts import create_markdown_artifact

    create_markdown_artifact(markdown=f"```\n{summary(result).strip()}\n```", key="pipeline-summary",
                             description=f"ddpm-pipeline: step {result['step']}")
    return result


AUTO, GPU_PROFILE = "auto", "gpu-fast"


def pick_profile(profile: str | None) -> tuple[str | None, str]:
    """`auto` -> gpu-fast where torch sees a CUDA device, else None (the params file's default); any other
    value is kept. Returns the profile and a line that says which one and why."""
    if profile != AUTO:
        return profile, f"profile: {profile or 'the params file default'} (as asked)"
    import torch

    if torch.cuda.is_available():
        return GPU_PROFILE, (f"profile: {GPU_PROFILE}, picked because torch sees {torch.cuda.get_device_name()}; "
                             f"PROFILE=cpu forces the CPU")
    return None, "profile: the params file default (cpu), picked because torch sees no CUDA device"


def summary(result: dict[str, Any]) -> str:
    uri = result["tracking_uri"]
    m = result["metrics"]
    quality = (f", FID {m['fid']:.1f} ({m['fid'] / m['fid_floor']:.1f}x the floor {m['fid_floor']:.1f} at "
               f"{int(m['num_samples']) if 'num_samples' in m else '?'} samples)"
               if m.get("fid") and m.get("fid_floor") else "")
    if m.get("confident_fraction") is not None:
        quality += (f", {m['confident_fraction']:.0%} of samples recognised by the feature net "
                    f"(real images: {m.get('confident_fraction_real', float('nan')):.0%})")
    lines = [
        "",
        f"ddpm-pipeline finished: step {result['step']}{quality}",
        f"  evaluation samples     {result['eval_samples']}",
        f"  samples (PyTorch)      {result['samples']}",
        f"  samples (onnxruntime)  {result['onnx_samples']}",
        f"  denoising trajectory   {result['trajectory']}",
        f"  checkpoint             {result['checkpoint']}",
        f"  ONNX model             {result['onnx_model']}",
        f"  registered model       models:/{result['registered_model']}@{result['alias']} "
        f"(version {result['version']}); @{result['champion_alias']} {artifacts.champion_outcome(result)}",
        *_student_lines(result.get("distilled") or {}),
        f"  MLflow run             {result['run_id']} (experiment {result['experiment_id']}) in {uri}",
        f"  MLflow UI              {ui_hint(uri, result['experiment_id'], result['run_id'])}",
        f"  sample again           ddpm onnx-sample --model {result['onnx_model']} --out samples_onnx",
    ]
    return "\n".join(lines)


def ui_hint(uri: str, experiment_id: str, run_id: str) -> str:
    """How to see the run in the MLflow UI: the command that serves a local store, then the run's page.

    MLflow's UI opens an experiment in its GenAI view (traces, judges, prompts: all empty here) unless the
    address asks for the model-training one, which shows the runs table, the charts and the comparisons."""
    web = uri.rstrip("/") if uri.startswith(("http://", "https://")) else "http://127.0.0.1:5000"
    page = f"{web}/#/experiments/{experiment_id}/runs/{run_id}?workflowType=machine_learning"
    return page if web == uri.rstrip("/") else f"mlflow ui --backend-store-uri {uri}   then {page}"


def _student_lines(distilled: dict[str, Any]) -> list[str]:
    if not distilled.get("enabled"):
        return ["  distilled student      none (distill.enabled is false)"]
    n = distilled["steps"]
    return [f"  distilled student      {distilled['student']} ({n} DDIM steps, FID {distilled[f'fid_{n}_steps']:.1f})",
            f"  registered student     models:/{distilled['registered_model']}@{distilled['alias']} "
            f"(version {distilled['version']})"]


def _main(argv: list[str] | None) -> int:
    parser = argparse.ArgumentParser(prog="python -m flows.pipeline", description="Run the whole DDPM pipeline.")
    stages.add_settings_arguments(parser)
    parser.add_argument("--force", action="store_true", help="redo stages whose outputs are current")
    args = parser.parse_args(argv)
    args.profile, said = pick_profile(args.profile)
    print(said, flush=True)
    settings = stages.preflight(args.params, args.profile, args.overrides)
    result = ddpm_pipeline(profile=args.profile, overrides=args.overrides, params_path=str(settings.params_path),
                           force=args.force)
    print(summary(result))
    return 0


def main(argv: list[str] | None = None) -> int:
    return stages.run_cli(_main, argv, "flows.pipeline")


if __name__ == "__main__":
    sys.exit(main())
