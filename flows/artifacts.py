"""The Prefect artifacts each stage publishes when it ends: what the run produced, readable in the UI.

Per stage (keys `<stage>-summary`, `<stage>-metrics`, `<stage>-<image>`):

    summary   markdown: the headline numbers (train: step, loss, images/s; evaluate: FID against
              its floor, sample count, sampling time; export: parity with PyTorch, the registry
              version), the stage's wall time and where its images are
    metrics   a table of every number the stage recorded (loss.csv's last row, metrics.json,
              export.json)
    <image>   a link to each image the stage wrote (the sample grids), as a file:// URL

The numbers come from the stages' own records on disk, the same ones MLflow logs.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from flows.tasks import flat_numbers


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return "nan" if math.isnan(value) else f"{value:.4g}"
    return str(value)


def markdown_table(rows: list[tuple[str, Any]]) -> str:
    return "\n".join(["| | |", "|---|---|", *(f"| {k} | {_fmt(v)} |" for k, v in rows)])


def publish(stage: str, title: str, summary: list[tuple[str, Any]], metrics: dict[str, float],
            images: dict[str, str]) -> None:
    """Create the stage's summary, metrics table and image links in the current flow or task run."""
    from prefect.artifacts import create_link_artifact, create_markdown_artifact, create_table_artifact

    shown = [p for p in images.values() if Path(p).is_file()]
    text = "\n".join([f"## {title}", "", markdown_table(summary), "", "Images:", "",
                      *(f"- `{p}`" for p in shown)])
    create_markdown_artifact(markdown=text, key=f"{stage}-summary", description=title)
    create_table_artifact(table=[{"metric": k, "value": v} for k, v in sorted(metrics.items())],
                          key=f"{stage}-metrics", description=f"{stage}: every number it recorded")
    for name, path in images.items():
        if Path(path).is_file():
            create_link_artifact(link=Path(path).resolve().as_uri(), link_text=Path(path).name,
                                 key=f"{stage}-{name}", description=f"{stage}: {name} grid")


def train_summary(result: dict[str, Any], seconds: float) -> list[tuple[str, Any]]:
    return [("step", result["step"]), ("loss (last window)", result["loss"]),
            ("images/s (last window)", result["images_per_sec"]),
            ("training skipped (checkpoint current)", result.get("skipped", False)), ("stage time, s", seconds)]


def evaluate_summary(metrics: dict[str, Any], skipped: bool, seconds: float) -> list[tuple[str, Any]]:
    fid, floor = metrics.get("fid"), metrics.get("fid_floor")
    net = metrics.get("feature_net") or {}
    return [("FID", fid), ("FID floor (real images, same count)", floor),
            ("FID / floor", fid / floor if fid and floor else "-"), ("samples", metrics.get("num_samples")),
            ("sampler, steps", f"{metrics.get('sampler')}, {metrics.get('steps')}"),
            ("sampling time, s", metrics.get("sample_seconds")),
            ("feature net", f"{'pinned' if net.get('pinned') else 'unpinned'} {str(net.get('sha256', ''))[:12]}"),
            ("evaluation skipped (metrics current)", skipped), ("stage time, s", seconds)]


def champion_outcome(registered: dict[str, Any]) -> str:
    """What an export did to the champion alias (flows.export_tasks.log_export's record)."""
    if registered.get("already_champion"):
        return "already on it"
    return "moved to it" if registered.get("promoted") else "kept: see promotion.md in the export run"


def export_summary(report: dict[str, Any], registered: dict[str, Any], seconds: float) -> list[tuple[str, Any]]:
    return [("accepted", report.get("accepted")),
            ("parity: max abs diff (onnxruntime vs PyTorch)", report.get("max_abs_diff")),
            ("parity: allowed max abs diff", report.get("atol")),
            ("parity: mean abs diff", report.get("mean_abs_diff")),
            ("check FID onnxruntime / PyTorch",
             f"{_fmt(report.get('score_onnx'))} / {_fmt(report.get('score_torch'))}"),
            ("registered", f"{registered.get('registered_model')} version {registered.get('version')} "
                           f"@{registered.get('alias')}"),
            (f"@{registered.get('champion_alias')}", champion_outcome(registered)),
            ("stage time, s", seconds)]


def read_numbers(path: str | Path) -> dict[str, float]:
    """The numbers of a JSON record (nested keys joined with dots); none when it is missing."""
    p = Path(path)
    return flat_numbers(json.loads(p.read_text())) if p.is_file() else {}
