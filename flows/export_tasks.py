"""Prefect tasks of the export stage: ONNX export, its check against PyTorch, sampling with onnxruntime
alone, and logging the accepted model to MLflow's registry. Thin wrappers around ddpm.export and
ddpm.onnx_sampler, like flows.tasks (whose conventions they follow: file paths in and out, no result
caching, ddpm imported inside each task).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from prefect import task
from prefect.cache_policies import NO_CACHE

from flows.runtime import Stamp, file_sha256
from flows.tasks import flat_numbers
from flows.tracking import RunRef, write_json

log = logging.getLogger(__name__)


@task(name="export-onnx", cache_policy=NO_CACHE)
def export_model(checkpoint: str, cfg: Any, onnx_path: str, feature_net: str, reports: tuple[str, str | None],
                 force: bool = False) -> str:
    """ddpm.export.export_onnx (with its parity check, and the int8 twin with export.int8) unless the ONNX
    files are current for this checkpoint; either way the files it returns passed the gate under these settings.
    The gate (check_model, writing `reports`: the float32 model's, the int8 twin's or None to leave the twin
    unchecked) runs on new files in the export's temporary folder, as `ddpm export`'s does, so a rejected export
    replaces nothing; on current files it runs only where the settings it checked with changed (its own stamp).
    The int8 twin is optional (ddpm.export writes none when its scheme cannot run on this CPU): the record lists
    the files that were written."""
    from ddpm.export import fp16_path
    from ddpm.quantize import int8_path

    out = Path(onnx_path)

    def gate(model: Path, int8: bool) -> None:
        if reports[int8] is not None:
            check_model(str(model), checkpoint, cfg, feature_net, reports[int8], force, int8=int8,
                        named=str(out.parent / model.name))

    files = [out] + ([fp16_path(out)] if cfg.export.fp16 else [])
    stamp = Stamp(out.parent, "export", export_stamp(checkpoint, cfg))
    if not force and stamp.fresh(files):
        log.info("%s is current for this checkpoint; export skipped", out)
        gate(out, False)
        if cfg.export.int8 and int8_path(out).is_file():
            gate(int8_path(out), True)
        return str(out)
    stamp.clear()
    from ddpm.export import export_onnx

    export_onnx(checkpoint, out, cfg.export, cfg.sampler, gate=gate)
    stamp.write(files + [p for p in [int8_path(out)] if cfg.export.int8 and p.is_file()])
    return str(out)


def export_stamp(checkpoint: str, cfg: Any) -> dict[str, Any]:
    """What the ONNX files are current for: the checkpoint, the export settings and the sampler settings the
    export records in its metadata (ddpm.export.recorded_sampler)."""
    from ddpm.export import recorded_sampler

    return {"checkpoint": file_sha256(checkpoint), "export": cfg.to_dict()["export"],
            "sampler": recorded_sampler(cfg.diffusion, cfg.sampler)}


@task(name="export-aot", cache_policy=NO_CACHE)
def export_aot(checkpoint: str, cfg: Any, package: str, report: str, force: bool = False) -> dict[str, Any]:
    """ddpm.aot_package.export_package: the sampling network compiled for this GPU, beside the ONNX model, unless
    the package there is already this checkpoint's for this machine, built with the tuning asked for
    (ddpm.aot_package.built_as_asked). Optional: without CUDA, or when its samples differ from the eager
    network's, none is written and `report` says why."""
    import torch

    from ddpm.aot_package import built_as_asked, export_package, read_record, refusal
    from ddpm.generate import samples_in_bf16

    device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    reusable = (not force and device.type == "cuda" and built_as_asked(Path(package), cfg)
                and refusal(Path(package), device, file_sha256(checkpoint), samples_in_bf16(cfg, device)) is None)
    if reusable:
        log.info("%s is current for this checkpoint and GPU; AOT compile skipped", package)
        record = {"written": True, "file": package, "reused": True, **read_record(Path(package))}
    else:
        record = export_package(checkpoint, package, cfg)
    write_json(Path(report), record)
    return record


@task(name="log-aot", cache_policy=NO_CACHE)
def log_aot(run: RunRef, record: dict[str, Any], step: int) -> None:
    """The AOT package (artifact under aot/) and its record as tags and parity metrics, or why there is none."""
    logger = run.logger()
    logger.tags({"export.aot.written": str(record["written"]).lower(),
                 "export.aot.reason": record.get("reason", "")[:4000],
                 "export.aot.device": (record.get("machine") or {}).get("device", "")})
    if record.get("parity"):
        logger.metrics({f"aot_parity_{k}": float(v) for k, v in record["parity"].items()
                        if k.endswith("abs_diff")}, step)
    if record["written"]:
        logger.artifact(record["file"], "aot")


