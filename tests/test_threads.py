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


def test_defaults_fill_only_what_the_user_left_unset():
    auto = str(threads.auto_threads(threads.usable_cpus()))
    env: dict[str, str] = {}
    assert threads.apply_thread_defaults(env) == {"OMP_NUM_THREADS": auto, "OMP_WAIT_POLICY": "PASSIVE"}
    assert env == {"OMP_NUM_THREADS": auto, "OMP_WAIT_POLICY": "PASSIVE"}
    env = {"OMP_NUM_THREADS": "3"}
    threads.apply_thread_defaults(env)
    assert env == {"OMP_NUM_THREADS": "3", "OMP_WAIT_POLICY": "PASSIVE"}
    env = {"DDPM_CPU_THREADS": "4", "OMP_WAIT_POLICY": "ACTIVE"}
    threads.apply_thread_defaults(env)
    assert env == {"DDPM_CPU_THREADS": "4", "OMP_NUM_THREADS": "4", "OMP_WAIT_POLICY": "ACTIVE"}
    env = {"DDPM_CPU_THREADS": "off"}
    assert threads.apply_thread_defaults(env) == {} and env == {"DDPM_CPU_THREADS": "off"}


def test_auto_takes_half_the_cpus_and_at_least_one():
    assert [threads.auto_threads(n) for n in (1, 2, 3, 8)] == [1, 1, 1, 4]


@pytest.mark.parametrize("value", ["0", "-1", "many", "2.5"])
def test_a_bad_value_is_a_config_error_naming_the_variable(value):
    with pytest.raises(ConfigError, match=f"DDPM_CPU_THREADS: '{value}' is not allowed"):
        threads.cpu_threads({"DDPM_CPU_THREADS": value})


def _clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in THREAD_VARS}
    return {**env, **extra}


def test_the_pipeline_process_runs_torch_with_the_defaults_and_the_user_overrides_them():
    probe = "import flows, torch, os; print(torch.get_num_threads(), os.environ['OMP_WAIT_POLICY'])"
    run = [sys.executable, "-c", probe]
    got = subprocess.run(run, cwd=REPO, env=_clean_env(), capture_output=True, text=True, check=True).stdout.split()
    assert got == [str(threads.auto_threads(threads.usable_cpus())), "PASSIVE"]
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
