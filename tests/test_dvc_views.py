"""DVC's views of the project, on a copy of the working tree, with real `dvc` and no stage run but the
settings stage (the other stages' outputs are stand-ins committed with `dvc commit`):

* `dvc plots show` writes a page that loads nothing from the network (vega is inlined);
* each stage tracks only the settings it reads, from resolved_params.yaml: a change made under the
  active profile makes exactly the stages that read that value stale, and `dvc exp show` shows the
  resolved value, not the base section's;
* `dvc exp run -S` changes only the lines of the values it sets in params.yaml.

The pipeline's own runs under DVC (dvc repro, dvc exp run, exp show --only-changed) are in
tests/test_integration_dvc.py.
"""

from __future__ import annotations

import csv
import io
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
STAGES = ("data", "features", "train", "distill", "evaluate", "export")
RESOLVED = "runs/default/resolved_params.yaml"


def run(repo: Path, *args: str) -> str:
    env = {"PATH": f"{BIN}:/usr/bin:/bin", "HOME": str(repo.parent), "DVC_NO_ANALYTICS": "1",
           "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@t"}
    proc = subprocess.run(args, cwd=repo, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"{' '.join(args)}:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc.stdout


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    """The working tree's files (git ls-files, and new files not ignored) in a new git repository."""
    repo = tmp_path / "repo"
    files = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"], cwd=REPO,
                           capture_output=True, text=True, check=True).stdout.split("\0")
    for rel in filter(None, files):
        if (REPO / rel).is_file() and not rel.startswith(("bench/", "tests/")):
            (repo / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / rel, repo / rel)
    run(repo, "git", "init", "-q")
    run(repo, "git", "add", "-A")
    run(repo, "git", "commit", "-q", "-m", "copy")
    return repo


def _stand_in_outputs(repo: Path) -> None:
    """Files at every output of the stages after settings (what they hold does not matter here)."""
    stages = yaml.safe_load((repo / "dvc.yaml").read_text())["stages"]
    (repo / "data" / "mnist").mkdir(parents=True)
    (repo / "data" / "mnist" / "stand-in").write_text("x")
    for name in STAGES:
        for out in [o for kind in ("outs", "metrics", "plots") for o in stages[name].get(kind, [])]:
            path = repo / (out if isinstance(out, str) else next(iter(out))).replace("${train.out_dir}", "runs/default")
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text("{}" if path.suffix == ".json" else "x")


def _set(repo: Path, key: str, value: object) -> None:
    """`dvc exp run -S`'s own edit of params.yaml (hydra overrides through ruamel.yaml), called in this process."""
    from dvc.utils.hydra import apply_overrides

    apply_overrides(str(repo / "params.yaml"), [f"{key}={value}"])


def _stale(repo: Path) -> set[str]:
    run(repo, str(BIN / "dvc"), "repro", "-q", "settings")
    return set(json.loads(run(repo, str(BIN / "dvc"), "status", "--json") or "{}")) - {"data.dvc"}


@pytest.mark.slow
def test_each_stage_reruns_only_for_the_values_it_reads_under_the_active_profile(repo):
    _stand_in_outputs(repo)
    run(repo, str(BIN / "dvc"), "repro", "-q", "settings")
    run(repo, str(BIN / "dvc"), "commit", "-q", "-f", *STAGES)
    assert _stale(repo) == set()
    resolved, params = yaml.safe_load((repo / RESOLVED).read_text()), yaml.safe_load((repo / "params.yaml").read_text())
    assert resolved["profile"] == "cpu" and resolved["train"]["steps"] == params["profiles"]["cpu"]["train"]["steps"]
    committed = (repo / "params.yaml").read_text()
    for key, value, stale in [
        ("profiles.cpu.evaluate.num_samples", 500, {"evaluate", "distill"}),  # the profile's, read by both
        ("profiles.cpu.sampler.steps", 20, {"train", "evaluate", "export"}),  # students sample with their own steps
        ("profiles.cpu.sample.num_images", 32, {"export", "distill"}),  # the onnxruntime grids; previews use 64
        ("runtime.bf16", False, {"train", "distill", "evaluate", "export"}),  # a base value of the runtime block
        ("profiles.cpu.train.log_every", 10, {"train", "distill"}),
        ("export.check_atol", 0.03, {"export", "distill"}),       # a base value, read by the two exports
        ("export.int8_mean_atol", 0.03, {"export"}),              # the student has no int8 twin
        ("distill.round_steps", 300, {"distill"}),
        ("evaluate.feature_lr", 0.001, {"features", "evaluate"}),
        ("evaluate.feature_seed", 1, {"features", "evaluate"}),
        ("profiles.gpu.train.steps", 10, set()),                  # an inactive profile: nothing
        ("sampler.steps", 40, set()),                             # the cpu profile sets it: the base value is unused
    ]:
        _set(repo, key, value)  # one change at a time, against the committed stages
        assert _stale(repo) == stale, key
        (repo / "params.yaml").write_text(committed)  # the next _stale resolves it again


