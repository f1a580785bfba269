"""Promotion by quality: which accepted export the registry's champion alias names.

Every export that passes its check gets the challenger alias (pipeline.model_alias). The champion
alias (pipeline.champion_alias) moves to it only when its FID beats the champion's on the same terms:
the same sample count, sampler and steps, and the same feature net (FIDs under another net or at
another count are not comparable: the floor alone moves with the count). `decide` is a pure function;
flows.export_tasks.log_export applies it and records the decision in MLflow and in Prefect.
"""

from __future__ import annotations

from typing import Any

# What a model version must share with the champion for their FIDs to compare, as registry tags.
COMPARABLE = ("fid_num_samples", "fid_sampler", "fid_steps", "feature_net_sha256")


def quality_tags(metrics: dict[str, Any]) -> dict[str, str]:
    """Registry tags of a model version from its evaluation's metrics.json (ddpm.evaluate)."""
    return {"fid": repr(float(metrics["fid"])), "fid_floor": repr(float(metrics["fid_floor"])),
            "fid_num_samples": str(metrics["num_samples"]), "fid_sampler": str(metrics["sampler"]),
            "fid_steps": str(metrics["steps"]), "feature_net_sha256": str(metrics["feature_net"]["sha256"])}


def decide(challenger: dict[str, str], champion: dict[str, str] | None, margin: float) -> tuple[bool, str]:
    """(promote, why) for a challenger's quality tags against the champion's (None: there is none)."""
    if champion is None:
        return True, "no champion yet"
    differ = [k for k in COMPARABLE if challenger.get(k) != champion.get(k)]
    if differ:
        return False, ("not comparable with the champion: " +
                       ", ".join(f"{k} {champion.get(k)} -> {challenger.get(k)}" for k in differ))
    new, old = float(challenger["fid"]), float(champion["fid"])
    if new < old * (1.0 - margin):
        return True, f"FID {new:.3f} beats the champion's {old:.3f} (margin {margin:.0%})"
    return False, f"FID {new:.3f} does not beat the champion's {old:.3f} by the margin {margin:.0%}"


def decision_table(rows: list[tuple[str, str, str]], promoted: bool, why: str) -> str:
    """Markdown: the two versions side by side (rows of key, challenger, champion) and the decision."""
    lines = ["| | challenger | champion |", "| --- | --- | --- |"]
    lines += [f"| {k} | {a} | {b} |" for k, a, b in rows]
    return "\n".join(lines) + f"\n\n**{'promoted' if promoted else 'not promoted'}**: {why}\n"
