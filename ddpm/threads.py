"""CPU threads for PyTorch and OpenMP: a default that is fast alone and holds up beside other work.

OpenMP's own defaults (one thread per core; idle threads spin before they sleep) suit a machine the
run has to itself, and collapse when another process holds a core: threads that spin waiting for a
descheduled sibling burn the shared cores. So `ddpm` and the pipeline look, once at start-up, at how
many CPUs are idle (/proc/stat over a fraction of a second) and set, where the user has not:

    OMP_NUM_THREADS   threads for PyTorch's CPU kernels: the idle CPUs, at least 1 (`auto_threads`)
    OMP_WAIT_POLICY   PASSIVE (idle threads sleep instead of spinning) when that leaves CPUs to others

The measurements behind this (alone and beside a busy process, on the 2-core machine):
bench/results/cpu_threads_2core.json.

DDPM_CPU_THREADS overrides the choice: `auto` (the default), a thread count, or `off` (set nothing,
the libraries' own defaults). OMP_NUM_THREADS or OMP_WAIT_POLICY already in the environment win.
The OpenMP runtime reads these once, when torch is imported; `apply_thread_defaults` also sets
torch's thread count when torch is already imported.
"""

from __future__ import annotations

import os
import sys
import time
from typing import MutableMapping

from ddpm.errors import ConfigError

ENV = "DDPM_CPU_THREADS"
WAIT_POLICY = "PASSIVE"


def usable_cpus() -> int:
    """CPUs this process may run on (its affinity mask, e.g. a container's share), at least 1."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def idle_cpus(interval: float = 0.25) -> float | None:
    """How many of the machine's CPUs were idle over the next `interval` seconds (/proc/stat); None where unknown."""
    def sample() -> tuple[int, int]:
        with open("/proc/stat", encoding="ascii") as f:
            fields = [int(v) for v in f.readline().split()[1:]]
        return sum(fields), fields[3] + fields[4]  # all jiffies; idle + iowait
    try:
        total0, idle0 = sample()
        time.sleep(interval)
        total1, idle1 = sample()
    except (OSError, ValueError, IndexError):
        return None
    cpus = os.cpu_count() or 1
    return cpus * (idle1 - idle0) / max(1, total1 - total0)


def auto_threads(cpus: int, idle: float | None) -> int:
    """The default thread count for `cpus` usable CPUs of which about `idle` are idle: the idle ones, at least one.

    Alone, every CPU; beside a process that keeps a core busy, one thread fewer, so that no thread of ours
    waits for a core that the other process holds."""
    if idle is None:
        return cpus
    return max(1, min(cpus, int(idle + 0.3)))


def cpu_threads(environ: MutableMapping[str, str] = os.environ) -> int | None:
    """The thread count that DDPM_CPU_THREADS asks for; None for `off`. Raises ConfigError on a bad value.

    With `auto` and OMP_NUM_THREADS already set (by the user, or by the parent process that looked at the
    idle CPUs for the whole run), that count; otherwise the idle CPUs are measured now."""
    raw = environ.get(ENV, "auto").strip().lower()
    if raw == "off":
        return None
    if raw == "auto":
        inherited = environ.get("OMP_NUM_THREADS", "").strip()
        if inherited.isdigit() and int(inherited) > 0:
            return int(inherited)
        return auto_threads(usable_cpus(), idle_cpus())
    if raw.isdigit() and int(raw) > 0:
        return int(raw)
    raise ConfigError(f"{ENV}: {environ[ENV]!r} is not allowed; use auto, off or a thread count > 0 "
                      f"(e.g. {ENV}=1)")


def thread_defaults(environ: MutableMapping[str, str] = os.environ) -> dict[str, str]:
    """The variables `apply_thread_defaults` would add to `environ` (none that it already has)."""
    threads = cpu_threads(environ)
    if threads is None:
        return {}
    wanted = {"OMP_NUM_THREADS": str(threads)}
    if threads < usable_cpus():
        wanted["OMP_WAIT_POLICY"] = WAIT_POLICY
    return {k: v for k, v in wanted.items() if k not in environ}


def apply_thread_defaults(environ: MutableMapping[str, str] = os.environ) -> dict[str, str]:
    """Add the thread defaults to `environ`; returns what it added. Raises ConfigError on a bad DDPM_CPU_THREADS."""
    added = thread_defaults(environ)
    environ.update(added)
    torch = sys.modules.get("torch")
    if torch is not None and "OMP_NUM_THREADS" in added and environ is os.environ:
        torch.set_num_threads(int(added["OMP_NUM_THREADS"]))  # OpenMP read the variables before they were set
    return added
