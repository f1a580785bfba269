"""Compile once: `ddpm train` and `ddpm sample` on a fresh machine, without and with the compiled artifacts.

Every step is one `ddpm` command in a fresh process with inductor and triton cache folders of its own,
empty at its start (a fresh machine), timed from the command's start to its exit:

    train cold    ddpm train --profile gpu-fast, nothing compiled before: writes <run>/compile_cache/<key>.bin;
                  with --cold-steps N it trains N steps only, to write that file (the cache key holds no step
                  count), and its time is no cold figure
    train warm    the same in a new run folder holding only that compile_cache/ (ddpm.compile_cache); with
                  --warm-runs N, N such runs one after the other (train_warm, train_warm_2, ...), whose median is
                  the warm figure: start-up time varies from run to run on the same machine
    package       the warm checkpoint's sampling network compiled ahead of time (ddpm.aot_package), timed apart
                  (not with --smoke; with --no-package, no `sample aot` either, and the FID is the eager run's)
    sample aot    ddpm sample -n 10000 (DDIM-50) with the package beside the checkpoint (--aot auto); the FID
                  of these images (what `ddpm evaluate` scores) and its floor (10,000 real training images
                  against the test set), in this process
    sample eager  the same with --aot off: the default network, CUDA graphs, no compile

With --bytecode, first the Python environment's bytecode, as `pip install` (make install) writes it at install
time, for an environment that has none (e.g. one installed with PYTHONDONTWRITEBYTECODE=1): compiled into
<work>/pycache, which every step then reads (PYTHONPYCACHEPREFIX). Without it each process compiles the source
of every module it imports (torch's included) anew. The environment's state is recorded either way.

    python bench/compile_once.py --out bench/results/compile_once_h200.json \\
        --goal bench/results/current/compile_once.json --commit <commit of the code that ran>
    python bench/compile_once.py --smoke --out /tmp/compile_once.json   # CPU, a tiny model, no compile
    python bench/compile_once.py --goal-from bench/results/compile_once_h200.json \
        --goal bench/results/current/compile_once.json --commit <commit>  # the goal file of a fetched result

Writes the result JSON after every step (a killed run keeps what it measured); with --goal, also the
goal file of `python -m bench.report`, its figures read from the result.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
GOAL_TRAIN_S, GOAL_SAMPLE_S, GOAL_FID_RATIO = 90.0, 7.0, 2.0
NUM_IMAGES = 10_000
SMOKE = ["runtime.device=cpu", "train.compile=false", "train.cuda_graphs=false", "train.steps=4",
         "train.batch_size=4", "train.log_every=2", "train.checkpoint_every=2", "train.sample_every=0",
         "model.base_channels=8", "model.channel_mult=[1,2]", "model.attention_levels=[]", "model.norm_groups=4",
         "model.num_res_blocks=1", "sampler.steps=2", "sample.num_images=8", "evaluate.num_samples=64",
         "evaluate.batch_size=32"]


def run_step(name: str, argv: list[str], work: Path, timeout: float) -> dict[str, Any]:
    """`argv` in a fresh process with empty inductor/triton caches of its own: wall time, status, log lines, and
    a timeline (seconds from the start at which each log line and each new progress-bar count appeared)."""
    caches = work / "caches" / name
    shutil.rmtree(caches, ignore_errors=True)
    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(caches / "inductor"),
           "TRITON_CACHE_DIR": str(caches / "triton"), "PYTHONUNBUFFERED": "1",
           "PYTHONPATH": os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")])}
    start = time.perf_counter()
    proc = subprocess.Popen(argv, cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    out: list[bytes] = []
    reader = threading.Thread(target=lambda: out.append(proc.stdout.read()), daemon=True)  # type: ignore[union-attr]
    reader.start()
    killer = threading.Timer(timeout, proc.kill)  # a process past its time is killed, which ends its stderr
    killer.start()
    timeline, err = _read_timeline(proc, start)
    rc: int | str = proc.wait()
    killer.cancel()
    if rc != 0 and time.perf_counter() - start >= timeout:
        rc = "timeout"
    wall = time.perf_counter() - start
    reader.join(timeout=10)
    stdout = b"".join(out).decode(errors="replace")
    lines = [_split_log(ln)[1] or ln for ln in err.splitlines()
             if "compile cache" in ln or "AOT package" in ln or "error" in ln.lower()]
    print(f"{name}: {wall:.1f} s, exit {rc}", flush=True)
    return {"argv": argv[2:], "wall_s": wall, "rc": rc, "stdout_tail": stdout[-600:], "log": lines[-8:],
            "timeline": timeline, "stderr_tail": err[-1500:] if rc != 0 else ""}


def _read_timeline(proc: subprocess.Popen, start: float) -> tuple[list[list[Any]], str]:
    """Read the process's stderr to its end: [[seconds, text]] for every log line and every progress-bar line
    whose count changed (tqdm rewrites its line after a carriage return), and the whole text."""
    timeline: list[list[Any]] = []
    text, pending, last_count = [], b"", None
    for chunk in iter(lambda: proc.stderr.read1(1 << 16), b""):  # type: ignore[union-attr]
        now = round(time.perf_counter() - start, 2)
        text.append(chunk)
        *parts, pending = re.split(rb"[\r\n]", pending + chunk)
        for part in parts:
            bar, logged = _split_log(part.decode(errors="replace").strip())
            count = re.search(r"\| *(\d+)/(\d+) \[", bar)
            if count and count.group(1) != last_count:
                last_count = count.group(1)
                timeline.append([now, f"progress {count.group(1)}/{count.group(2)}"])
            elif bar and not count:
                timeline.append([now, bar[:160]])
            if logged:
                timeline.append([now, logged[:300]])
    return timeline[:200], b"".join(text).decode(errors="replace")


def _split_log(line: str) -> tuple[str, str]:
    """(what comes before, the log record) of a line in which a log record follows a progress bar's last
    redraw with no line break between them (a bar redraws without one); ("", line) for a plain log line."""
    found = re.search(r"(DEBUG|INFO|WARNING|ERROR|CRITICAL) [\w.]+: ", line)
    if found is None:
        return line, ""
    return line[:found.start()].strip(), line[found.start():]


def _cache_status(step: dict[str, Any]) -> str:
    for line in step["log"]:
        if "compile cache: loaded" in line:
            return "loaded"
        if "compile cache:" in line and "compiling" in line:
            return "compiled"
    return "off"


def package_argv(checkpoint: Path, settings: list[str]) -> list[str]:
    """The command that builds the AOT package beside `checkpoint` (what `ddpm export` adds on CUDA), with the
    settings of the other commands (["--profile", name, *overrides])."""
    code = ("import json, sys; from ddpm.aot_package import export_package; from ddpm.config import load_config; "
            "cfg = load_config('params.yaml', sys.argv[3], json.loads(sys.argv[4])); "
            "r = export_package(sys.argv[1], sys.argv[2], cfg); "
            "print(json.dumps({k: r.get(k) for k in ('written', 'reason', 'parity', 'machine')}))")
    return [sys.executable, "-c", code, str(checkpoint), str(checkpoint.with_name("model.pt2")), settings[1],
            json.dumps(settings[2:])]


def images_diff(a: Path, b: Path) -> dict[str, float]:
    import numpy as np

    x, y = np.load(a)["images"].astype(np.int16), np.load(b)["images"].astype(np.int16)
    d = np.abs(x - y)
    return {"mean_abs_diff_uint8": float(d.mean()), "max_abs_diff_uint8": int(d.max()),
            "frac_pixels_differ": float((d > 0).mean())}


def fid_floor_of(profile: str, overrides: list[str], n: int) -> float:
    from ddpm.config import load_config
    from ddpm.evaluate import fid_floor

    return float(fid_floor(load_config(str(REPO_ROOT / "params.yaml"), profile, overrides), n=n))


class Bench:
    def __init__(self, args: argparse.Namespace):
        self.args, self.work = args, Path(args.work)
        self.ddpm = [sys.executable, "-m", "ddpm.cli"]
        self.settings = ["--profile", args.profile, *(SMOKE if args.smoke else []), *args.overrides]
        self.n = 64 if args.smoke else NUM_IMAGES
        self.doc: dict[str, Any] = {"what": "compile once", "profile": args.profile, "smoke": args.smoke,
                                    "argv": sys.argv, "date": _dt.date.today().isoformat(), "steps": {}}

    def save(self) -> None:
        out = Path(self.args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(self.doc, indent=1, default=str) + "\n")

    def step(self, name: str, argv: list[str], timeout: float, **record: Any) -> dict[str, Any]:
        """Run one step and save the result with it and `record`'s entries."""
        self.doc["steps"][name] = result = {**run_step(name, argv, self.work, timeout), **record}
        self.save()
        return result

    def train(self) -> Path:
        cold, warm = self.work / "cold", self.work / "warm"
        steps = [f"train.steps={self.args.cold_steps}"] if self.args.cold_steps else []
        self.step("train_cold", [*self.ddpm, "train", *self.settings, *steps, f"train.out_dir={cold}"], 500,
                  cold_steps_only=self.args.cold_steps)
        for i in range(1, self.args.warm_runs + 1):
            name, folder = ("train_warm", warm) if i == 1 else (f"train_warm_{i}", self.work / f"warm_{i}")
            if (cold / "compile_cache").is_dir():
                shutil.copytree(cold / "compile_cache", folder / "compile_cache")
            self.step(name, [*self.ddpm, "train", *self.settings, f"train.out_dir={folder}"], 500)
        for name in [n for n in self.doc["steps"] if n.startswith("train_")]:
            self.doc["steps"][name]["compile_cache"] = _cache_status(self.doc["steps"][name])
        return warm / "checkpoint.pt"

    def sample(self, ckpt: Path) -> None:
        build, with_aot = not (self.args.smoke or self.args.no_package), not self.args.no_package
        if build:  # ddpm export builds it on CUDA; timed apart, it is no part of `ddpm sample`
            # tuned for the batch the sample commands run (the package's example batch: sample.batch_size)
            sized = [*self.settings, f"sample.batch_size={self.args.batch_size}"]
            step = self.step("package", package_argv(ckpt, sized), 400)
            step["record"] = json.loads(step["stdout_tail"].strip().splitlines()[-1]) if step["rc"] == 0 else None
        elif self.args.no_package:  # without --no-package, summary's package_outcome says why none was built
            self.doc["package_skipped"] = "not built: --no-package"
        common = [*self.settings, f"sample.batch_size={self.args.batch_size}", "--checkpoint", str(ckpt), "-n",
                  str(self.n), "--sampler", "ddim", "--steps", "50"]
        # The package's run first: the eager one, whose figure the goal starts from, is the one to lose to a time limit.
        runs = (("sample_aot", "auto"), ("sample_eager", "off")) if with_aot else (("sample_eager", "off"),)
        for name, aot in runs:
            step = self.step(name, [*self.ddpm, "sample", *common, "--aot", aot, "--out", str(self.work / name)], 300)
            step["network"] = "aot" if "model.pt2" in step["stdout_tail"] else "eager"
            if name == runs[0][0]:
                self.quality(self.work / name / "samples.npz", step["network"])
        if with_aot:
            try:
                self.doc["samples_aot_vs_eager"] = images_diff(self.work / "sample_aot" / "samples.npz",
                                                               self.work / "sample_eager" / "samples.npz")
            except OSError as exc:
                self.doc["samples_aot_vs_eager"] = {"error": str(exc)}
        self.save()

    def quality(self, samples: Path, network: str) -> None:
        """FID of the 10,000 DDIM-50 samples of the warm checkpoint (what `ddpm evaluate` scores), and its floor."""
        import numpy as np

        from ddpm.config import load_config
        from ddpm.evaluate import fid_floor, score_images

        if not samples.is_file():
            return
        cfg = load_config(str(REPO_ROOT / "params.yaml"), self.args.profile,
                          [*(SMOKE if self.args.smoke else []), *self.args.overrides])
        images = np.load(samples)["images"]
        fid, floor = float(score_images(images, cfg)["fid"]), float(fid_floor(cfg, n=len(images)))
        self.doc["quality"] = {"fid": fid, "fid_floor": floor, "fid_over_floor": fid / floor,
                               "num_samples": len(images), "sampling": network}
        self.save()

    def summarise(self) -> None:
        self.doc["summary"] = summary_of(self.doc)
        self.save()


