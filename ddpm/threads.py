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
on more. So a measured count is marked (MEASURED, inherited with it), and training on the CPU looks
again while it runs (`ThreadWatch`): every RECHECK_S seconds, how many CPUs the other processes kept
busy since the last look, and torch's thread count follows. A count the user set is never changed.
"""

from __future__ import annotations

import os
import sys
import time
from typing import Callable, MutableMapping

from ddpm.errors import ConfigError

ENV = "DDPM_CPU_THREADS"
MEASURED = "DDPM_CPU_THREADS_MEASURED"  # beside OMP_NUM_THREADS when the count is a measurement, not a choice
WAIT_POLICY = "PASSIVE"
RECHECK_S = 30.0


def usable_cpus() -> int:
    """CPUs this process may run on (its affinity mask, e.g. a container's share), at least 1."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def machine_jiffies() -> tuple[int, int]:
    """(all, idle + iowait) clock ticks of the machine's CPUs since boot (/proc/stat)."""
    with open("/proc/stat", encoding="ascii") as f:
        fields = [int(v) for v in f.readline().split()[1:]]
    return sum(fields), fields[3] + fields[4]


def own_jiffies() -> int:
    """Clock ticks this process (all its threads) has run, user and system (/proc/self/stat)."""
    with open("/proc/self/stat", encoding="ascii") as f:
        fields = f.read().rsplit(")", 1)[1].split()  # after the command name, which may hold spaces
    return int(fields[11]) + int(fields[12])  # utime, stime: fields 14 and 15 of proc(5)


def idle_cpus(interval: float = 0.25) -> float | None:
    """How many of the machine's CPUs were idle over the next `interval` seconds (/proc/stat); None where unknown."""
    try:
        total0, idle0 = machine_jiffies()
        time.sleep(interval)
        total1, idle1 = machine_jiffies()
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
    if 1 < threads < usable_cpus():  # one thread has no team to wait for, and may get more (ThreadWatch)
        wanted["OMP_WAIT_POLICY"] = WAIT_POLICY
    added = {k: v for k, v in wanted.items() if k not in environ}
    if "OMP_NUM_THREADS" in added and environ.get(ENV, "auto").strip().lower() == "auto":
        added[MEASURED] = added["OMP_NUM_THREADS"]
    return added


def apply_thread_defaults(environ: MutableMapping[str, str] = os.environ) -> dict[str, str]:
    """Add the thread defaults to `environ`; returns what it added. Raises ConfigError on a bad DDPM_CPU_THREADS."""
    added = thread_defaults(environ)
    environ.update(added)
    torch = sys.modules.get("torch")
    if torch is not None and "OMP_NUM_THREADS" in added and environ is os.environ:
        torch.set_num_threads(int(added["OMP_NUM_THREADS"]))  # OpenMP read the variables before they were set
    return added


class ThreadWatch:
    """Torch's thread count on the CPU, following the CPUs that other processes leave idle during a long run.

    `check()` is cheap and may be called often (training calls it at every log step); every `every_s` seconds
    it reads how many CPUs the machine spent outside this process since the last look, and sets torch's
    thread count to what `auto_threads` makes of the rest. It stops for good once something else has set the
    count. `read` returns (machine ticks, machine idle ticks, this process's ticks)."""

    def __init__(self, every_s: float = RECHECK_S, read: Callable[[], tuple[int, int, int]] | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        import torch

        self._torch, self.every_s, self.clock = torch, every_s, clock
        self.read = read or (lambda: (*machine_jiffies(), own_jiffies()))
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
        total, idle, own = self.read()
        span = total - self.last[0]
        others = (os.cpu_count() or 1) * max(0, span - (idle - self.last[1]) - (own - self.last[2])) / max(1, span)
        self.at, self.last = now, (total, idle, own)
        wanted = auto_threads(usable_cpus(), (os.cpu_count() or 1) - others)
        if wanted == self.threads:
            return None
        before, self.threads = self.threads, wanted
        self._torch.set_num_threads(wanted)
        return (f"CPU threads {before} -> {wanted}: other processes kept about {others:.1f} of "
                f"{os.cpu_count() or 1} CPUs busy over the last {self.every_s:.0f} s")


def watch_threads(device_type: str, environ: MutableMapping[str, str] = os.environ) -> ThreadWatch | None:
    """A ThreadWatch for work on the CPU whose thread count was measured at start-up (and not changed since);
    None on another device, for a count the user set, or where /proc cannot be read."""
    import torch

    measured = environ.get(MEASURED)
    if device_type != "cpu" or measured is None or measured != environ.get("OMP_NUM_THREADS"):
        return None
    if str(torch.get_num_threads()) != measured:
        return None
    try:
        return ThreadWatch()
    except (OSError, ValueError, IndexError):
        return None
