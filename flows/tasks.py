"""Prefect tasks: thin wrappers around ddpm functions. They take and return file paths and numbers.

Work tasks (fetch, train, evaluate, ...) write files; `log_*` tasks send those files and numbers
to an MLflow run. Keeping work and logging in separate tasks means a tracking failure shows up as a
failed `log-*` task after a completed work task, whose outputs are on disk for the rerun to reuse.
The export stage's tasks are in flows.export_tasks.
Every ddpm import happens inside a task, so importing the flows does not import torch.

No Prefect result caching (NO_CACHE): whether a stage's outputs are current is decided from the
files themselves (flows.runtime.Stamp and CheckpointStamp: flows/README.md, "Freshness"), which
Prefect cannot see. Paths come from the run's ddpm.layout.RunLayout.
"""

from __future__ import annotations

import json
import logging
import re
import socket
import urllib.error
from pathlib import Path
from typing import Any

from prefect import task
from prefect.cache_policies import NO_CACHE

from ddpm.layout import EvalFiles, RunLayout
from flows.runtime import CheckpointStamp, Stamp, dvc_dataset_version, file_sha256
from flows.tracking import LiveMetrics, RunRef, backfill_loss_csv, write_json

log = logging.getLogger(__name__)

# --- data -----------------------------------------------------------------------------------------

_NETWORK_HINT = re.compile(r"urlopen|URLError|timed? ?out|Timeout|Connection|Network is|unreachable|"
                           r"Name or service|Temporary failure|EAI_AGAIN|ECONN|download failed|`npm pack|"
                           r"apt-get download|HTTP Error 5\d\d|HTTP Error 429", re.IGNORECASE)


def is_network_error(exc: BaseException) -> bool:
    """True for errors worth a retry: a connection, timeout or registry failure anywhere in the chain."""
    seen: set[int] = set()
    e: BaseException | None = exc
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, (ConnectionError, TimeoutError, socket.timeout, urllib.error.URLError)):
            return True
        e = e.__cause__ or e.__context__
    return bool(_NETWORK_HINT.search(str(exc)))


def retry_on_network_error(task: Any, task_run: Any, state: Any) -> bool:
    """Prefect retry_condition_fn: retry a failed fetch only when the failure looks like the network's."""
    exc = state.data if isinstance(state.data, BaseException) else state.result(raise_on_failure=False)
    retry = isinstance(exc, BaseException) and is_network_error(exc)
    if retry:
        log.warning("fetch failed with what looks like a network error; retrying: %s", exc)
    return retry


@task(name="fetch-data", retries=3, retry_delay_seconds=[5, 30, 120], retry_condition_fn=retry_on_network_error,
      cache_policy=NO_CACHE)
def fetch_data(dataset: str, root: str) -> str:
    """Make root/<dataset>/ hold the verified raw files (a verified copy there is kept as is)."""
    from ddpm.data import fetch_dataset

    return str(fetch_dataset(dataset, root))


@task(name="describe-dataset", cache_policy=NO_CACHE)
def describe_dataset(dataset: str, root: str, manifest: str, project: str) -> str:
    """Write dataset.json: the dataset's files with their SHA-256 and data.dvc's md5 (its DVC version).

    Nothing in it depends on where the project is, so the stages after it stay current in a new clone.
    """
    from ddpm.features import dataset_hashes

    return str(write_json(Path(manifest), {
        "dataset": dataset, "sha256": dataset_hashes(dataset, root),
        "dvc_md5": dvc_dataset_version(Path(project), root),
    }))


@task(name="log-data", cache_policy=NO_CACHE)
def log_data(run: RunRef, manifest: str) -> None:
    logger = run.logger()
    info = json.loads(Path(manifest).read_text())
    logger.metrics({"dataset_files": len(info["sha256"])})
    logger.artifact(manifest)


# --- feature network (for FID) -----------------------------------------------------------------