def summary_of(doc: dict[str, Any]) -> dict[str, Any]:
    """The figures of a result: the sampling time with the package only when `ddpm sample` used one (it falls back
    to the eager network, with the same command, when there is none), and why there is none."""
    s = doc["steps"]
    aot = s.get("sample_aot", {})
    runs = [step for name, step in s.items() if name.startswith("train_warm")]
    warm = [step["wall_s"] for step in runs if step["rc"] == 0] or [step["wall_s"] for step in runs]
    cold = s["train_cold"]
    return {"train_cold_s": None if cold.get("cold_steps_only") else cold["wall_s"],
            "train_warm_s": statistics.median(warm),
            "train_warm_runs_s": warm,
            "sample_eager_s": s.get("sample_eager", {}).get("wall_s"),
            "sample_aot_s": aot.get("wall_s") if aot.get("network") == "aot" else None,
            "aot_package": doc.get("package_skipped") or package_outcome(s.get("package")),
            "fid_over_floor": doc.get("quality", {}).get("fid_over_floor"),
            "goal_train_s": GOAL_TRAIN_S, "goal_sample_s": GOAL_SAMPLE_S, "goal_fid_ratio": GOAL_FID_RATIO,
            "all_exit_0": all(step["rc"] == 0 for step in s.values())}


