"""CPU threads for PyTorch and OpenMP: a default that is fast alone and holds up beside other work.

OpenMP's own defaults (one thread per core; idle threads spin before they sleep) suit a machine the
run has to itself, and collapse when another process holds a core: threads that spin waiting for a
descheduled sibling burn the shared cores. So `ddpm` and the pipeline look, once at start-up, at how
many CPUs are idle (/proc/stat over a fraction of a second) and set, where the user has not:

    OMP_NUM_THREADS   threads for PyTorch's CPU kernels: the idle CPUs, at least 1 (`auto_threads`)
    OMP_WAIT_POLICY   PASSIVE (idle threads sleep instead of spinning) when several threads leave CPUs to
                      others (one thread has no sibling to wait for: bench/results/cpu_threads_one_thread_2core.json)

The measurements behind this (alone and beside a busy process, on the 2-core machine):
bench/results/cpu_threads_2core.json.

DDPM_CPU_THREADS overrides the choice: `auto` (the default), a thread count, or `off` (set nothing,
the libraries' own defaults). OMP_NUM_THREADS or OMP_WAIT_POLICY already in the environment win.
The OpenMP runtime reads these once, when torch is imported; `apply_thread_defaults` also sets
torch's thread count when torch is already imported.

A count measured at start-up is a guess about the whole run: a process that held a core for a moment
would leave a long run on fewer threads than it could use, and one that starts later would leave it
on more. So training on the CPU in the process that measured looks again while it runs (`ThreadWatch`):
at a log step, once RECHECK_S seconds have passed since its last look, how many of its CPUs other
processes kept busy meanwhile, and torch's thread count follows. A count the user set (DDPM_CPU_THREADS=N,
OMP_NUM_THREADS), one inherited from a parent process, and a compiled training step's are never changed.
"""

from __future__ import annotations

import os
import sys
import time
from typing import Callable, MutableMapping

from ddpm.errors import ConfigError

ENV = "DDPM_CPU_THREADS"
WAIT_POLICY = "PASSIVE"
RECHECK_S = 30.0
_measured: int | None = None  # the count this process measured and set (apply_thread_defaults), else None


def usable_cpus() -> int:
    """CPUs this process may run on (its affinity mask, e.g. a container's share), at least 1."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def cpu_jiffies() -> tuple[int, int, int]:
    """(all, idle + iowait) clock ticks since boot of the CPUs this process may run on, and how many they are
    (/proc/stat's per-CPU lines, so that a container's share is not the whole machine)."""
    try:
        mine: set[int] | None = os.sched_getaffinity(0)
    except (AttributeError, OSError):
        mine = None
    total = idle = cpus = 0
    with open("/proc/stat", encoding="ascii") as f:
        for line in f:
            if not line.startswith("cpu"):
                break  # the per-CPU lines come first; the rest (interrupt counts) can be long
            name, *values = line.split()
            if name == "cpu" or (mine is not None and int(name[3:]) not in mine):
                continue
            fields = [int(v) for v in values[:8]]  # user .. steal; guest time is counted in user already
            total, idle, cpus = total + sum(fields), idle + fields[3] + fields[4], cpus + 1
    if cpus == 0:
        raise ValueError("/proc/stat lists none of this process's CPUs")
    return total, idle, cpus


def own_jiffies() -> int:
    """Clock ticks this process (all its threads) has run, user and system (/proc/self/stat)."""
    with open("/proc/self/stat", encoding="ascii") as f:
        fields = f.read().rsplit(")", 1)[1].split()  # after the command name, which may hold spaces
    return int(fields[11]) + int(fields[12])  # utime, stime: fields 14 and 15 of proc(5)


def idle_cpus(interval: float = 0.25) -> float | None:
    """How many of this process's CPUs were idle over the next `interval` seconds (/proc/stat); None where unknown."""
    try:
        total0, idle0, cpus = cpu_jiffies()
        time.sleep(interval)
        total1, idle1, _ = cpu_jiffies()
    except (OSError, ValueError, IndexError):
        return None
    return cpus * (idle1 - idle0) / max(1, total1 - total0)


def auto_threads(cpus: int, idle: float | None) -> int:
    """The default thread count for `cpus` usable CPUs of which about `idle` are idle: the idle ones, at least one.

    Alone, every CPU; beside a process that keeps a core busy, one thread fewer, so that no thread of ours
    waits for a core that the other process holds."""
    if idle is None:
        return cpus
    return max(1, min(cpus, int(idle + 0.3)))


