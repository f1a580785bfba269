"""The maintained benchmarks run on the CPU with --smoke: the same code as on the GPU, a small model.

Each runs as a subprocess, as on the GPU machine, so that a renamed or removed import in ddpm/ fails
here rather than in the next device call. The checks are what a CPU can say about the results:
every case finished, the losses are finite, and the benchmark's sampling loops give exactly what
ddpm.samplers gives from the same x_T.
"""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def _run(script: str, out: Path, *args: str) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, f"bench/{script}", "--smoke", "--out", str(out), *args], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    return json.loads(out.read_text())


def test_bench_train_smoke_times_the_training_step(tmp_path):
    doc = _run("bench_train.py", tmp_path / "train.json", "--device", "cpu", "--models", "mnist", "--no-reference")
    rows = doc["results"]
    assert [(r["model"], r["mode"], r["batch"]) for r in rows] == [("mnist", "eager", 2), ("mnist", "graph", 2)]
    assert all(r["status"] == "ok" and math.isfinite(r["loss"]) and r["ms_per_step"] > 0 for r in rows), rows
    assert (tmp_path / "train.json").stat().st_size > 0


def test_bench_sampling_smoke_loops_equal_the_library_samplers(tmp_path):
    doc = _run("bench_sampling.py", tmp_path / "sampling.json", "--device", "cpu", "--no-reference")
    rows = doc["results"]
    assert rows and all(r["status"] == "ok" for r in rows), rows
    checked = [r for r in rows if "ddim_max_abs_diff_vs_library" in r]
    assert {r["mode"] for r in checked} == {"eager", "graph"}
    assert all(r["ddim_max_abs_diff_vs_library"] == 0.0 for r in checked)  # same arithmetic on the CPU
    assert [r["ddpm_max_abs_diff_vs_library"] for r in rows if "ddpm_max_abs_diff_vs_library" in r] == [0.0]
    assert doc["fastest"]["status"] == "ok" and doc["fastest"]["images"] == 10


def test_bench_onnx_sampling_smoke_times_torch_and_onnxruntime(tmp_path):
    doc = _run("bench_onnx_sampling.py", tmp_path / "onnx.json")
    cases = {(r["backend"], r["sampler"]) for r in doc["rows"]}
    assert cases == {(b, s) for b in ("torch eager, CPU", "onnxruntime, CPU") for s in ("ddpm", "ddim")}
    assert all(r["timed_steps"] == 2 and r["images_per_s"] > 0 for r in doc["rows"])
    assert doc["timesteps"] == 20 and Path(doc["onnx_path"]).name == "model.onnx"


@pytest.mark.browser
def test_bench_browser_smoke_times_the_page_and_python_on_the_same_samples(tmp_path):
    from ddpm.web import CHROMIUM

    if not Path(CHROMIUM).is_file() or not (ROOT / "web" / "node_modules").is_dir():
        pytest.skip("chromium or web/node_modules is missing (.ci/run and `make install` bring them)")
    doc = _run("bench_browser.py", tmp_path / "browser.json")
    [row] = doc["rows"]
    assert (row["threads"], row["batch"], row["steps"]) == (1, 1, 2)
    assert row["browser_ms_per_step"] > 0 and row["python_ms_per_step"] > 0
    assert row["max_abs_diff_x0"] <= 1e-3  # the page computed the same samples as onnxruntime in Python
    assert doc["by_case"]["t1_b1"] == row and "onnxruntime-web" in doc["environment"]["page"]