def test_exp_show_shows_the_resolved_values(repo):
    _stand_in_outputs(repo)
    run(repo, str(BIN / "dvc"), "repro", "-q", "settings")
    run(repo, str(BIN / "dvc"), "commit", "-q", "-f", *STAGES)
    table = list(csv.DictReader(io.StringIO(run(repo, str(BIN / "dvc"), "exp", "show", "--csv"))))
    workspace = next(row for row in table if row["Experiment"] == "" and row["rev"] == "workspace")
    params = yaml.safe_load((repo / "params.yaml").read_text())
    profile_steps, base_steps = params["profiles"]["cpu"]["train"]["steps"], params["train"]["steps"]
    assert profile_steps != base_steps
    assert workspace[f"{RESOLVED}:train.steps"] == str(profile_steps)  # what the run uses: the cpu profile's
    assert workspace["params.yaml:train.steps"] == str(base_steps)


def test_plots_page_loads_nothing_from_the_network(repo):
    run_dir = repo / "runs" / "default"
    (run_dir / "samples_onnx").mkdir(parents=True)
    (run_dir / "loss.csv").write_text("step,loss,lr,images_per_sec\n20,0.5,0.001,90\n40,0.25,0.002,91\n")
    from PIL import Image

    for png in ("samples_final.png", "trajectory.png", "samples_onnx/samples.png"):
        Image.new("L", (8, 8), 128).save(run_dir / png)
    run(repo, str(BIN / "dvc"), "plots", "show", "-o", "out")
    page = (repo / "out" / "index.html").read_text()
    # No element fetches anything: no script, link, image or frame whose source is a URL.
    assert not re.findall(r"""(?:src|href)\s*=\s*["']?\s*(?:https?:)?//""", page, re.I)
    assert not re.findall(r"@import|url\(\s*['\"]?(?:https?:)?//", page)
    assert not re.findall(r"cdn\.|jsdelivr|unpkg", page)
    # The only URLs to vega left are identifiers (JSON schema names) and the editor link that the page's
    # own menu leaves out; none is a script.
    assert {u for u in re.findall(r"https?://[^\s\"'<>)]*vega[^\s\"'<>)]*", page)} <= {
        "https://vega.github.io/schema/vega-lite/v5.json", "https://vega.github.io/schema/vega/v5.json",
        "https://vega.github.io/editor/", "https://github.com/vega/vega-lite/issues/2415"}
    assert 'var e="5.20.2"' in page and 'var n="5.2.0"' in page and "editor: false" in page  # vega, vega-lite
    spec = json.loads(re.search(r"var spec = (\{.*?\});\s*vegaEmbed", page, re.S).group(1))
    values = spec["data"]["values"]
    assert [(v["step"], v["loss"]) for v in values] == [("20", "0.5"), ("40", "0.25")]
    grids = re.findall(r'<img src="(static/[^"]+)">', page)  # the sample grids, copied beside the page
    assert len(grids) == 3 and all((repo / "out" / g).is_file() for g in grids)
    assert (REPO / ".gitignore").read_text().count("/dvc_plots/") == 1  # dvc plots show's default folder


def test_exp_run_set_param_changes_only_the_lines_it_sets(repo):
    before = (repo / "params.yaml").read_text().splitlines()
    for key, value in [("evaluate.nearest_k", 5), ("profiles.cpu.train.steps", 800), ("sample.label", 3),
                       ("pipeline.promotion_margin", 0.1), ("profiles.cifar10.train.lr", 0.001)]:
        _set(repo, key, value)
    after = (repo / "params.yaml").read_text().splitlines()
    assert len(after) == len(before)
    changed = [new.split("#")[0].strip() for old, new in zip(before, after) if new != old]
    assert changed == ["label: 3", "nearest_k: 5", "promotion_margin: 0.1", "steps: 800", "lr: 0.001"]


@pytest.mark.slow
def test_a_cuda_profile_on_a_machine_without_cuda_stops_in_the_settings_stage_and_loses_no_output(repo):
    """`dvc exp run -S profile=gpu` on a CPU machine: the settings stage refuses it in one line, before DVC
    removes the outputs of the stages that would run (train's checkpoint among them) to rerun them."""
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA: the gpu profile runs here")
    _stand_in_outputs(repo)
    run(repo, str(BIN / "dvc"), "repro", "-q", "settings")
    run(repo, str(BIN / "dvc"), "commit", "-q", "-f", *STAGES)
    checkpoint = repo / "runs" / "default" / "checkpoint.pt"
    _set(repo, "profile", "gpu")
    proc = subprocess.run([str(BIN / "dvc"), "repro"], cwd=repo, capture_output=True, text=True, timeout=300,
                          env={"PATH": f"{BIN}:/usr/bin:/bin", "HOME": str(repo.parent), "DVC_NO_ANALYTICS": "1"})
    assert proc.returncode != 0
    assert ("python -m flows.resolved_params: error: runtime.device: 'cuda' was asked for, but no CUDA device is "
            "available") in proc.stderr, proc.stderr[-3000:]
    assert "Running stage 'train'" not in proc.stdout and checkpoint.read_text() == "x"
