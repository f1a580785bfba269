"""One Prefect flow per stage, and the command DVC runs for each: `python -m flows.stages <stage>`.

Every stage flow takes the same parameters: where the settings come from (params_path, profile,
overrides), the MLflow run to nest under (parent_run_id; none: the stage gets a top-level run)
and `force`. Each reloads and validates the settings itself, so a stage runs the same alone, under
`ddpm-pipeline`, or from DVC. They return file paths and numbers only.

    data      fetch and verify the dataset, write dataset.json
    features  verify the shipped, pinned feature network that FID uses (or train one when asked:
              pipeline.feature_net=retrain), and record which one in feature_net.json
    train     train the U-Net (resuming), render the denoising trajectory
    distill   with distill.enabled: progressive distillation into a few-step student, each round's FID,
              the student's ONNX export, checked and registered under pipeline.student_alias
    evaluate  the feature net (reused when current), then sample and score the checkpoint
    export    ONNX export with parity check, onnxruntime-vs-PyTorch check, onnxruntime samples,
              log the model and register it under an alias when accepted, log the sampling page with it
"""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
from pathlib import Path
from typing import Any

from prefect import flow

from ddpm.layout import RunLayout
from flows import artifacts, distill_tasks, export_tasks, tasks, tracking
from flows.observe import StageProgress, bridge_library_logs, log_failure
from flows.runtime import Settings, check_device, check_prefect_api, check_tracking_uri, is_user_error, load_settings
from flows.tracking import Tracker, sigterm_count, tracking_uri_for

log = logging.getLogger(__name__)


def _open(params_path: str, profile: str | None, overrides: list[str] | None) -> tuple[Settings, Tracker]:
    bridge_library_logs()
    settings = load_settings(params_path, profile, overrides)
    return settings, Tracker(settings)


@flow(name="ddpm-data", on_failure=[log_failure])
def data_flow(params_path: str = "params.yaml", profile: str | None = None, overrides: list[str] | None = None,
              parent_run_id: str | None = None, force: bool = False) -> str:
    """Fetch (with retries on network errors) and verify the dataset; returns dataset.json's path."""
    s, tracker = _open(params_path, profile, overrides)
    with tracker.stage("data", parent_run_id) as run:
        tasks.fetch_data(s.cfg.data.dataset, s.cfg.data.root)
        manifest = tasks.describe_dataset(s.cfg.data.dataset, s.cfg.data.root, str(s.layout.dataset_manifest),
                                          str(s.project))
        tasks.log_data(run, manifest)
    return manifest


def _feature_net(s: Settings, force: bool) -> dict[str, Any]:
    ev = s.cfg.evaluate
    return tasks.ensure_feature_net(s.cfg.data.dataset, s.cfg.data.root, str(s.feature_net), ev.feature_epochs,
                                    ev.feature_batch_size, ev.feature_lr, ev.feature_seed, s.cfg.runtime.device,
                                    force)


@flow(name="ddpm-features", on_failure=[log_failure])
def features_flow(params_path: str = "params.yaml", profile: str | None = None, overrides: list[str] | None = None,
                  parent_run_id: str | None = None, force: bool = False) -> str:
    """Verify the pinned feature net for FID, or (pipeline.feature_net=retrain) train one or reuse it when
    current; record which in feature_net.json; returns its path. force never retrains a pinned net."""
    s, tracker = _open(params_path, profile, overrides)
    with tracker.stage("features", parent_run_id) as run:
        info = _feature_net(s, force)
        tasks.record_feature_net(info, str(s.layout.feature_net_record), str(s.project))
        tasks.log_feature_net(run, info)
    return info["path"]


