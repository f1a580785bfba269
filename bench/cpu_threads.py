"""CPU training throughput under thread settings, alone and beside a competing CPU load.

Each measurement is a short `ddpm train --profile cpu` run in a fresh process (the thread settings
are read when the OpenMP runtime starts), on the real MNIST files in data/, with the environment of
one setting:

    library   DDPM_CPU_THREADS=off: torch's and OpenMP's own defaults (what `ddpm` did before it set any)
    default   nothing set: what `ddpm` and the flows choose (ddpm.threads)
    1-passive, 2-passive, 2-active, 1-default
              OMP_NUM_THREADS and OMP_WAIT_POLICY as named (default: OpenMP's own wait policy)

and a load of `--load` busy-looping processes started before it and stopped after it. images/s is
the mean of loss.csv's images_per_sec rows after the first (which holds the start-up). Settings and
loads are interleaved, round after round, so that a change in the shared machine's other work spreads
over all of them instead of falling on one.

With --load-for S the busy processes stop S seconds after the `ddpm train` process starts (a load that
was there at its start-up and then went away), and images/s is the mean of the rows logged after
S + 2 * RECHECK_S seconds of training (ddpm.threads.ThreadWatch has then looked at the quiet machine; the
seconds of a row are those of its training steps, summed from loss.csv, which leave out the process's
start-up, so the cut is later than it needs to be); every row is recorded.

    python bench/cpu_threads.py --out bench/results/cpu_threads_<machine>.json
    python bench/cpu_threads.py --settings library default --loads 0 1 --repeats 3 --steps 20
    python bench/cpu_threads.py --settings default 1-passive --loads 1 --load-for 20 --steps 500 --log-every 20
"""

from __future__ import annotations

import argparse
import csv
import datetime as _dt
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))
from ddpm.config import load_config  # noqa: E402
from ddpm.threads import RECHECK_S  # noqa: E402
SETTINGS = {
    "library": {"DDPM_CPU_THREADS": "off"},
    "default": {},
    "1-passive": {"OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE"},
    "2-passive": {"OMP_NUM_THREADS": "2", "OMP_WAIT_POLICY": "PASSIVE"},
    "2-active": {"OMP_NUM_THREADS": "2", "OMP_WAIT_POLICY": "ACTIVE"},
    "1-default": {"OMP_NUM_THREADS": "1"},
}
THREAD_VARS = ("OMP_NUM_THREADS", "OMP_WAIT_POLICY", "MKL_NUM_THREADS", "DDPM_CPU_THREADS")
BUSY = "while True:\n    pass\n"


def train_once(setting: str, steps: int, log_every: int, out: Path, data_root: str | None) -> list[dict]:
    """loss.csv's rows of one short training run under `setting`: step, images/s, seconds since the start."""
    env = {k: v for k, v in os.environ.items() if k not in THREAD_VARS}
    env.update(SETTINGS[setting])
    cmd = [sys.executable, "-m", "ddpm.cli", "train", "--profile", "cpu", f"train.steps={steps}",
           f"train.log_every={log_every}", f"train.checkpoint_every={steps}", f"train.out_dir={out}",
           "sampler.name=ddim", "sampler.steps=2",  # the final grid: seconds, not minutes
           *([f"data.root={data_root}"] if data_root else []), "--overwrite"]
    done = subprocess.run(cmd, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=1200)
    if done.returncode != 0:
        raise SystemExit(f"`{' '.join(cmd)}` exited with status {done.returncode}: {done.stderr.strip()[-2000:]}")
    with open(out / "loss.csv", newline="") as f:
        rows = [{"step": int(r["step"]), "images_per_sec": float(r["images_per_sec"])} for r in csv.DictReader(f)]
    at, batch = 0.0, load_config(str(REPO_ROOT / "params.yaml"), "cpu").train.batch_size
    for r, prev in zip(rows, [0, *[r["step"] for r in rows]]):  # a row's images/s covers the steps since the last
        at += (r["step"] - prev) * batch / r["images_per_sec"]
        r["train_s"] = round(at, 1)
    rows[0]["threads_changed"] = [line for line in done.stderr.splitlines() if "CPU threads" in line]
    return rows