def package_outcome(step: dict[str, Any] | None) -> str:
    """"written", or why no package was there to sample with."""
    if step is None:
        return "not built (no CUDA: packages are built on the GPU they are for)"
    if step["rc"] != 0:
        return f"not written: the package command exited with status {step['rc']}"
    record = step.get("record") or {}
    return "written" if record.get("written") else f"not written: {record.get('reason')}"


def _figure(what: str, value: float | None, unit: str, key: str, results: str, digits: int = 1,
            headline: str | None = None) -> dict[str, Any] | None:
    if value is None:  # a step the run did not reach, or a cold run of --cold-steps
        return None
    shown = f"{value:.{digits}f}"
    fig = {"what": what, "value": f"{shown}{unit}", "run": "bench", "cited": f"{results} {key}",
           "check": [{"file": results, "key": key, "expect": shown}]}
    return {**fig, "headline": headline} if headline else fig


def goal_status(summary: dict[str, Any]) -> str:
    """"met", or "not met: " and each figure over its goal (a figure the run did not reach counts as over)."""
    checks = (("training", summary["train_warm_s"], GOAL_TRAIN_S, " s", "not measured"),
              ("sampling", summary["sample_aot_s"], GOAL_SAMPLE_S, " s",
               "not measured: no AOT package"),
              ("FID over its floor", summary["fid_over_floor"], GOAL_FID_RATIO, "x", "not measured"))
    misses = [f"{what} {missing if value is None else f'{value:.1f}{unit}'} (goal {goal:g}{unit})"
              for what, value, goal, unit, missing in checks if value is None or not value <= goal]
    return "met" if not misses else "not met: " + ", ".join(misses)


