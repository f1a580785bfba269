"""CPU threads for PyTorch and OpenMP: a default that holds up when other work shares the cores.

OpenMP's own defaults (one thread per core; idle threads spin before they sleep) suit a machine
the run has to itself. Beside other work, threads that spin waiting for a descheduled sibling
burn the shared cores: the measured effect on a 2-core machine is in
bench/results/cpu_threads_2core_shared.json (`python bench/cpu_threads.py`). So `ddpm` and the
pipeline set, where the user has not:

    OMP_NUM_THREADS   threads for PyTorch's CPU kernels (auto: half the usable CPUs, see `auto_threads`)
    OMP_WAIT_POLICY   PASSIVE: idle threads sleep instead of spinning

DDPM_CPU_THREADS overrides the choice: `auto` (the default), a thread count, or `off` (set nothing,
the libraries' own defaults). OMP_NUM_THREADS or OMP_WAIT_POLICY already in the environment win.
The OpenMP runtime reads these once, when torch is imported; `apply_thread_defaults` also sets
torch's thread count when torch is already imported.
"""

from __future__ import annotations

import os
import sys
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


def auto_threads(cpus: int) -> int:
    """The default thread count for `cpus` usable CPUs: half of them (at least one), leaving the other half to
    the machine's other work. On 2 CPUs that is one thread, by far the fastest there once anything else runs."""
    return max(1, cpus // 2)


def cpu_threads(environ: MutableMapping[str, str] = os.environ) -> int | None:
    """The thread count that DDPM_CPU_THREADS asks for; None for `off`. Raises ConfigError on a bad value."""
    raw = environ.get(ENV, "auto").strip().lower()
    if raw == "off":
        return None
    if raw == "auto":
        return auto_threads(usable_cpus())
    if raw.isdigit() and int(raw) > 0:
        return int(raw)
    raise ConfigError(f"{ENV}: {environ[ENV]!r} is not allowed; use auto, off or a thread count > 0 "
                      f"(e.g. {ENV}=1)")


def thread_defaults(environ: MutableMapping[str, str] = os.environ) -> dict[str, str]:
    """The variables `apply_thread_defaults` would add to `environ` (none that it already has)."""
    threads = cpu_threads(environ)
    if threads is None:
        return {}
    wanted = {"OMP_NUM_THREADS": str(threads), "OMP_WAIT_POLICY": WAIT_POLICY}
    return {k: v for k, v in wanted.items() if k not in environ}


def apply_thread_defaults(environ: MutableMapping[str, str] = os.environ) -> dict[str, str]:
    """Add the thread defaults to `environ`; returns what it added. Raises ConfigError on a bad DDPM_CPU_THREADS."""
    added = thread_defaults(environ)
    environ.update(added)
    torch = sys.modules.get("torch")
    if torch is not None and "OMP_NUM_THREADS" in added and environ is os.environ:
        torch.set_num_threads(int(added["OMP_NUM_THREADS"]))  # OpenMP read the variables before they were set
    return added