@task(name="check-export", cache_policy=NO_CACHE)
def check_model(onnx_path: str, checkpoint: str, cfg: Any, feature_net: str, report: str,
                force: bool = False, int8: bool = False, named: str | None = None) -> dict[str, Any]:
    """ddpm.export_check.gate_export, the gate `ddpm export` applies too: onnxruntime samples against
    PyTorch's, and their FIDs. Writes `report` either way; raises ExportRejected (with the measured
    differences) when the export is not accepted.

    `int8`: the int8 twin (ddpm.quantize), gated by its own bounds (gate_export); a rejected twin is
    deleted (the export stage then fails, and a rerun exports it again, since the export's record lists it).
    `named`: the path the report's error gives the model (export_model checks it under a temporary name).
    """
    from ddpm.errors import ExportRejected

    settings = cfg.to_dict()
    stamp = Stamp(Path(report).parent, "check-export-int8" if int8 else "check-export", {
        "onnx": file_sha256(onnx_path), "checkpoint": file_sha256(checkpoint), "feature_net": file_sha256(feature_net),
        "export": settings["export"], "sampler": settings["sampler"], "device": settings["runtime"]["device"],
        "seed": cfg.sample.seed})
    if not force and stamp.fresh([Path(report)]):
        result = json.loads(Path(report).read_text())
        if result.get("accepted"):
            log.info("%s: the export was already accepted; check skipped", report)
            return result
    stamp.clear()
    from ddpm.evaluate import fid_score
    from ddpm.export_check import gate_export

    try:
        result = gate_export(onnx_path, checkpoint, cfg, fid_score(cfg, feature_net), int8=int8)
    except ExportRejected as exc:
        write_json(Path(report), {"accepted": False, "error": str(exc).replace(onnx_path, named or onnx_path)})
        if int8:  # an optional twin that failed its check must not be picked up; a rerun exports it again
            Path(onnx_path).unlink(missing_ok=True)
        raise
    write_json(Path(report), result)
    stamp.write([Path(report)])
    return result


def int8_twin_written(onnx_path: str, report: str) -> bool:
    """Whether the export wrote the int8 twin asked for; when it did not, `report` says why (from the float32
    model's metadata) and a warning is logged, and the stage goes on with the float32 model alone."""
    from ddpm.onnx_model import OnnxDenoiser

    record = OnnxDenoiser(onnx_path, "cpu").metadata.get("int8") or {}
    if record.get("written"):
        return True
    reason = record.get("reason", "the export recorded no int8 twin")
    log.warning("no int8 twin: %s", reason)
    write_json(Path(report), {"accepted": False, "written": False, "scheme": record.get("scheme"), "error": reason})
    return False


@task(name="onnx-sample", cache_policy=NO_CACHE)
def sample_onnx(onnx_path: str, cfg: Any, out_png: str) -> str:
    """Sample with onnxruntime alone (ddpm.onnx_sampler, no PyTorch) and save the grid."""
    from ddpm.export_check import ort_provider
    from ddpm.fileio import grid_png
    from ddpm.onnx_sampler import sample

    sc, sp = cfg.sample, cfg.sampler
    images = sample(onnx_path, sc.num_images, sp.name, sp.steps, sp.eta, sc.seed, sc.batch_size, sc.label,
                    sp.guidance_scale, provider=ort_provider(cfg.runtime.device), variance=sp.variance,
                    clip_denoised=sp.clip_denoised)
    png = grid_png(images)
    if png is None:
        raise RuntimeError("Pillow is needed to write the sample grid")
    out = Path(out_png)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_bytes(png)
    return str(out)


def onnx_signature(proto: Any) -> Any:
    """The MLflow signature of an ONNX graph: its inputs and outputs as tensors, -1 for dynamic dims."""
    import onnx
    from mlflow.models import ModelSignature
    from mlflow.types.schema import Schema, TensorSpec

    initializers = {i.name for i in proto.graph.initializer}

    def spec(value: Any) -> TensorSpec:
        tt = value.type.tensor_type
        shape = tuple(d.dim_value if d.HasField("dim_value") else -1 for d in tt.shape.dim)
        return TensorSpec(onnx.helper.tensor_dtype_to_np_dtype(tt.elem_type), shape, value.name)

    return ModelSignature(inputs=Schema([spec(v) for v in proto.graph.input if v.name not in initializers]),
                          outputs=Schema([spec(v) for v in proto.graph.output]))