@flow(name="ddpm-train", on_failure=[log_failure])
def train_flow(params_path: str = "params.yaml", profile: str | None = None, overrides: list[str] | None = None,
               parent_run_id: str | None = None, force: bool = False) -> dict[str, Any]:
    """Train (resuming from a compatible checkpoint), render the trajectory, log; returns the checkpoint and step."""
    s, tracker = _open(params_path, profile, overrides)
    run_files = s.layout
    samples, trajectory = str(run_files.samples_final), str(run_files.trajectory)
    with tracker.stage("train", parent_run_id) as run, StageProgress("train") as progress:
        if s.cfg.train.compile:  # a fresh machine: the compile work earlier runs logged (flows/README.md)
            tasks.fetch_compile_caches(run, str(run_files.compile_cache))
        result = tasks.train_model(s.cfg, run, force)
        progress("rendering the denoising trajectory")
        tasks.render_trajectory(result["checkpoint"], s.cfg, trajectory, s.cfg.pipeline.trajectory_images)
        progress("logging to MLflow")
        tasks.log_training(run, result, str(run_files.loss_csv), samples, trajectory, s.cfg.pipeline.log_checkpoint)
        artifacts.publish("train", f"ddpm-train: step {result['step']}", artifacts.train_summary(
            result, progress.seconds), tasks.last_loss_row(run_files.loss_csv),
            {"samples": samples, "trajectory": trajectory})
    return {"checkpoint": result["checkpoint"], "step": result["step"], "loss": result["loss"],
            "images_per_sec": result["images_per_sec"], "samples": samples, "trajectory": trajectory,
            "run_id": run.run_id}


@flow(name="ddpm-distill", on_failure=[log_failure])
def distill_flow(params_path: str = "params.yaml", profile: str | None = None, overrides: list[str] | None = None,
                 parent_run_id: str | None = None, force: bool = False) -> dict[str, Any]:
    """With distill.enabled: distil the checkpoint round by round, score each round's student, export the final
    student, check it against PyTorch and register it under pipeline.student_alias. Writes distill.json
    (which says whether the stage was on) either way; returns it."""
    s, tracker = _open(params_path, profile, overrides)
    with tracker.stage("distill", parent_run_id) as run, StageProgress("distill") as progress:
        run.logger().tags({"distill.enabled": str(s.cfg.distill.enabled).lower()})
        s.layout.distill_dir.mkdir(parents=True, exist_ok=True)
        if not s.cfg.distill.enabled:
            log.info("distill.enabled is false (set it, or use a gpu profile, to distil the model)")
            return _distill_record(s, {"enabled": False})
        info = _feature_net(s, force=False)
        result = distill_tasks.distill_model(s.cfg, str(s.layout.checkpoint), run, force)
        progress("scoring each round's student")
        fids = {r["steps"]: tasks.evaluate_model(r["checkpoint"], distill_tasks.student_config(s.cfg, r["steps"]),
                                                 str(RunLayout(Path(r["checkpoint"]).parent).eval.folder), info["path"],
                                                 force)["metrics"] for r in result["rounds"]}
        from ddpm.distill import round_spans

        numbers = distill_tasks.log_distillation(run, result, fids, round_spans(s.cfg))
        progress("exporting the student")
        scfg = distill_tasks.student_config(s.cfg, s.cfg.distill.steps)
        report = str(s.layout.student_export_report)
        onnx_path = export_tasks.export_model(str(s.layout.student), scfg, str(s.layout.student_onnx), info["path"],
                                              (report, None), force)
        samples = export_tasks.sample_onnx(onnx_path, scfg, str(s.layout.student_onnx_samples.grid))
        pc = s.cfg.pipeline
        registered = export_tasks.log_export(run, onnx_path, report, samples,
                                             pc.registered_model, pc.student_alias, _step(str(s.layout.student)))
    return _distill_record(s, {"enabled": True, "steps": s.cfg.distill.steps, "student": str(s.layout.student),
                               "onnx_model": onnx_path, **numbers,
                               **{k: registered[k] for k in ("registered_model", "version", "alias")}})


def _distill_record(s: Settings, record: dict[str, Any]) -> dict[str, Any]:
    tracking.write_json(s.layout.distill_record, record)
    return record


def _step(checkpoint: str) -> int:
    from ddpm.checkpoint import load_checkpoint

    return int(load_checkpoint(checkpoint)["step"])


@flow(name="ddpm-evaluate", on_failure=[log_failure])
def evaluate_flow(params_path: str = "params.yaml", profile: str | None = None, overrides: list[str] | None = None,
                  parent_run_id: str | None = None, force: bool = False) -> dict[str, float]:
    """Make sure the feature net is current, then evaluate the checkpoint; returns the metrics."""
    s, tracker = _open(params_path, profile, overrides)
    checkpoint, evaluation = str(s.layout.checkpoint), s.layout.eval
    with tracker.stage("evaluate", parent_run_id) as run, StageProgress("evaluate") as progress:
        progress("checking the feature net")
        info = _feature_net(s, force=False)  # a forced evaluation need not retrain the feature net
        tasks.log_feature_net(run, info)
        result = tasks.evaluate_model(checkpoint, s.cfg, str(evaluation.folder), info["path"], force)
        progress("logging to MLflow")
        metrics = tasks.log_evaluation(run, result, str(evaluation.folder), _step(checkpoint))
        fid = result["metrics"].get("fid", float("nan"))
        artifacts.publish("evaluate", f"ddpm-evaluate: FID {fid:.1f}", artifacts.evaluate_summary(
            result["metrics"], result["skipped"], progress.seconds), metrics,
            {"samples": str(evaluation.samples), "nearest": str(evaluation.nearest)})
    return metrics