def _asked(environ: MutableMapping[str, str]) -> str:
    """DDPM_CPU_THREADS as written, normalised: `auto` where unset."""
    return environ.get(ENV, "auto").strip().lower()


def cpu_threads(environ: MutableMapping[str, str] = os.environ) -> int | None:
    """The thread count that DDPM_CPU_THREADS asks for; None for `off`. Raises ConfigError on a bad value.

    With `auto` and OMP_NUM_THREADS already set (by the user, or by the parent process that looked at the
    idle CPUs for the whole run), that count; otherwise the idle CPUs are measured now."""
    raw = _asked(environ)
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
    if 1 < threads < usable_cpus():  # one thread has no team to wait for, and may get more (ThreadWatch)
        wanted["OMP_WAIT_POLICY"] = WAIT_POLICY
    return {k: v for k, v in wanted.items() if k not in environ}


def apply_thread_defaults(environ: MutableMapping[str, str] = os.environ) -> dict[str, str]:
    """Add the thread defaults to `environ`; returns what it added. Raises ConfigError on a bad DDPM_CPU_THREADS."""
    global _measured
    added = thread_defaults(environ)
    environ.update(added)
    if "OMP_NUM_THREADS" in added and environ is os.environ:
        if _asked(environ) == "auto":
            _measured = int(added["OMP_NUM_THREADS"])
        torch = sys.modules.get("torch")
        if torch is not None:
            torch.set_num_threads(int(added["OMP_NUM_THREADS"]))  # OpenMP read the variables before they were set
    return added


class ThreadWatch:
    """Torch's thread count on the CPU, following the CPUs that other processes leave idle during a long run.

    `check()` is cheap and may be called often (training calls it at every log step); once `every_s` seconds
    have passed since its last look it reads how much of its `cpus` CPUs' time went to other processes
    meanwhile, and sets torch's thread count to what `auto_threads` makes of the rest. It stops for good once
    something else has set the count. `read` returns (ticks of the CPUs, their idle ticks, this process's)."""

    def __init__(self, every_s: float = RECHECK_S, read: Callable[[], tuple[int, int, int]] | None = None,
                 clock: Callable[[], float] = time.monotonic, cpus: int | None = None) -> None:
        import torch

        self._torch, self.every_s, self.clock = torch, every_s, clock
        self.read = read or (lambda: (*cpu_jiffies()[:2], own_jiffies()))
        self.cpus = cpus if cpus is not None else cpu_jiffies()[2]
        self.threads, self.active = torch.get_num_threads(), True
        self.at, self.last = clock(), self.read()

    def check(self) -> str | None:
        """Look again if `every_s` has passed; returns a line saying what changed, or None."""
        now = self.clock()
        if not self.active or now - self.at < self.every_s:
            return None
        if self._torch.get_num_threads() != self.threads:  # set by someone else: theirs to keep
            self.active = False
            return None
        (total, idle, own), (total0, idle0, own0), since = self.read(), self.last, self.at
        span = max(1, total - total0)
        others = self.cpus * max(0, span - (idle - idle0) - (own - own0)) / span
        self.at, self.last = now, (total, idle, own)
        wanted = auto_threads(self.cpus, self.cpus - others)
        if wanted == self.threads:
            return None
        before, self.threads = self.threads, wanted
        self._torch.set_num_threads(wanted)
        return (f"CPU threads {before} -> {wanted}: other processes kept about {others:.1f} of "
                f"{self.cpus} CPUs busy over the last {now - since:.0f} s")


def watch_threads(device_type: str, compiled: bool = False) -> ThreadWatch | None:
    """A ThreadWatch for eager work on the CPU whose thread count this process measured at start-up (and nothing
    has changed since); None on another device, for a compiled step (inductor writes the count into its
    kernels), for a count the user set or a parent process chose, or where /proc cannot be read."""
    import torch

    if device_type != "cpu" or compiled or _measured is None or torch.get_num_threads() != _measured:
        return None
    if _asked(os.environ) != "auto" or os.environ.get("OMP_NUM_THREADS") != str(_measured):
        return None
    try:
        return ThreadWatch()
    except (OSError, ValueError, IndexError):
        return None