def experiment_page(doc: dict[str, Any]) -> str:
    """The dated page that tells the run's story: docs/experiments/<date>-compile-once-<card>.md (e.g. h200)."""
    card = next((w for w in doc["environment"]["device"].lower().split() if w[:1] in "ahbl" and w[1:].isdigit()),
                doc["environment"]["device"].lower().replace(" ", "-"))
    return f"docs/experiments/{doc['date']}-compile-once-{card}.md"


def write_goal(path: Path, doc: dict[str, Any], results: Path, commit: str | None,
               pages: list[str] | None = None) -> None:
    """The goal file of `python -m bench.report`, every figure checked against `results`."""
    results = results.resolve()
    res = results.relative_to(REPO_ROOT) if results.is_relative_to(REPO_ROOT) else results
    r, s, q, env = str(res), doc["summary"], doc.get("quality", {}), doc["environment"]
    figures = [
        _figure("`ddpm train --profile gpu-fast`, cold (no artifact), wall s", s["train_cold_s"], " s",
                "summary.train_cold_s", r),
        _figure("the same, warm (compile artifact present), wall s" + (
                    f", the median of {len(s['train_warm_runs_s'])} runs" if len(s.get("train_warm_runs_s", [])) > 1
                    else ""), s["train_warm_s"], " s", "summary.train_warm_s", r, headline="warm"),
        _figure("10,000 DDIM-50 images, `ddpm sample`, eager (CUDA graphs), wall s", s["sample_eager_s"], " s",
                "summary.sample_eager_s", r),
        _figure("the same with the AOT package, wall s", s["sample_aot_s"], " s", "summary.sample_aot_s", r,
                headline="AOT"),
        _figure("FID of the warm run's checkpoint (10,000 DDIM-50 samples)", q.get("fid"), "", "quality.fid", r, 2),
        _figure("FID over its floor", s["fid_over_floor"], "x", "summary.fid_over_floor", r, 2,
                headline="FID/floor"),
    ]
    figures = [f for f in figures if f is not None]
    goal = {
        "order": 13, "title": "Compile once: no compile wait on a fresh machine",
        "goal": f"one H100/H200, empty inductor and triton caches, artifacts present: `ddpm train --profile gpu-fast` "
                f"to a checkpoint with FID at most {GOAL_FID_RATIO:g}x its floor in at most {GOAL_TRAIN_S:g} s of "
                f"wall time, and 10,000 DDIM-50 MNIST images through `ddpm sample` in at most {GOAL_SAMPLE_S:g} s "
                f"including loading, with no compile",
        "status": goal_status(s),
        "note": "Fresh processes, timed from start to exit; the warm run loads the cold run's cache file; a "
                "sampling time is the package's only when `ddpm sample` used one.",
        "runs": {"bench": {"card": env["device"], "date": doc["date"], "commit": commit or "uncommitted",
                           "command": " ".join(["python3 bench/compile_once.py", *doc["argv"][1:]]),
                           "versions": f"torch {env['torch']}, CUDA {env['cuda']}, triton {env['triton']}",
                           "results": r}},
        "figures": figures,
        "experiments": pages or [experiment_page(doc)],
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(goal, indent=1) + "\n")