@flow(name="ddpm-export", on_failure=[log_failure])
def export_flow(params_path: str = "params.yaml", profile: str | None = None, overrides: list[str] | None = None,
                parent_run_id: str | None = None, force: bool = False) -> dict[str, Any]:
    """Export to ONNX, check it against PyTorch, sample with onnxruntime, log and register; returns paths and the
    registered version. A rejected export fails the stage and is not registered."""
    s, tracker = _open(params_path, profile, overrides)
    run_files, checkpoint = s.layout, str(s.layout.checkpoint)
    with tracker.stage("export", parent_run_id) as run, StageProgress("export") as progress:
        info = _feature_net(s, force=False)
        progress("exporting to ONNX and checking onnxruntime against PyTorch")
        reports = (str(run_files.export_report), str(run_files.export_int8_report))
        onnx_path = export_tasks.export_model(checkpoint, s.cfg, str(run_files.onnx_model), info["path"], reports,
                                              force)
        int8 = None
        if s.cfg.export.int8 and export_tasks.int8_twin_written(onnx_path, reports[1]):
            from ddpm.quantize import int8_path
            int8 = (str(int8_path(onnx_path)), reports[1])
        samples = export_tasks.sample_onnx(onnx_path, s.cfg, str(run_files.onnx_samples.grid))
        progress("compiling the sampling network ahead of time (CUDA only)")
        aot = export_tasks.export_aot(checkpoint, s.cfg, str(run_files.aot_package), str(run_files.aot_report), force)
        progress("logging to MLflow and the registry")
        export_tasks.log_aot(run, aot, _step(checkpoint))
        metrics_json = run_files.eval.metrics
        quality = json.loads(metrics_json.read_text()) if metrics_json.is_file() \
            else None  # a model exported before any evaluation is registered as a challenger, never champion
        pc = s.cfg.pipeline
        registered = export_tasks.log_export(run, onnx_path, str(run_files.export_report), samples, pc.registered_model,
                                             pc.model_alias, _step(checkpoint), int8, quality,
                                             pc.champion_alias, pc.promotion_margin)
        export_tasks.log_web_page(run, onnx_path)
        if registered["promotion_table"]:
            from prefect.artifacts import create_markdown_artifact

            create_markdown_artifact(markdown=registered["promotion_table"], key="promotion",
                                     description=f"{pc.registered_model} version {registered['version']}: "
                                                 f"{pc.champion_alias} {artifacts.champion_outcome(registered)}")
        report = json.loads(run_files.export_report.read_text())
        artifacts.publish("export", f"ddpm-export: version {registered['version']}", artifacts.export_summary(
            report, registered, progress.seconds), artifacts.read_numbers(run_files.export_report),
            {"samples": samples})
    return {"onnx_model": onnx_path, "onnx_samples": samples, "report": str(run_files.export_report), **registered,
            "run_id": run.run_id}


STAGES = {"data": data_flow, "features": features_flow, "train": train_flow, "distill": distill_flow,
          "evaluate": evaluate_flow, "export": export_flow}


def add_settings_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("overrides", nargs="*", metavar="section.key=value",
                   help="override a setting of params.yaml, e.g. train.steps=200")
    p.add_argument("--params", default="params.yaml", help="settings file (default: %(default)s)")
    p.add_argument("--profile", default=None, help="profile of the settings file (default: its `profile:` key)")


def preflight(params: str, profile: str | None, overrides: list[str]) -> Settings:
    """Validate the settings (CUDA where they ask for it) and reach every configured server before Prefect starts
    anything (seconds)."""
    settings = load_settings(params, profile, overrides)
    check_device(settings.cfg)
    check_prefect_api()
    check_tracking_uri(tracking_uri_for(settings))
    return settings


class Stopped(SystemExit):
    """SIGTERM outside the training loop (which stops by itself at a step boundary)."""