@task(name="feature-net", cache_policy=NO_CACHE)
def ensure_feature_net(dataset: str, root: str, path: str, epochs: int, batch_size: int, lr: float, seed: int,
                       device: str, force: bool = False) -> dict[str, Any]:
    """The feature net at `path`, labelled: {"path", "sha256", "pinned", "test_accuracy", "reused"[, "seconds"]}.

    A shipped net is verified against its pin and never trained, even with force (an altered or missing
    one is an error). Any other file is reused when it was trained on these files with these settings,
    else (or with force) trained.
    """
    from ddpm.feature_pins import describe, is_shipped
    from ddpm.features import dataset_hashes, read_feature_checkpoint, train_feature_net
    from ddpm.train import resolve_device

    if is_shipped(path):
        ckpt = read_feature_checkpoint(path)  # checks the pin
        log.info("feature net %s is the shipped one, SHA-256 as pinned (test accuracy %.4f)%s", path,
                 ckpt["test_accuracy"], "; not retrained: set pipeline.feature_net=retrain for that" if force else "")
        return {**describe(path, dataset), "test_accuracy": float(ckpt["test_accuracy"]), "reused": True}
    wanted = {"epochs": epochs, "batch_size": batch_size, "lr": lr, "seed": seed}
    if not force and Path(path).is_file():
        try:
            ckpt = read_feature_checkpoint(path)
            same = (ckpt["config"]["dataset"] == dataset
                    and {k: ckpt["train"].get(k) for k in wanted} == wanted
                    and ckpt["dataset_hashes"] == dataset_hashes(dataset, root))
        except Exception as exc:  # noqa: BLE001 - an unreadable file is retrained
            log.warning("feature net %s is unusable (%s); retraining it", path, exc)
            same = False
        if same:
            log.info("feature net %s is current (test accuracy %.4f); reusing it", path, ckpt["test_accuracy"])
            return {**describe(path, dataset), "test_accuracy": float(ckpt["test_accuracy"]), "reused": True}
    log.warning("training the feature net %s: its FIDs are unpinned, comparable only with FIDs from this file", path)
    result = train_feature_net(dataset, root, path, epochs=epochs, batch_size=batch_size, lr=lr, seed=seed,
                               device=resolve_device(device))
    return {**describe(path, dataset), "test_accuracy": float(result["test_accuracy"]),
            "seconds": float(result.get("seconds", 0.0)), "reused": False}


@task(name="record-feature-net", cache_policy=NO_CACHE)
def record_feature_net(info: dict[str, Any], record: str, project: str) -> str:
    """Write feature_net.json, which net FID uses, for the stages after it (DVC); a path inside the project
    is written relative to it, so the record does not change with where the project is."""
    path = Path(info["path"])
    shown = path.relative_to(project) if path.is_relative_to(project) else path
    return str(write_json(Path(record), {"path": str(shown), "sha256": info["sha256"], "pinned": info["pinned"],
                                         "test_accuracy": info["test_accuracy"]}))


@task(name="log-feature-net", cache_policy=NO_CACHE)
def log_feature_net(run: RunRef, info: dict[str, Any]) -> None:
    """Metric and tags of the net; the file itself only when it is not pinned (a pinned one is in git)."""
    logger = run.logger()
    logger.metrics({"feature_net_test_accuracy": info["test_accuracy"]})
    logger.tags({"feature_net.path": info["path"], "feature_net.sha256": info["sha256"],
                 "feature_net.pinned": str(info["pinned"]).lower(), "feature_net.reused": str(info["reused"]).lower()})
    if not info["pinned"]:
        logger.artifact(info["path"], "feature_net")


# --- training -----------------------------------------------------------------------------------

def last_loss_row(loss_csv: Path) -> dict[str, float]:
    import csv

    with open(loss_csv, newline="") as f:
        rows = list(csv.DictReader(f))
    return {k: float(v) for k, v in rows[-1].items()} if rows else {}


@task(name="train", cache_policy=NO_CACHE)
def train_model(cfg: Any, run: RunRef | None = None, force: bool = False) -> dict[str, Any]:
    """ddpm.train.train, resuming from train.out_dir/checkpoint.pt when it was trained with these settings.

    A finished checkpoint (step == train.steps) is not retrained. A checkpoint from other settings
    stops the run with the differences (force=True trains from scratch; the previous run's files move to
    `<train.out_dir>.replaced-<UTC time>/`, ddpm.run_folder).
    """
    from ddpm import progress
    from ddpm.errors import TrainingInterrupted
    from ddpm.train import train

    run_files = RunLayout(cfg.train.out_dir)
    run_files.compile_cache.mkdir(parents=True, exist_ok=True)  # a DVC output: there even when nothing compiles
    resume = not force
    if resume:
        stamp = CheckpointStamp(run_files, cfg)
        stamp.check()
        if stamp.fresh([run_files.checkpoint, run_files.loss_csv, run_files.samples_final]):
            last = last_loss_row(run_files.loss_csv)
            log.info("%s is already at step %d; training skipped", run_files.checkpoint, stamp.step)
            return {"checkpoint": str(run_files.checkpoint), "step": stamp.step, "loss": last.get("loss", float("nan")),
                    "images_per_sec": last.get("images_per_sec", 0.0), "sent_steps": [], "skipped": True}
    if cfg.train.nproc > 1:
        return _train_distributed(cfg, resume)
    live = LiveMetrics(run.logger()) if run is not None else None
    samples_logged: list[tuple[int, str]] = []

    def on_sample(step: int, png: Path) -> None:
        samples_logged.append((step, str(png)))

    try:
        result = train(cfg, resume=resume, overwrite=force, on_log=live, on_sample=on_sample,
                       on_step=lambda step: progress.advance("training (steps)", step, cfg.train.steps))
    except TrainingInterrupted as exc:  # its hint is `ddpm train --resume`; a stage resumes unless forced
        raise exc.with_hint("rerun without --force to resume from it (`python -m flows.pipeline`, "
                            "`python -m flows.stages train --no-force`)") from None
    return {"checkpoint": str(result.checkpoint), "step": result.step, "loss": result.loss,
            "images_per_sec": result.images_per_sec, "sent_steps": sorted(live.sent) if live else [],
            "samples": samples_logged, "skipped": False, "compile_cache": result.compile_cache}


