"""The maintained benchmarks run on the CPU with --smoke: the same code as on the GPU, a small model.

Each runs as a subprocess, as on the GPU machine, so that a renamed or removed import in ddpm/ fails
here rather than in the next device call; all of them start at once, one thread each. The checks
are what a CPU can say about the results: every case finished, the losses are finite, the
benchmark's sampling loops give exactly what ddpm.samplers gives from the same x_T, and the
GroupNorm forms agree with float64. The benchmarks that need a trained model and a dataset
(time_to_quality, int8_quality, groupnorm_conditioning) train a small one for a few steps on an
MNIST look-alike (testkit.fake_mnist).
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

# name -> (script, its arguments after --smoke, where its JSON lands); {out} is the run's own folder,
# {data} an MNIST look-alike for the benchmarks that train and score a model.
RUNS = {
    "train": ("bench_train.py", ["--out", "{out}/train.json", "--device", "cpu", "--models", "mnist",
                                 "--no-reference"], "train.json"),
    "sampling": ("bench_sampling.py", ["--out", "{out}/sampling.json", "--device", "cpu", "--no-reference"],
                 "sampling.json"),
    "onnx": ("bench_onnx_sampling.py", ["--out", "{out}/onnx.json"], "onnx.json"),
    "ttq": ("time_to_quality.py", ["--out", "{out}", "--data-root", "{data}"], "ttq.json"),
    "int8": ("int8_quality.py", ["--out", "{out}/int8.json", "--data-root", "{data}", "--threads", "1"],
             "int8.json"),
    "groupnorm": ("groupnorm_conditioning.py", ["--out", "{out}/gn.json", "--data-root", "{data}"], "gn.json"),
}


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    """Every smoke run, started at once, each on one thread (a 2-core machine runs two at a time);
    `smoke(name)` waits for one and returns (the JSON it wrote, its folder)."""
    from testkit import fake_mnist

    data = tmp_path_factory.mktemp("data")
    fake_mnist(data)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    procs = {}
    for name, (script, args, _) in RUNS.items():
        out = tmp_path_factory.mktemp(name)
        cmd = [sys.executable, f"bench/{script}", "--smoke", *(a.format(out=out, data=data) for a in args)]
        with open(out / "output.log", "w") as log:  # a file, not a pipe: a full pipe would stall the run
            procs[name] = (subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT), out)

    def result(name: str) -> tuple[dict, Path]:
        proc, out = procs[name]
        proc.wait(timeout=600)
        assert proc.returncode == 0, (out / "output.log").read_text()[-5000:]
        return json.loads((out / RUNS[name][2]).read_text()), out

    yield result
    for proc, _ in procs.values():
        if proc.poll() is None:  # a test failed before waiting for it
            proc.kill()
            proc.wait()


def _run_alone(script: str, out: Path, *args: str) -> dict:
    """One smoke run on its own (a benchmark that needs what not every machine has, or its own data)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, f"bench/{script}", "--smoke", "--out", str(out), *args], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    return json.loads(out.read_text())


def test_bench_train_smoke_times_the_training_step(smoke):
    doc, out = smoke("train")
    rows = doc["results"]
    assert [(r["model"], r["mode"], r["batch"]) for r in rows] == [("mnist", "eager", 2), ("mnist", "graph", 2)]
    assert all(r["status"] == "ok" and math.isfinite(r["loss"]) and r["ms_per_step"] > 0 for r in rows), rows
    assert (out / "train.json").stat().st_size > 0


def test_bench_sampling_smoke_loops_equal_the_library_samplers(smoke):
    doc, _ = smoke("sampling")
    rows = doc["results"]
    assert rows and all(r["status"] == "ok" for r in rows), rows
    checked = [r for r in rows if "ddim_max_abs_diff_vs_library" in r]
    assert {r["mode"] for r in checked} == {"eager", "graph"}
    assert all(r["ddim_max_abs_diff_vs_library"] == 0.0 for r in checked)  # same arithmetic on the CPU
    assert [r["ddpm_max_abs_diff_vs_library"] for r in rows if "ddpm_max_abs_diff_vs_library" in r] == [0.0]
    assert doc["fastest"]["status"] == "ok" and doc["fastest"]["images"] == 10


def test_bench_onnx_sampling_smoke_times_torch_and_onnxruntime(smoke):
    doc, _ = smoke("onnx")
    cases = {(r["backend"], r["sampler"]) for r in doc["rows"]}
    assert cases == {(b, s) for b in ("torch eager, CPU", "onnxruntime, CPU") for s in ("ddpm", "ddim")}
    assert all(r["timed_steps"] == 2 and r["images_per_s"] > 0 for r in doc["rows"])
    assert doc["timesteps"] == 20 and Path(doc["onnx_path"]).name == "model.onnx"