@task(name="log-export", cache_policy=NO_CACHE)
def log_export(run: RunRef, onnx_path: str, report: str, onnx_samples: str, registered_model: str, alias: str,
               step: int, int8: tuple[str, str] | None = None, quality: dict[str, Any] | None = None,
               champion_alias: str = "champion", margin: float = 0.0) -> dict[str, Any]:
    """Log the accepted ONNX model (mlflow.onnx.log_model, with its signature), register it and move the
    alias (the challenger) to it. A model identical to the one the alias already names is logged but not
    registered again. `int8`: (the int8 twin, its check report), logged as artifacts under export/ with the
    report's numbers as int8_* metrics; the registry holds the float32 model alone.
    `quality`: the evaluation's metrics.json: tagged on the version, and the champion alias moves to it only
    when it beats the champion (flows.promotion); the decision is a table in MLflow and in Prefect."""
    import mlflow.onnx
    import onnx
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    logger = run.logger()

    def log_report(path: str, prefix: str = "") -> None:  # a check report's numbers as metrics, the file as artifact
        check = json.loads(Path(path).read_text())
        logger.metrics(flat_numbers({prefix + k: v for k, v in check.items() if k not in ("n", "steps", "seed")}), step)
        logger.artifact(path, "export")

    log_report(report)
    logger.artifact(onnx_samples, "export")
    logger.image(onnx_samples, "onnx_samples", step)
    if int8 is not None:
        logger.artifact(int8[0], "export")
        log_report(int8[1], "int8_")

    sha = file_sha256(onnx_path)
    client = MlflowClient(run.uri)
    try:
        current = client.get_model_version_by_alias(registered_model, alias)
    except MlflowException:
        current = None
    register = current is None or current.tags.get("onnx_sha256") != sha
    proto = onnx.load(onnx_path)
    info = mlflow.onnx.log_model(
        proto, name="onnx-model", run_id=run.run_id, signature=onnx_signature(proto),
        registered_model_name=registered_model if register else None, save_as_external_data=False,
        pip_requirements=[f"onnx=={onnx.__version__}", "onnxruntime>=1.20", "numpy"],
        metadata={"onnx_sha256": sha, "training_step": step}, await_registration_for=60)
    if register:
        version = str(info.registered_model_version)
        client.set_model_version_tag(registered_model, version, "onnx_sha256", sha)
        client.set_model_version_tag(registered_model, version, "training_step", str(step))
        client.set_registered_model_alias(registered_model, alias, version)
    else:
        version = str(current.version)
        log.info("model version %s (alias %r) already holds this ONNX file; not registered again", version, alias)
    logger.tags({"registered_model": registered_model, "registered_model.version": version,
                 "registered_model.alias": alias, "onnx_sha256": sha})
    promoted, table, already = (_promote(client, logger, registered_model, version, champion_alias, margin, quality)
                                if quality is not None else (None, None, False))
    return {"model_uri": info.model_uri, "registered_model": registered_model, "version": version, "alias": alias,
            "registered_now": register, "champion_alias": champion_alias, "promoted": promoted,
            "already_champion": already,
            "promotion_table": table}


@task(name="log-web-page", cache_policy=NO_CACHE)
def log_web_page(run: RunRef, onnx_path: str) -> bool:
    """Log the sampling page with the model (ddpm.web's layout) as the run's artifact folder web/, to be served
    as it is (`ddpm web --registered` does it for a registered version). Without onnxruntime-web installed
    (web/node_modules) a warning says why and nothing is logged: the registered model stands without it."""
    import tempfile

    from ddpm.web import WebError, write_site

    with tempfile.TemporaryDirectory(prefix="ddpm-web-") as tmp:
        try:
            folder = write_site(onnx_path, Path(tmp) / "web")
        except WebError as exc:
            log.warning("the sampling page was not logged: %s", exc)
            return False
        run.logger().artifact_folder(folder, "web")
    return True


def _promote(client: Any, logger: Any, name: str, version: str, champion_alias: str, margin: float,
             quality: dict[str, Any]) -> tuple[bool, str, bool]:
    """Tag `version` with its quality, move `champion_alias` to it if it beats the champion; returns whether it
    holds the alias now, the decision as a markdown table (which also goes to the run: artifact, tags; and the
    log) and whether it held the alias already."""
    from mlflow.exceptions import MlflowException

    from flows.promotion import COMPARABLE, decide, decision_table, quality_tags

    tags = quality_tags(quality)
    for k, v in tags.items():
        client.set_model_version_tag(name, version, k, v)
    try:
        champion = client.get_model_version_by_alias(name, champion_alias)
    except MlflowException:
        champion = None
    old = None if champion is None else dict(champion.tags)
    already = champion is not None and str(champion.version) == version
    if already:
        promote, why = True, f"version {version} is already the champion"
    else:
        promote, why = decide(tags, old, margin)
    if promote:
        client.set_registered_model_alias(name, champion_alias, version)
    rows = [("version", version, "-" if champion is None else str(champion.version))]
    rows += [(k, tags[k], (old or {}).get(k, "-")) for k in ("fid", "fid_floor", *COMPARABLE)]
    table = decision_table(rows, promote, why)
    client.log_text(logger.run_id, table, "export/promotion.md")  # in the run only: the run folder stays as it was
    logger.tags({"promotion": "promoted" if promote else "not promoted", "promotion.reason": why})
    outcome = "stays" if already else "promoted to" if promote else "not promoted to"
    log.info("%s version %s %s %r: %s", name, version, outcome, champion_alias, why)
    return promote, table, already