@task(name="fetch-compile-cache", cache_policy=NO_CACHE)
def fetch_compile_caches(run: RunRef, folder: str, runs: int = 20) -> list[str]:
    """Compile-cache files (ddpm.compile_cache) that the newest `runs` train runs of this experiment saved and
    `folder` lacks, downloaded into it; returns their names. A fresh machine of a kind that trained before
    then compiles from them (ddpm.train picks the file of its own key). A tracking failure is one warning:
    training compiles as usual."""
    import os
    import tempfile

    from mlflow.tracking import MlflowClient

    target = Path(folder)
    target.mkdir(parents=True, exist_ok=True)
    have, fetched = {p.name for p in target.glob("*.bin")}, []
    try:
        client = MlflowClient(run.uri)
        experiment = client.get_run(run.run_id).info.experiment_id
        found = client.search_runs([experiment], "tags.`train.compile_cache.saved` = 'true'",
                                   order_by=["attributes.start_time DESC"], max_results=runs)
        for other in found:
            for art in client.list_artifacts(other.info.run_id, "compile_cache"):
                name = Path(art.path).name
                if name.endswith(".bin") and name not in have:
                    with tempfile.TemporaryDirectory(dir=target) as tmp:  # whole files only, by one rename
                        os.replace(client.download_artifacts(other.info.run_id, art.path, tmp), target / name)
                    have.add(name)
                    fetched.append(name)
    except Exception as exc:  # noqa: BLE001 - a cache we cannot fetch only costs the compile
        log.warning("compile cache: could not fetch from MLflow (%s); training compiles as usual",
                    " ".join(str(exc).split())[:300])
    if fetched:
        log.info("compile cache: fetched %s from MLflow into %s", ", ".join(fetched), target)
    return fetched


def _train_distributed(cfg: Any, resume: bool) -> dict[str, Any]:
    """train.nproc > 1: `ddpm train` relaunches itself under torchrun; its loss.csv is logged afterwards."""
    import subprocess
    import sys
    import tempfile

    import yaml

    from ddpm.checkpoint import load_checkpoint

    run_files = RunLayout(cfg.train.out_dir)
    run_files.out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", suffix=".yaml", dir=run_files.out_dir, prefix=".params-",
                                     delete=False) as f:
        yaml.safe_dump(cfg.to_dict(), f)  # the resolved settings: no profile left to apply
    try:
        cmd = [sys.executable, "-m", "ddpm.cli", "train", "--params", f.name, "--resume" if resume else "--overwrite"]
        if (code := subprocess.call(cmd)) != 0:
            raise RuntimeError(f"`{' '.join(cmd)}` exited with status {code}")
    finally:
        Path(f.name).unlink(missing_ok=True)
    ckpt = run_files.checkpoint
    last = last_loss_row(run_files.loss_csv)
    return {"checkpoint": str(ckpt), "step": int(load_checkpoint(ckpt)["step"]), "loss": last.get("loss", float("nan")),
            "images_per_sec": last.get("images_per_sec", 0.0), "sent_steps": [], "skipped": False}


@task(name="trajectory", cache_policy=NO_CACHE)
def render_trajectory(checkpoint: str, cfg: Any, out_png: str, n: int, frames: int = 11) -> str:
    """A grid of the denoising trajectory: one row per saved step (noise at the top), n images per row."""
    import torch

    from ddpm.checkpoint import load_model
    from ddpm.generate import generate, save_grid, trajectory_strip
    from ddpm.schedule import Schedule
    from ddpm.train import resolve_device

    model, _, _ = load_model(checkpoint, resolve_device(cfg.runtime.device))
    _, _, trajectory = generate(model, Schedule.from_config(cfg.diffusion), cfg, n, seed=cfg.sample.seed,
                                return_trajectory=True, compile=False)
    if len(trajectory) > frames:  # evenly spaced, first and last included
        keep = torch.linspace(0, len(trajectory) - 1, frames).round().long().tolist()
        trajectory = [trajectory[i] for i in keep]
    return str(save_grid(trajectory_strip(trajectory, n), out_png, nrow=n))