def test_time_to_quality_smoke_trains_to_each_milestone_and_scores_it(smoke):
    from ddpm.checkpoint import load_checkpoint

    doc, out = smoke("ttq")
    milestones = doc["milestones"]
    assert {step: sorted(m) for step, m in milestones.items()} == {
        "2": ["ddim5", "train_minutes"], "4": ["ddim5", "ddpm20", "train_minutes"]}
    for step in (2, 4):  # the copy kept at each milestone is the checkpoint of that step
        assert load_checkpoint(out / f"checkpoint_{step:06d}.pt")["step"] == step
    assert 0 < milestones["2"]["train_minutes"] <= milestones["4"]["train_minutes"]
    scores = [m[k] for m in milestones.values() for k in m if k != "train_minutes"]
    assert [(s["sampler"], s["steps"], s["num_samples"]) for s in scores] == [
        ("ddim", 5, 32), ("ddim", 5, 32), ("ddpm", 20, 32)]
    assert all(math.isfinite(s["fid"]) and s["fid"] >= 0 and 0 <= s["precision"] <= 1 for s in scores)
    assert math.isfinite(doc["final_loss"]) and math.isfinite(doc["fid_floor_10k"])


def test_int8_quality_smoke_scores_float32_and_int8_from_the_same_noise(smoke):
    doc, _ = smoke("int8")
    assert (doc["n"], doc["steps"], doc["calibration"]["ddim_steps"]) == (32, 5, 5)
    models = doc["models"]
    assert list(models) == ["float32", "int8 shipped"]
    assert all(math.isfinite(m["fid"]) and m["network_ms_batch16"] > 0 for m in models.values())
    int8 = models["int8 shipped"]
    assert 0 <= int8["mean_abs_diff"] <= int8["max_abs_diff"] <= 2  # images in [-1, 1]


def test_groupnorm_conditioning_smoke_matches_float64_group_norm(smoke):
    from ddpm.checkpoint import load_model
    from ddpm.layers import GroupNorm

    doc, _ = smoke("groupnorm")
    assert doc["step"] == 4 and doc["images"] == 8 and doc["timesteps"] == [0, 10, 19]
    model, _, _ = load_model(doc["checkpoint"], "cpu")  # the small model it trained
    assert set(doc["per_groupnorm"]) == {name for name, m in model.named_modules() if isinstance(m, GroupNorm)}
    # Small means against spreads: the sums form and aten agree with float64 to float32 rounding.
    assert doc["worst"]["max_err_sums"] < 1e-4 and doc["worst"]["max_err_aten"] < 1e-4
    assert len(doc["synthetic"]) == 3


@pytest.mark.browser
def test_bench_browser_smoke_times_the_page_and_python_on_the_same_samples(tmp_path):
    from ddpm.web import CHROMIUM

    if not Path(CHROMIUM).is_file() or not (ROOT / "web" / "node_modules").is_dir():
        pytest.skip("chromium or web/node_modules is missing (.ci/run and `make install` bring them)")
    doc = _run_alone("bench_browser.py", tmp_path / "browser.json")
    [row] = doc["rows"]
    assert (row["threads"], row["batch"], row["steps"]) == (1, 1, 2)
    assert row["browser_ms_per_step"] > 0 and row["python_ms_per_step"] > 0
    assert row["max_abs_diff_x0"] <= 1e-3  # the page computed the same samples as onnxruntime in Python
    assert doc["by_case"]["t1_b1"] == row and "onnxruntime-web" in doc["environment"]["page"]
    screen = doc["on_screen"]["by_threads"]["t1"]  # the form's defaults: 16 images, T = 20 of the tiny export
    assert (screen["batch"], screen["steps"]) == (16, 20) and screen["status"].startswith("done: 20 steps")
    assert 0 < screen["open_to_ready_s"] < screen["open_to_done_s"]


def test_bench_compile_once_smoke_runs_every_command_and_writes_its_goal_file(tmp_path):
    """Every step is a `ddpm` command that exits 0; on the CPU both sample commands run the eager network
    (no package: those are built on CUDA) and so give the same images; the goal file's figures are the summary's."""
    from testkit import fake_mnist

    fake_mnist(tmp_path / "data", n_train=256, n_test=128)
    goal = tmp_path / "goal.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "bench/compile_once.py", "--smoke", "--out", str(tmp_path / "co.json"),
                           "--goal", str(goal), "--warm-runs", "2", "--cold-steps", "2",
                           f"data.root={tmp_path / 'data'}"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    doc = json.loads((tmp_path / "co.json").read_text())
    steps = doc["steps"]
    assert set(steps) == {"train_cold", "train_warm", "train_warm_2", "sample_aot", "sample_eager"}
    warm = [steps["train_warm"]["wall_s"], steps["train_warm_2"]["wall_s"]]
    assert doc["summary"]["train_warm_runs_s"] == warm and doc["summary"]["train_warm_s"] == sum(warm) / 2
    assert all(s["rc"] == 0 and s["wall_s"] > 0 for s in steps.values()), steps
    assert steps["train_cold"]["compile_cache"] == steps["train_warm"]["compile_cache"] == "off"  # no compile
    assert steps["train_cold"]["cold_steps_only"] == 2 and "trained to step 2:" in steps["train_cold"]["stdout_tail"]
    assert "trained to step 4:" in steps["train_warm"]["stdout_tail"]  # the warm runs train the settings' steps
    assert doc["samples_aot_vs_eager"]["max_abs_diff_uint8"] == 0
    q = doc["quality"]
    assert q["sampling"] == steps["sample_aot"]["network"] == "eager" and q["num_samples"] == 64
    assert math.isfinite(q["fid"]) and q["fid_floor"] > 0 and q["fid_over_floor"] == q["fid"] / q["fid_floor"]
    figures = {f["check"][0]["key"]: f["value"] for f in json.loads(goal.read_text())["figures"]}
    assert figures["summary.train_warm_s"] == f"{doc['summary']['train_warm_s']:.1f} s"
    assert doc["summary"]["train_cold_s"] is None and "summary.train_cold_s" not in figures  # --cold-steps
    assert figures["quality.fid"] == f"{q['fid']:.2f}"
    from bench import report  # the goal file is one that `python -m bench.report` renders
    rendered = "\n".join(report._render_goal(report.Goal(goal, report._read_goal(goal))))
    assert "## Compile once: no compile wait on a fresh machine" in rendered and figures["quality.fid"] in rendered


