"""Prefect tasks of the distill stage: progressive distillation of the trained checkpoint (ddpm.distill), the
FID of each round's student, and the settings under which the student is scored, exported and registered.
Thin wrappers like flows.tasks: file paths and numbers in and out, ddpm imported inside each task.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any

from prefect import task
from prefect.cache_policies import NO_CACHE

from ddpm.layout import RunLayout
from flows.tracking import LiveMetrics, RunRef, backfill_loss_csv

log = logging.getLogger(__name__)


def student_config(cfg: Any, steps: int) -> Any:
    """cfg for sampling, scoring and exporting a student of `steps` steps: its sampler (ddpm.generate.student_sampling:
    deterministic DDIM with that many steps, as `ddpm sample`, `evaluate` and `export` use), no int8 twin (the
    float32 student is what is registered)."""
    from ddpm.generate import student_sampling

    scfg = student_sampling(cfg, steps)
    return dataclasses.replace(scfg, export=dataclasses.replace(scfg.export, int8=False))


@task(name="distill", cache_policy=NO_CACHE)
def distill_model(cfg: Any, checkpoint: str, run: RunRef | None = None, force: bool = False) -> dict[str, Any]:
    """ddpm.distill.distill: finished rounds of this teacher are kept and an interrupted one resumes; with force
    every round is distilled again. The loss goes to `run` live, as one curve over the rounds (step = the
    round's first step on the count over all rounds, ddpm.distill.round_spans, plus its own step)."""
    from ddpm import progress
    from ddpm.distill import describe, distill, round_spans

    spans = round_spans(cfg)
    total = sum(n for _, n in spans.values())
    live = LiveMetrics(run.logger()) if run is not None else None

    def on_log(steps: int, step: int, metrics: dict[str, float]) -> None:
        if live is not None:
            live(spans[steps][0] + step, metrics)

    def on_step(steps: int, step: int) -> None:
        progress.advance("distillation (steps, all rounds)", spans[steps][0] + step, total)

    result = distill(cfg, checkpoint, resume=not force, overwrite=force, on_log=on_log, on_step=on_step)
    return {**describe(result), "sent_steps": sorted(live.sent) if live else []}


@task(name="log-distill", cache_policy=NO_CACHE)
def log_distillation(run: RunRef, result: dict[str, Any], fids: dict[int, dict[str, Any]],
                     spans: dict[int, tuple[int, int]]) -> dict[str, float]:
    """Each round's loss curve (rows not sent live; `spans`: ddpm.distill.round_spans), final loss and FID (metrics
    at step = the student's steps: round_loss, fid), its loss.csv and evaluation grid; returns the numbers logged
    per round."""
    logger = run.logger()
    numbers: dict[str, float] = {}
    for r in result["rounds"]:
        n, folder = r["steps"], RunLayout(Path(r["checkpoint"]).parent)
        offset, length = spans[n]
        sent = {s - offset for s in result.get("sent_steps", ()) if offset < s <= offset + length}
        backfill_loss_csv(_Shifted(logger, offset), folder.loss_csv, sent)
        fid = fids[n]["fid"]
        loss = _last_loss(folder.loss_csv)
        logger.metrics({"round_loss": loss, "fid": fid}, n)
        numbers.update({f"fid_{n}_steps": fid, f"loss_{n}_steps": loss})
        logger.artifact(folder.loss_csv, f"distill/steps_{n}")
        logger.image(folder.eval.samples, f"distill_samples_{n}_steps", n)
    logger.metrics(numbers)
    return numbers


class _Shifted:
    """What backfill_loss_csv sends to, with each metric's step moved by `offset`: a round's loss.csv onto the
    stage's one curve."""

    def __init__(self, logger: Any, offset: int):
        self.logger, self.offset = logger, offset

    def metric_batch(self, batch: list[Any]) -> None:
        from mlflow.entities import Metric

        self.logger.metric_batch([Metric(m.key, m.value, m.timestamp, m.step + self.offset) for m in batch])


def _last_loss(loss_csv: Path) -> float:
    from flows.tasks import last_loss_row

    return last_loss_row(loss_csv).get("loss", float("nan"))
