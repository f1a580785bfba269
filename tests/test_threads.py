"""CPU thread defaults (ddpm.threads): set where the user set nothing, overridable, a bad value is one line."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ddpm import threads
from ddpm.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]
THREAD_VARS = ("OMP_NUM_THREADS", "OMP_WAIT_POLICY", "DDPM_CPU_THREADS")


def test_defaults_fill_only_what_the_user_left_unset(monkeypatch):
    monkeypatch.setattr(threads, "usable_cpus", lambda: 2)
    monkeypatch.setattr(threads, "idle_cpus", lambda interval=0.25: 1.97)  # alone: both CPUs, the libraries' wait
    env: dict[str, str] = {}
    assert threads.apply_thread_defaults(env) == env == {"OMP_NUM_THREADS": "2"}
    monkeypatch.setattr(threads, "idle_cpus", lambda interval=0.25: 1.02)  # a busy process beside it
    env = {}
    assert threads.apply_thread_defaults(env) == {"OMP_NUM_THREADS": "1"}  # one thread: no team to wait for
    monkeypatch.setattr(threads, "usable_cpus", lambda: 8)
    monkeypatch.setattr(threads, "idle_cpus", lambda interval=0.25: 5.1)  # several threads beside other work
    env = {}
    assert threads.apply_thread_defaults(env) == {"OMP_NUM_THREADS": "5", "OMP_WAIT_POLICY": "PASSIVE"}
    env = {"OMP_NUM_THREADS": "1"}  # set by the user or inherited: kept, and nothing measured
    monkeypatch.setattr(threads, "idle_cpus", lambda interval=0.25: pytest.fail("measured again"))
    threads.apply_thread_defaults(env)
    assert env == {"OMP_NUM_THREADS": "1"}
    env = {"DDPM_CPU_THREADS": "1", "OMP_WAIT_POLICY": "ACTIVE"}
    threads.apply_thread_defaults(env)
    assert env == {"DDPM_CPU_THREADS": "1", "OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "ACTIVE"}
    env = {"DDPM_CPU_THREADS": "off"}
    assert threads.apply_thread_defaults(env) == {} and env == {"DDPM_CPU_THREADS": "off"}


class Ticks:
    """A machine of 2 CPUs at 100 ticks a second each, as /proc/stat and /proc/self/stat would count it."""

    def __init__(self):
        self.now, self.total, self.idle, self.own = 0.0, 0, 0, 0

    def run(self, seconds: float, ours: float, others: float) -> None:
        """`seconds` pass with `ours` and `others` CPUs busy."""
        ticks = int(100 * seconds)
        self.now += seconds
        self.total += 2 * ticks
        self.own += int(ours * ticks)
        self.idle += int((2 - ours - others) * ticks)

    def read(self) -> tuple[int, int, int]:
        return self.total, self.idle, self.own


@pytest.fixture
def one_torch_thread_after():
    import torch

    saved = torch.get_num_threads()
    yield torch
    torch.set_num_threads(saved)


def test_a_long_run_follows_the_cpus_that_other_processes_leave_idle(one_torch_thread_after):
    torch, ticks = one_torch_thread_after, Ticks()
    torch.set_num_threads(1)  # measured at start-up beside a process that then ends
    watch = threads.ThreadWatch(every_s=30, read=ticks.read, clock=lambda: ticks.now, cpus=2)
    ticks.run(10, ours=1.0, others=0.0)
    assert watch.check() is None and torch.get_num_threads() == 1  # not yet: a look spans every_s at least
    ticks.run(25, ours=1.0, others=0.0)  # the first log step after every_s
    assert watch.check() == "CPU threads 1 -> 2: other processes kept about 0.0 of 2 CPUs busy over the last 35 s"
    assert torch.get_num_threads() == 2
    ticks.run(30, ours=2.0, others=0.0)  # our own two threads are not someone else's load
    assert watch.check() is None and torch.get_num_threads() == 2
    ticks.run(30, ours=1.0, others=1.0)  # another process takes a core
    assert watch.check() == "CPU threads 2 -> 1: other processes kept about 1.0 of 2 CPUs busy over the last 30 s"
    assert torch.get_num_threads() == 1
    ticks.run(30, ours=1.0, others=0.5)  # half a core still busy elsewhere: one thread, no waiting for a core
    assert watch.check() is None and torch.get_num_threads() == 1
    torch.set_num_threads(2)  # someone else's choice (e.g. a caller's torch.set_num_threads) is kept
    ticks.run(30, ours=1.0, others=1.0)
    assert watch.check() is None and torch.get_num_threads() == 2
    ticks.run(30, ours=2.0, others=0.0)
    assert watch.check() is None and not watch.active


def test_only_a_count_this_process_measured_is_watched_in_eager_cpu_work(monkeypatch, one_torch_thread_after):
    torch = one_torch_thread_after
    monkeypatch.setattr(threads, "usable_cpus", lambda: 2)
    monkeypatch.setattr(threads, "idle_cpus", lambda interval=0.25: 1.97)
    for var in ("OMP_NUM_THREADS", "DDPM_CPU_THREADS"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(threads, "_measured", None)
    assert threads.apply_thread_defaults() == {"OMP_NUM_THREADS": "2"} and torch.get_num_threads() == 2
    assert isinstance(threads.watch_threads("cpu"), threads.ThreadWatch)
    assert threads.watch_threads("cuda") is None
    assert threads.watch_threads("cpu", compiled=True) is None  # inductor's CPU kernels hold the count
    monkeypatch.setenv("DDPM_CPU_THREADS", "2")  # the user's count
    assert threads.watch_threads("cpu") is None
    monkeypatch.delenv("DDPM_CPU_THREADS")
    torch.set_num_threads(1)  # set in process after the measurement (the tests' own one-thread fixtures)
    assert threads.watch_threads("cpu") is None
    monkeypatch.setattr(threads, "_measured", None)  # inherited from a parent (OMP_NUM_THREADS set), or the user's
    torch.set_num_threads(2)
    threads.apply_thread_defaults()
    assert threads.watch_threads("cpu") is None


def test_training_looks_again_at_every_log_step_and_logs_what_changed(tmp_path, monkeypatch, caplog):
    import ddpm.train as train_mod
    from ddpm.config import load_config
    from test_train import _fake_images

    class Watch:
        def __init__(self):
            self.calls = 0

        def check(self):
            self.calls += 1
            return "CPU threads 1 -> 2: a test's line" if self.calls == 2 else None
    made: list[tuple[str, bool, Watch]] = []

    def watch_threads(device_type, compiled=False):
        made.append((device_type, compiled, Watch()))
        return made[-1][2]
    monkeypatch.setattr(train_mod, "watch_threads", watch_threads)
    monkeypatch.setattr(train_mod, "load_images", _fake_images)
    cfg = load_config(REPO / "params.yaml", "cpu", [
        f"train.out_dir={tmp_path}", "train.steps=6", "train.batch_size=4", "train.log_every=2",
        "train.checkpoint_every=6", "diffusion.timesteps=20", "model.base_channels=8", "model.channel_mult=[1,2]",
        "model.attention_levels=[]", "model.norm_groups=4", "sampler.steps=2", "sample.num_images=4"])
    with caplog.at_level("INFO", logger="ddpm.train"):
        train_mod.train(cfg)
    ((device, compiled, watch),) = made
    assert (device, compiled, watch.calls) == ("cpu", False, 3)  # steps 2, 4 and 6
    assert [r.getMessage() for r in caplog.records if "CPU threads" in r.getMessage()] == [
        "CPU threads 1 -> 2: a test's line"]


def test_own_ticks_count_this_process_s_work():
    start, t0 = threads.own_jiffies(), time.process_time()
    while time.process_time() - t0 < 0.3:
        pass
    assert threads.own_jiffies() - start >= 0.2 * os.sysconf("SC_CLK_TCK")


def test_auto_takes_the_idle_cpus_and_at_least_one():
    assert [threads.auto_threads(2, idle) for idle in (1.97, 1.75, 1.02, 0.1)] == [2, 2, 1, 1]
    assert threads.auto_threads(8, 5.2) == 5 and threads.auto_threads(4, None) == 4


def test_idle_cpus_reads_the_machine():
    idle = threads.idle_cpus(0.05)
    assert idle is None or 0.0 <= idle <= (os.cpu_count() or 1) + 1e-6


@pytest.mark.parametrize("value", ["0", "-1", "many", "2.5"])
def test_a_bad_value_is_a_config_error_naming_the_variable(value):
    with pytest.raises(ConfigError, match=f"DDPM_CPU_THREADS: '{value}' is not allowed"):
        threads.cpu_threads({"DDPM_CPU_THREADS": value})


def _clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in THREAD_VARS}
    return {**env, **extra}


def test_the_pipeline_process_runs_torch_with_the_defaults_and_the_user_overrides_them():
    probe = "import flows, torch, os; print(torch.get_num_threads(), os.environ.get('OMP_WAIT_POLICY', '-'))"
    run = [sys.executable, "-c", probe]
    got = subprocess.run(run, cwd=REPO, env=_clean_env(), capture_output=True, text=True, check=True).stdout.split()
    cpus = threads.usable_cpus()
    assert 1 <= int(got[0]) <= cpus and got[1] == ("PASSIVE" if 1 < int(got[0]) < cpus else "-")
    got = subprocess.run(run, cwd=REPO, env=_clean_env(DDPM_CPU_THREADS="1"), capture_output=True, text=True,
                         check=True).stdout.split()
    assert got == ["1", "-"]


def test_the_cli_refuses_a_bad_value_with_one_line_and_status_2():
    proc = subprocess.run([sys.executable, "-m", "ddpm.cli", "data"], cwd=REPO, env=_clean_env(DDPM_CPU_THREADS="x"),
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "ddpm data: error: DDPM_CPU_THREADS: 'x' is not allowed; use auto, off or a thread count > 0 "
        "(e.g. DDPM_CPU_THREADS=1)"]