def _stop(signum: int, frame: Any) -> None:
    if _held is not None:
        _held.append(signum)
        return
    raise Stopped(128 + signum)


# C extensions that stages import lazily. A signal handler that raises (Prefect's, on SIGTERM) while one
# of them initialises can abort the process: nanobind turns the exception into std::terminate (seen
# with onnx: exit -6 instead of 143). run_cli imports them first, holding a SIGTERM back until after.
EXTENSIONS = ("numpy", "torch", "torchvision", "onnx", "onnxruntime", "PIL.Image")
_held: list[int] | None = None  # SIGTERMs that arrived while _import_extensions ran


def _import_extensions(names: tuple[str, ...]) -> None:
    """Import `names`; a SIGTERM meanwhile stops the run afterwards, at a safe point."""
    import importlib

    global _held
    _held = []
    try:
        for name in names:
            importlib.import_module(name)
    finally:
        held, _held = _held, None
    if held:
        raise Stopped(128 + held[0])


def run_cli(main: Any, argv: list[str] | None, prog: str, extensions: tuple[str, ...] | None = None) -> int:
    """Run `main(argv)`; a user-facing error (bad setting, server down, rejected export) is one line, exit 2.

    SIGTERM exits with status 143 through the normal shutdown, so the temporary Prefect API started for
    the run is stopped too. Within a flow run Prefect turns SIGTERM into its own exception first (the
    runs end Crashed or Failed in Prefect, KILLED in MLflow), then sends it again: to this handler, not to the
    default one that would kill the process at once. (In the training loop SIGTERM is ddpm.train's: it
    stops after the step with a checkpoint and TrainingInterrupted, exit status 2.)
    `extensions`: the C extensions to import first, SIGTERM held back (None: EXTENSIONS, what the stages import).
    """
    from ddpm.errors import user_error

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    for name in ("ddpm", "flows"):  # Prefect configured logging on import, with the root at WARNING
        logging.getLogger(name).setLevel(logging.INFO)
    previous = signal.signal(signal.SIGTERM, _stop)
    noted = sigterm_count()
    try:
        _import_extensions(EXTENSIONS if extensions is None else extensions)
        return main(argv)
    except Exception as exc:
        signalled = sigterm_count() != noted  # then exc may be what became of Prefect's exception
        message = str(exc) if is_user_error(exc) else (
            None if signalled else user_error(exc))  # user_error: as the `ddpm` command reports it
        if message is not None:
            print(f"{prog}: error: {message}", file=sys.stderr)
            return 2
        if not signalled:
            raise
        exit_code = 128 + signal.SIGTERM
    except Stopped as exc:
        exit_code = int(exc.code)
    finally:
        signal.signal(signal.SIGTERM, previous)
    print(f"{prog}: stopped by SIGTERM; what finished is kept, and a rerun without --force resumes from it",
          file=sys.stderr)
    return exit_code


def _main(argv: list[str] | None) -> int:
    parser = argparse.ArgumentParser(prog="python -m flows.stages", description=__doc__.split("\n\n")[0])
    parser.add_argument("stage", choices=list(STAGES))
    add_settings_arguments(parser)
    parser.add_argument("--no-force", dest="force", action="store_false",
                        help="skip work whose outputs are current (by default a stage reruns: DVC decided it must)")
    args = parser.parse_args(argv)
    settings = preflight(args.params, args.profile, args.overrides)
    STAGES[args.stage](params_path=str(settings.params_path), profile=args.profile, overrides=args.overrides,
                       force=args.force)
    return 0


# The extensions that only some stages import: torchvision ddpm.data's downloads, onnx and onnxruntime the
# stages that export, check or sample an ONNX model (distill checks its student as export does).
STAGE_ONLY = {"torchvision": ("data",), "onnx": ("distill", "evaluate", "export"),
              "onnxruntime": ("distill", "evaluate", "export")}


def stage_extensions(argv: list[str]) -> tuple[str, ...]:
    """The EXTENSIONS that the stage named in `argv` imports (all of them when it names none): each stage of
    `dvc repro` is a process of its own, which skips the slow imports of what it never uses."""
    stage = next((a for a in argv if a in STAGES), None)
    return tuple(n for n in EXTENSIONS if stage is None or n not in STAGE_ONLY or stage in STAGE_ONLY[n])


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    return run_cli(_main, argv, "flows.stages", extensions=stage_extensions(argv))


if __name__ == "__main__":
    sys.exit(main())
