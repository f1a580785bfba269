"""CPU thread defaults (ddpm.threads): set where the user set nothing, overridable, a bad value is one line."""

from __future__ import annotations

import os
import subprocess
import sys
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
    assert threads.apply_thread_defaults(env) == {"OMP_NUM_THREADS": "2"} and env == {"OMP_NUM_THREADS": "2"}
    monkeypatch.setattr(threads, "idle_cpus", lambda interval=0.25: 1.02)  # a busy process beside it
    env = {}
    assert threads.apply_thread_defaults(env) == {"OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE"}
    env = {"OMP_NUM_THREADS": "1"}  # set by the user or inherited: kept, and nothing measured
    monkeypatch.setattr(threads, "idle_cpus", lambda interval=0.25: pytest.fail("measured again"))
    threads.apply_thread_defaults(env)
    assert env == {"OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE"}
    env = {"DDPM_CPU_THREADS": "1", "OMP_WAIT_POLICY": "ACTIVE"}
    threads.apply_thread_defaults(env)
    assert env == {"DDPM_CPU_THREADS": "1", "OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "ACTIVE"}
    env = {"DDPM_CPU_THREADS": "off"}
    assert threads.apply_thread_defaults(env) == {} and env == {"DDPM_CPU_THREADS": "off"}


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
    assert 1 <= int(got[0]) <= cpus and got[1] == ("PASSIVE" if int(got[0]) < cpus else "-")
    got = subprocess.run(run, cwd=REPO, env=_clean_env(DDPM_CPU_THREADS="1"), capture_output=True, text=True,
                         check=True).stdout.split()
    assert got == ["1", "PASSIVE"]


def test_the_cli_refuses_a_bad_value_with_one_line_and_status_2():
    proc = subprocess.run([sys.executable, "-m", "ddpm.cli", "data"], cwd=REPO, env=_clean_env(DDPM_CPU_THREADS="x"),
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "ddpm data: error: DDPM_CPU_THREADS: 'x' is not allowed; use auto, off or a thread count > 0 "
        "(e.g. DDPM_CPU_THREADS=1)"]
