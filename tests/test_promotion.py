"""Promotion by quality (flows.promotion): the champion alias moves only to a challenger that beats it on
the same terms, against a real MLflow registry on a sqlite store."""

from __future__ import annotations

from pathlib import Path

import pytest

from flows.promotion import decide, quality_tags

NET = "a" * 64


def _metrics(fid: float, n: int = 1000, net: str = NET, steps: int = 25) -> dict:
    return {"fid": fid, "fid_floor": 13.2, "num_samples": n, "sampler": "ddim", "steps": steps,
            "feature_net": {"sha256": net, "pinned": True}}


def test_decide_compares_only_like_with_like():
    champ = quality_tags(_metrics(60.0))
    assert decide(quality_tags(_metrics(70.0)), None, 0.0) == (True, "no champion yet")
    assert decide(quality_tags(_metrics(50.0)), champ, 0.0)[0] is True
    worse = decide(quality_tags(_metrics(70.0)), champ, 0.0)
    assert worse[0] is False and "does not beat the champion's 60.000" in worse[1]
    assert decide(quality_tags(_metrics(57.0)), champ, 0.1)[0] is False  # 57 > 60 * 0.9
    assert decide(quality_tags(_metrics(53.0)), champ, 0.1)[0] is True
    fewer = decide(quality_tags(_metrics(30.0, n=200)), champ, 0.0)  # a lower FID at another count: no
    assert fewer == (False, "not comparable with the champion: fid_num_samples 1000 -> 200")
    other_net = decide(quality_tags(_metrics(30.0, net="b" * 64)), champ, 0.0)
    assert other_net[0] is False and "feature_net_sha256" in other_net[1]


@pytest.fixture
def registry(tmp_path: Path):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    exp = client.create_experiment("promotion", artifact_location=(tmp_path / "artifacts").as_uri())
    client.create_registered_model("m")
    return client, exp, tmp_path


def _export(registry, fid: float, n: int = 1000) -> tuple[str, bool]:
    """Register a new version as the export stage does, then apply the promotion; (version, promoted)."""
    from flows.export_tasks import _promote
    from flows.tracking import RunLogger

    client, exp, tmp = registry
    run = client.create_run(exp)
    version = client.create_model_version("m", source=(tmp / "model").as_uri(), run_id=run.info.run_id).version
    client.set_registered_model_alias("m", "challenger", version)
    promoted, table, already = _promote(client, RunLogger(client, run.info.run_id), "m", str(version), "champion",
                                        0.0, _metrics(fid, n))
    assert table.startswith("| | challenger | champion |") and ("**promoted**" in table) == promoted
    assert not already  # a new version never holds the alias before its own promotion
    assert client.get_run(run.info.run_id).data.tags["promotion"] == ("promoted" if promoted else "not promoted")
    return str(version), promoted


def test_the_champion_moves_to_better_models_only(registry):
    client = registry[0]
    champion = lambda: client.get_model_version_by_alias("m", "champion")  # noqa: E731
    assert _export(registry, 80.0) == ("1", True)
    assert _export(registry, 95.0) == ("2", False)  # worse: challenger only
    assert str(champion().version) == "1" and str(client.get_model_version_by_alias("m", "challenger").version) == "2"
    assert _export(registry, 40.0, n=200) == ("3", False)  # a smoke run's FID at 200 samples is not comparable
    assert _export(registry, 70.0) == ("4", True)
    assert str(champion().version) == "4" and champion().tags["fid"] == "70.0"
    assert champion().tags["fid_num_samples"] == "1000" and champion().tags["feature_net_sha256"] == NET