def bytecode_state() -> dict[str, Any]:
    """Whether this Python finds compiled bytecode for torch's modules, and where it would write its own."""
    import importlib.util

    import torch

    cached = Path(importlib.util.cache_from_source(torch.__file__))
    return {"torch_bytecode_found": cached.is_file(), "dont_write_bytecode": bool(sys.flags.dont_write_bytecode),
            "pycache_prefix": sys.pycache_prefix}


def compile_bytecode(work: Path) -> dict[str, Any]:
    """Compile the bytecode of every installed package into work/pycache and point this process's children
    at it, as `pip install` would have written it beside the sources."""
    import sysconfig

    prefix = work / "pycache"
    os.environ["PYTHONPYCACHEPREFIX"] = sys.pycache_prefix = str(prefix)
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "compileall", "-q", "-j", "0", sysconfig.get_paths()["purelib"],
                           sysconfig.get_paths()["platlib"]], capture_output=True, env=os.environ)
    return {"pycache_prefix": str(prefix), "wall_s": time.perf_counter() - start, "rc": done.returncode}


def environment() -> dict[str, Any]:
    import torch

    cuda = torch.cuda.is_available()
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    return {"torch": torch.__version__, "cuda": torch.version.cuda if cuda else None, "triton": triton_version,
            "device": torch.cuda.get_device_name() if cuda else "cpu", "python": sys.version.split()[0],
            "bytecode": bytecode_state()}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", help="the result JSON")
    p.add_argument("--goal-from", default=None, metavar="RESULT",
                   help="run nothing: write --goal from this result JSON (e.g. one fetched from the GPU machine)")
    p.add_argument("--goal", default=None, help="also write this goal file (bench/results/current/...)")
    p.add_argument("--commit", default=None, help="the commit of the code that ran (for the goal file)")
    p.add_argument("--page", action="append", default=None,
                   help="a dated page, repeatable (default: docs/experiments/<date>-compile-once-<card>.md)")
    p.add_argument("--work", default=None, help="run folders and caches (default: a folder beside --out)")
    p.add_argument("--profile", default="gpu-fast")
    p.add_argument("--batch-size", type=int, default=1000, help="sample.batch_size of both sample commands")
    p.add_argument("--smoke", action="store_true", help="CPU, a tiny model, a few steps, no compile")
    p.add_argument("--no-package", action="store_true",
                   help="no AOT package and no `ddpm sample` with one (where torch cannot load packages)")
    p.add_argument("--warm-runs", type=int, default=1, metavar="N",
                   help="warm training runs one after another; the warm figure is their median")
    p.add_argument("--cold-steps", type=int, default=None, metavar="N",
                   help="the cold run trains N steps only, to write the compile cache (no cold figure)")
    p.add_argument("--bytecode", action="store_true",
                   help="first compile the environment's bytecode into <work>/pycache, as pip install does")
    p.add_argument("overrides", nargs="*", help="settings for every command, e.g. data.root=...")
    args = p.parse_args(argv)
    if args.goal_from:
        if not args.goal:
            p.error("--goal-from needs --goal, the goal file to write")
        result = Path(args.goal_from)
        doc = json.loads(result.read_text())
        doc["summary"] = summary_of(doc)  # derived from the steps: as this version of the script reads them
        result.write_text(json.dumps(doc, indent=1, default=str) + "\n")
        write_goal(Path(args.goal), doc, result.resolve(), args.commit, args.page)
        return 0
    if not args.out:
        p.error("--out is required: the result JSON to write")
    if args.warm_runs < 1:
        p.error(f"--warm-runs {args.warm_runs}: give at least 1 warm run")
    if args.cold_steps is not None and args.cold_steps < 1:
        p.error(f"--cold-steps {args.cold_steps}: give at least 1 step")
    if args.smoke and args.profile == "gpu-fast":
        args.profile = "cpu"
    args.work = args.work or str(Path(args.out).with_suffix("")) + "_work"
    shutil.rmtree(args.work, ignore_errors=True)
    bench = Bench(args)
    if args.bytecode:  # compileall reports modules that do not compile (e.g. test files): its status is kept
        bench.doc["bytecode"] = compile_bytecode(Path(args.work))
    bench.doc["environment"] = environment()
    ckpt = bench.train()
    bench.sample(ckpt)
    bench.summarise()
    if args.goal:
        write_goal(Path(args.goal), bench.doc, Path(args.out), args.commit, args.page)
    print(json.dumps(bench.doc["summary"], indent=1))
    return 0 if bench.doc["summary"]["all_exit_0"] else 1


if __name__ == "__main__":
    sys.exit(main())