def test_bench_distill_quality_smoke_scores_every_student_and_times_onnxruntime(tmp_path):
    from testkit import fake_mnist

    fake_mnist(tmp_path / "data")
    doc = _run_alone("distill_quality.py", tmp_path / "distill.json", f"data.root={tmp_path / 'data'}")
    assert [r["steps"] for r in doc["distill"]["rounds"]] == [2, 1] and "errors" not in doc
    fids = {(r["sampler"], r["network_calls"]): r["fid"] for r in doc["fid"]}
    assert set(fids) == {("student", 2), ("student", 1), ("ddim", 2), ("ddim", 1), ("ddim", 50)}
    assert all(math.isfinite(v) for v in fids.values())
    assert [(r["model"], r["network_calls"]) for r in doc["onnx_cpu"]] == [("student", 2), ("ddim", 50)]
    assert doc["distill"]["seconds_to_goal_steps"] <= doc["distill"]["seconds_all_rounds"]


def test_compile_once_counts_no_sampling_time_as_the_package_s_when_sample_fell_back_to_eager():
    """The H200 run whose package command died (SIGSEGV): `ddpm sample --aot auto` sampled eagerly, so the goal's
    sampling figure is missing, with the reason, not the eager time under the package's name."""
    from bench.compile_once import goal_status, summary_of

    def step(wall, rc=0, **extra):
        return {"wall_s": wall, "rc": rc, **extra}
    doc = {"steps": {"train_cold": step(189.4), "train_warm": step(122.4), "package": step(123.1, rc=-11),
                     "sample_aot": step(30.4, network="eager"), "sample_eager": step(30.1, network="eager")},
           "quality": {"fid_over_floor": 1.88}}
    s = summary_of(doc)
    assert s["sample_aot_s"] is None and s["sample_eager_s"] == 30.1 and s["all_exit_0"] is False
    assert s["aot_package"] == "not written: the package command exited with status -11"
    assert goal_status(s) == "not met: training 122.4 s (goal 90 s), sampling not measured: no AOT package (goal 7 s)"
    doc["steps"]["package"] = step(100.0, record={"written": True})
    doc["steps"]["sample_aot"] = step(6.5, network="aot")
    doc["steps"]["train_warm"] = step(88.0)
    assert summary_of(doc)["sample_aot_s"] == 6.5 and goal_status(summary_of(doc)) == "met"
    doc["steps"]["train_warm_2"], doc["steps"]["train_warm_3"] = step(95.0), step(91.0)  # --warm-runs 3
    assert summary_of(doc)["train_warm_s"] == 91.0 and summary_of(doc)["train_warm_runs_s"] == [88.0, 95.0, 91.0]
    assert goal_status(summary_of(doc)) == "not met: training 91.0 s (goal 90 s)"
    assert summary_of(doc)["train_cold_s"] == 189.4
    doc["steps"]["train_cold"]["cold_steps_only"] = 200  # --cold-steps 200: it only wrote the compile cache
    assert summary_of(doc)["train_cold_s"] is None and summary_of(doc)["train_warm_s"] == 91.0


def test_compile_once_keeps_a_log_line_written_right_after_a_progress_bar_s_redraw():
    """A progress bar redraws with a carriage return and no line break, so a log record that follows it shares its
    line; the timeline and the log keep the record as well as the bar's count."""
    from bench.compile_once import _read_timeline, _split_log

    script = ("import sys; sys.stderr.write('train:  50%|##   | 1/2 [00:01<00:01]INFO ddpm.compile_cache: "
              "compile cache lookups: fx_graph_hit 3\\n\\rtrain: 100%|#####| 2/2 [00:02<00:00]\\nINFO x.y: done\\n')")
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    timeline, text = _read_timeline(proc, 0.0)
    proc.wait()
    assert [entry for _, entry in timeline] == ["progress 1/2", "INFO ddpm.compile_cache: compile cache lookups: "
                                                "fx_graph_hit 3", "progress 2/2", "INFO x.y: done"]
    assert _split_log(text.splitlines()[0]) == ("train:  50%|##   | 1/2 [00:01<00:01]",
                                                "INFO ddpm.compile_cache: compile cache lookups: fx_graph_hit 3")
