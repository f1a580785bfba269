"""BENCHMARKS.md and the README's results table agree with bench/results/current/*.json, and every
figure that cites a raw result file agrees with that file (python -m bench.report --check)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from bench import report

ROOT = Path(__file__).resolve().parents[1]


def _copy_project(tmp_path: Path) -> Path:
    """The files the check reads, copied so that a test can alter them."""
    for name in ("BENCHMARKS.md", "README.md"):
        shutil.copy(ROOT / name, tmp_path / name)
    shutil.copytree(ROOT / "bench" / "results", tmp_path / "bench" / "results",
                    ignore=shutil.ignore_patterns("*.png", "*.csv", "*.log"))
    return tmp_path


def _run_check(root: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "bench.report", "--check", "--root", str(root)],
                          cwd=ROOT, capture_output=True, text=True)


def test_the_documents_agree_with_the_current_results():
    done = _run_check(ROOT)
    assert done.returncode == 0, done.stderr
    assert len((ROOT / "BENCHMARKS.md").read_bytes()) < 26_000
    assert len((ROOT / "README.md").read_bytes()) < 15_000


def test_every_goal_file_names_its_runs_and_experiment_pages():
    goals = report.load_goals(ROOT)
    assert len(goals) >= 8
    for goal in goals:
        for page in goal.data["experiments"]:
            assert (ROOT / page).is_file(), f"{goal.path.name} cites a missing page {page}"
        for run in goal.data["runs"].values():
            assert (ROOT / run["results"]).is_file(), f"{goal.path.name} cites a missing file {run['results']}"


def test_a_hand_edited_figure_is_named_with_its_line(tmp_path):
    root = _copy_project(tmp_path)
    doc = (root / "BENCHMARKS.md").read_text()
    goal = json.loads((root / "bench/results/current/train-vs-reference.json").read_text())
    shown = goal["figures"][0]["value"]  # our training speed, e.g. "28,936 img/s"
    assert shown in doc and shown != "1,000 img/s"
    (root / "BENCHMARKS.md").write_text(doc.replace(shown, "1,000 img/s", 1))
    line = next(i for i, text in enumerate(doc.splitlines(), 1) if shown in text)
    done = _run_check(root)
    assert done.returncode == 1
    assert f"BENCHMARKS.md line {line} differs" in done.stderr and "1,000 img/s" in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1


def test_a_figure_that_disagrees_with_its_raw_result_fails_the_check(tmp_path):
    root = _copy_project(tmp_path)
    path = root / "bench/results/current/cpu-pipeline.json"
    goal = json.loads(path.read_text())
    raw = json.loads((root / "bench/results/cpu_pipeline.json").read_text())["metrics"]["fid"]
    fid = next(f for f in goal["figures"] if f["what"] == "FID against its floor")
    shown, wrong = f"{raw:.1f}", f"{raw + 20:.1f}"
    fid["value"] = fid["value"].replace(shown, wrong)
    fid["check"][0]["expect"] = wrong
    path.write_text(json.dumps(goal))
    done = _run_check(root)
    assert done.returncode == 1
    assert f"says {wrong} but bench/results/cpu_pipeline.json metrics.fid is {raw}" in done.stderr


def test_a_ratio_is_checked_against_the_two_raw_results(tmp_path):
    root = _copy_project(tmp_path)
    path = root / "bench/results/current/train-vs-reference.json"
    goal = json.loads(path.read_text())
    ratio = next(f for f in goal["figures"] if f["what"] == "ours over the twin")
    check = ratio["check"][0]
    ours = json.loads((root / check["file"]).read_text())["results"][0]["images_per_s"]
    twin = json.loads((root / check["divide_by"]["file"]).read_text())["results"][0]["images_per_s"]
    right, wrong = f"{ours / twin:.2f}", f"{ours / twin + 0.1:.2f}"
    ratio["value"] = ratio["value"].replace(f"{right}x", f"{wrong}x")
    check["expect"] = wrong
    path.write_text(json.dumps(goal))
    done = _run_check(root)
    assert done.returncode == 1
    assert (f"says {wrong} but {check['file']} results.0.images_per_s over "
            f"{check['divide_by']['file']} results.0.images_per_s is {ours / twin}") in done.stderr


def test_writing_refuses_a_disagreeing_figure_and_changes_nothing(tmp_path):
    root = _copy_project(tmp_path)
    path = root / "bench/results/current/sampling-10k.json"
    goal = json.loads(path.read_text())
    goal["figures"][0]["check"][0]["expect"] = "5.16"  # the raw first warm run is 5.266
    goal["figures"][0]["value"] = "5.16 and 5.16 s at batch 1000"
    path.write_text(json.dumps(goal))
    before = {n: (root / n).read_bytes() for n in ("BENCHMARKS.md", "README.md")}
    assert report.main(["--root", str(root)]) == 2
    assert {n: (root / n).read_bytes() for n in before} == before


@pytest.mark.parametrize("damage", ["{not json", '{"order": 1}'])
def test_a_malformed_goal_file_is_one_line_and_exit_2(tmp_path, capsys, damage):
    root = _copy_project(tmp_path)
    (root / "bench/results/current/zz-broken.json").write_text(damage)
    before = (root / "BENCHMARKS.md").read_bytes()
    assert report.main(["--root", str(root)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "zz-broken.json" in err
    assert (root / "BENCHMARKS.md").read_bytes() == before


def test_regenerating_from_the_json_restores_the_document(tmp_path):
    root = _copy_project(tmp_path)
    (root / "BENCHMARKS.md").write_text("stale\n")
    assert report.main(["--root", str(root)]) == 0
    assert (root / "BENCHMARKS.md").read_bytes() == (ROOT / "BENCHMARKS.md").read_bytes()
    assert (root / "README.md").read_bytes() == (ROOT / "README.md").read_bytes()


def test_a_plot_draws_the_raw_results_and_a_stale_one_fails_the_check(tmp_path):
    from bench import plot_svg

    root = _copy_project(tmp_path)
    goal = json.loads((root / "bench" / "results" / "current" / "distill.json").read_text())
    plot = goal["plot"]
    rows = json.loads((root / plot["source"]).read_text())[plot["rows"]]
    series = dict(plot_svg.series_from(root, plot))
    students = sorted((r["network_calls"], r["fid"]) for r in rows if r["sampler"] == "student")
    assert series["distilled students"] == students and len(students) >= 4
    svg = root / plot["file"]
    assert svg.read_text() == plot_svg.render(root, plot)  # the file in git is what the data draw
    svg.write_text(svg.read_text().replace("distilled students", "students"))
    done = _run_check(root)
    assert done.returncode == 1 and plot["file"] in done.stderr