@task(name="log-train", cache_policy=NO_CACHE)
def log_training(run: RunRef, result: dict[str, Any], loss_csv: str, samples: str, trajectory: str,
                 log_checkpoint: bool = True) -> int:
    """The loss curve (rows not sent live), the checkpoint, loss.csv and the images; returns rows sent."""
    logger = run.logger()
    sent = backfill_loss_csv(logger, Path(loss_csv), set(result.get("sent_steps", ())))
    step = int(result["step"])
    logger.tags({"train.skipped": str(result.get("skipped", False)).lower(), "train.step": step})
    for s, png in result.get("samples", ()):
        if Path(png).name != Path(samples).name:  # intermediate grids; the final one is logged below
            logger.image(png, "samples", s)
    logger.image(samples, "samples", step)
    logger.image(trajectory, "trajectory", step)
    for path in (loss_csv, samples, trajectory):
        logger.artifact(path, "train")
    if log_checkpoint:
        logger.artifact(result["checkpoint"], "checkpoint")
    log_compile_cache(logger, result.get("compile_cache"))
    return sent


def log_compile_cache(logger: Any, record: dict[str, Any] | None) -> None:
    """Which compile-cache file the training step compiled from, or why none (ddpm.compile_cache's record), as
    tags; the file itself under compile_cache/, so that a fresh machine of the same kind can fetch it
    (flows/README.md, "Compile once")."""
    if record is None:
        logger.tags({"train.compile_cache": "off (train.compile is false, or training was skipped)"})
        return
    logger.tags({"train.compile_cache": record["status"], "train.compile_cache.key": record["key"],
                 "train.compile_cache.reason": record.get("reason", "")[:4000],
                 "train.compile_cache.saved": str(bool(record.get("saved"))).lower()})
    if record.get("lookups"):
        logger.metrics({f"train.compile_cache.{k}": float(v) for k, v in record["lookups"].items()})
    file = record.get("saved") or record.get("file")
    if file and Path(file).is_file():
        logger.artifact(file, "compile_cache")


# --- evaluation -----------------------------------------------------------------------------------

def flat_numbers(d: dict[str, Any], prefix: str = "") -> dict[str, float]:
    out: dict[str, float] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(flat_numbers(v, f"{prefix}{k}."))
        elif isinstance(v, (int, float)) and not isinstance(v, bool):
            out[f"{prefix}{k}"] = float(v)
    return out


@task(name="evaluate", cache_policy=NO_CACHE)
def evaluate_model(checkpoint: str, cfg: Any, out_dir: str, feature_net: str, force: bool = False) -> dict[str, Any]:
    """ddpm.evaluate.evaluate_checkpoint unless metrics.json is current for this checkpoint and settings; the
    metrics then include the sampling time (timings.json) where it was recorded."""
    out = Path(out_dir)
    files = EvalFiles(out)
    metrics_json = files.metrics
    stamp = Stamp(out.parent, "evaluate", {
        "checkpoint": file_sha256(checkpoint), "feature_net": file_sha256(feature_net),
        **{k: cfg.to_dict()[k] for k in ("evaluate", "sampler", "runtime")}, "sample.compile": cfg.sample.compile})
    if not force and stamp.fresh([metrics_json]):
        log.info("%s is current for this checkpoint; evaluation skipped", metrics_json)
        timings = json.loads(files.timings.read_text()) if files.timings.is_file() else {}
        return {"metrics": {**json.loads(metrics_json.read_text()), **timings}, "skipped": True}
    stamp.clear()
    from ddpm.evaluate import evaluate_checkpoint

    metrics = evaluate_checkpoint(checkpoint, cfg, out_dir=out, feature_net=feature_net)
    stamp.write([metrics_json])
    return {"metrics": metrics, "skipped": False}


@task(name="log-evaluate", cache_policy=NO_CACHE)
def log_evaluation(run: RunRef, result: dict[str, Any], out_dir: str, step: int) -> dict[str, float]:
    logger = run.logger()
    numbers = flat_numbers(result["metrics"])
    logger.metrics(numbers, step)
    sampling = result["metrics"].get("sampling") or {}  # the torch backend's network: the AOT package or why not
    logger.tags({"evaluate.skipped": str(result["skipped"]).lower(),
                 **{f"evaluate.sampling.{k}": str(v)[:4000] for k, v in sampling.items()}})
    for f in sorted(Path(out_dir).iterdir()):
        if f.is_file() and not f.name.startswith("."):
            logger.artifact(f, "evaluate")
            if f.suffix == ".png":
                logger.image(f, f"evaluate_{f.stem}", step)
    return numbers
