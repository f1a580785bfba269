"""Loading an AOTInductor package (ddpm.aot_package) into this process, and the CPU it needs.

A package holds a wrapper library compiled for the machine that built it: for its GPU (which the package's
record names) and for a set of CPU instruction sets (its metadata's AOTI_CPU_ISA). ddpm.aot_package refuses a
package whose instruction sets this CPU lacks (missing_cpu_isa against /proc/cpuinfo) before it is loaded, and
loads one that fits with open_package, which first makes the process's libstdc++ global (share_libstdcxx).
"""

from __future__ import annotations

import ctypes
import sys
from pathlib import Path
from typing import Any

import torch


def share_libstdcxx() -> None:
    """Give the process's libstdc++ global scope, so that a package's code binds to it.

    torch loads libstdc++ with local scope. A package whose wrapper library was linked with a static copy of
    libstdc++ (as the H200 machine's g++ links it) then binds to that copy, whose std::locale was never set up,
    and its first std::regex crashes the process (SIGSEGV) or throws std::bad_cast. With the shared library
    global, the wrapper binds to it, as it does when built against the shared one
    (docs/experiments/2026-12-04-aot-package-load-fixed-h200.md)."""
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL("libstdc++.so.6", mode=ctypes.RTLD_GLOBAL)
        except OSError:  # no shared libstdc++ here: a package's wrapper can only be bound to its own
            pass


def open_package(path: Path) -> Any:
    """The package's network, loaded single-threaded (see ddpm.aot_package.AotDenoiser), with the process's
    libstdc++ shared first: called with the network's tensors, it returns its one output tensor.

    Through torch's C++ loader rather than torch._inductor.aoti_load_package: that one then works out this
    machine's CPU instruction sets by compiling probe programs into an empty inductor cache, only to warn on a
    difference (docs/experiments/2026-12-04-aot-package-load-fixed-h200.md). ddpm.aot_package.refusal has checked
    the package's instruction sets against /proc/cpuinfo already. And without torch.export's Python wrapper,
    whose module imports torch._dynamo and sympy: a package's inputs are flat tensors and its output is one."""
    share_libstdcxx()
    try:
        loader = torch._C._aoti.AOTIModelPackageLoader(str(path), "model", True, 1, -1)
    except (AttributeError, TypeError):  # another torch: its public loader, probes and all
        return torch._inductor.aoti_load_package(str(path), run_single_threaded=True)
    return PackageRunner(loader)


class PackageRunner:
    """A loaded package's network: its tensors in, in the order the network takes them; its output out."""

    def __init__(self, loader: Any):
        self.loader = loader

    def __call__(self, *inputs: torch.Tensor) -> torch.Tensor:
        outputs = self.loader.run(list(inputs))
        if len(outputs) != 1:
            raise RuntimeError(f"the package returned {len(outputs)} tensors; a sampling network returns one")
        return outputs[0]


# The names in an AOTInductor package's AOTI_CPU_ISA and the /proc/cpuinfo flags that inductor's compile flags
# for each need (torch._inductor.cpu_vec_isa: -mavx2 -mfma -mf16c; -mavx512f -mavx512dq -mavx512vl -mavx512bw
# -mfma; -mavx512vnni; -mamx-tile -mamx-bf16 -mamx-int8). An optional -mavx512bf16 leaves no trace in the name.
_ISA_FLAGS = {"AVX2": ("avx2", "fma", "f16c"), "AVX512": ("avx512f", "avx512dq", "avx512vl", "avx512bw", "fma"),
              "AVX512_VNNI": ("avx512_vnni",), "AMX_TILE": ("amx_tile", "amx_bf16", "amx_int8")}


def cpu_flags() -> set[str] | None:
    """This CPU's flags as /proc/cpuinfo lists them; None where there is no such file."""
    try:
        line = next((ln for ln in Path("/proc/cpuinfo").read_text().splitlines() if ln.startswith("flags")), None)
    except OSError:
        return None
    return set(line.split(":", 1)[1].split()) if line else None


def missing_cpu_isa(isa: str, flags: set[str] | None) -> list[str]:
    """The instruction sets of a package's AOTI_CPU_ISA (e.g. "AVX512 AVX512_VNNI") that a CPU with `flags` lacks."""
    if flags is None:
        return []
    return [name for name in isa.upper().split() if not set(_ISA_FLAGS.get(name, ())) <= flags]


def package_cpu_isa(path: Path) -> str:
    """The CPU instruction sets a package's wrapper was compiled for (its metadata's AOTI_CPU_ISA), or "" where
    its metadata does not say (or cannot be read: then its check fails too)."""
    try:
        metadata = torch._C._aoti.AOTIModelPackageLoader.load_metadata_from_package(str(path), "model")
    except (RuntimeError, AttributeError):
        return ""
    return str(metadata.get("AOTI_CPU_ISA", ""))