def measure(setting: str, load: int, steps: int, log_every: int, out: Path, data_root: str | None,
            load_for: float | None = None) -> tuple[float, list[dict]]:
    """(images/s, loss.csv's rows) beside `load` busy processes, stopped after `load_for` s (else at the end)."""
    busy = [subprocess.Popen([sys.executable, "-c", BUSY]) for _ in range(load)]

    def stop() -> None:
        for p in busy:
            p.kill()
            p.wait()
    timer = threading.Timer(load_for, stop) if load_for is not None else None
    try:
        time.sleep(0.5 if load else 0)
        if timer:
            timer.start()
        rows = train_once(setting, steps, log_every, out, data_root)
    finally:
        if timer:
            timer.cancel()
        stop()
    if load_for is None:
        return statistics.mean(r["images_per_sec"] for r in rows[1:] or rows), rows
    late = [r["images_per_sec"] for r in rows if r["train_s"] > load_for + 2 * RECHECK_S]
    if not late:
        raise SystemExit(f"no row logged after {load_for + 2 * RECHECK_S:.0f} s of training: raise --steps")
    return statistics.mean(late), rows


def environment() -> dict[str, object]:
    """What ran where: the commit (and whether tracked files differed), versions, the CPU, the load before."""
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=REPO_ROOT, capture_output=True, text=True).stdout.strip()

    model = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                  if line.startswith("model name")), platform.processor()) if Path("/proc/cpuinfo").exists() else ""
    import torch

    return {"git_commit": git("rev-parse", "HEAD"), "git_dirty": bool(git("status", "--porcelain", "-uno")),
            "torch": torch.__version__, "python": platform.python_version(), "cpu_model": model,
            "cpus": len(os.sched_getaffinity(0)), "load_average_before": list(os.getloadavg())}


def summary(values: list[float]) -> dict[str, float]:
    return {"median": round(statistics.median(values), 1), "min": round(min(values), 1),
            "max": round(max(values), 1), "runs": [round(v, 1) for v in values]}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--settings", nargs="+", choices=list(SETTINGS), default=["library", "default", "1-passive",
                                                                             "2-passive"])
    p.add_argument("--loads", nargs="+", type=int, default=[0, 1], help="busy processes beside the run")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--log-every", type=int, default=10)
    p.add_argument("--load-for", type=float, default=None, metavar="S",
                   help="stop the busy processes S seconds after the run starts (default: at its end)")
    p.add_argument("--data-root", default=None, help="data.root holding mnist/ (default: params.yaml's)")
    p.add_argument("--out", type=Path, default=None, help="results JSON")
    args = p.parse_args(argv)
    got: dict[str, dict[str, list[float]]] = {f"load{n}": {s: [] for s in args.settings} for n in args.loads}
    series: dict[str, list[list[dict]]] = {f"load{n} {s}": [] for n in args.loads for s in args.settings}
    started, env = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"), environment()
    with tempfile.TemporaryDirectory(prefix="cpu-threads-") as tmp:
        for r in range(args.repeats):
            for load in args.loads:
                for s in args.settings:
                    ips, rows = measure(s, load, args.steps, args.log_every, Path(tmp) / "run", args.data_root,
                                        args.load_for)
                    got[f"load{load}"][s].append(ips)
                    series[f"load{load} {s}"].append(rows)
                    print(f"round {r + 1}: load {load}, {s:10s} {ips:7.1f} img/s", flush=True)
    result = {
        "what": "ddpm train --profile cpu images/s (mean of loss.csv rows after the first; with load_for_s, of the "
                "rows logged after load_for_s + 2 * RECHECK_S s of training), per thread setting and number of "
                "busy-looping processes beside it (with load_for_s, stopped that many seconds after the run started)",
        "command": "python bench/cpu_threads.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "started_utc": started, **env, "steps": args.steps, "load_for_s": args.load_for,
        "settings": {s: SETTINGS[s] for s in args.settings},
        "images_per_sec": {k: {s: summary(v) for s, v in by.items()} for k, by in got.items()},
        **({"rows": series} if args.load_for is not None else {}),
        "note": "a shared machine: other users' work adds an unknown load to every row",
    }
    text = json.dumps(result, indent=2) + "\n"
    if args.out:
        args.out.write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
