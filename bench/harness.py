"""What both benchmarks share: timing, the matmul ceiling, CUDA-graph capture, a time budget, reports.

Timing rule (shared/DEVICE.md, the device library's METHOD.md): warm up first, synchronize the
device around every timed region, time several windows of many iterations and report the median.
"""

from __future__ import annotations

import argparse
import ast
import datetime as _dt
import hashlib
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from ddpm.fileio import atomic_write_bytes
from ddpm.graphed import capture as capture_graph
from ddpm.graphed import on_side_stream

REPO_ROOT = Path(__file__).resolve().parents[1]


# --------------------------------------------------------------------------------------------- devices

def resolve_device(name: str) -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is available here; use --device cpu (with --smoke)")
    return torch.device(name)


def synchronizer(device: torch.device) -> Callable[[], None]:
    """A function that waits for all queued work on `device` (a no-op on the CPU, which is synchronous)."""
    if device.type == "cuda":
        return torch.cuda.synchronize
    return lambda: None


def set_compile_limits() -> None:
    """Let dynamo keep one compiled graph per (model, batch, mode) without falling back to eager.

    The U-Net class's forward is one code object shared by every model and batch size, so its
    cache entries add up; the default limit (8) would silently switch later cases to eager.
    """
    import torch._dynamo.config as dcfg
    for name in ("cache_size_limit", "recompile_limit", "accumulated_cache_size_limit",
                 "accumulated_recompile_limit"):
        if hasattr(dcfg, name):
            setattr(dcfg, name, max(getattr(dcfg, name), 256))


WRAPPER_ARGV = "BENCH_WRAPPER_ARGV"


def environment(device: torch.device) -> dict[str, Any]:
    """Versions, GPU and date, for the report."""
    env: dict[str, Any] = {
        "date_utc": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "device": str(device),
        "argv": sys.argv,
        "wrapper_argv": os.environ.get(WRAPPER_ARGV),  # set by a runner that wraps a benchmark script
        "git_commit": _git_commit(),
        "source_sha256": source_digest(),
    }
    try:
        import triton
        env["triton"] = triton.__version__
    except ImportError:
        env["triton"] = None
    try:
        import diffusers
        env["diffusers"] = diffusers.__version__
    except ImportError:
        env["diffusers"] = None
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        env.update(gpu=p.name, gpu_memory_gib=round(p.total_memory / 2**30, 1), sm_count=p.multi_processor_count,
                   capability=f"{p.major}.{p.minor}", driver=_nvidia_smi("driver_version"),
                   gpu_clocks_sm_max_mhz=_nvidia_smi("clocks.max.sm"))
    else:
        env.update(gpu=None, cpu_threads=torch.get_num_threads())
    return env


def source_digest() -> str:
    """SHA-256 (first 16 hex digits) over the ddpm/ and bench/ Python sources, paths and bytes.

    The GPU machine gets a copy of the working tree whose git metadata may lag behind it, so a
    result is matched to its code by this digest: `python -c "from bench.harness import
    source_digest; print(source_digest())"` at a checkout gives the same value for the same code.
    """
    h = hashlib.sha256()
    for path in sorted([*REPO_ROOT.glob("ddpm/**/*.py"), *REPO_ROOT.glob("bench/**/*.py")]):
        h.update(path.relative_to(REPO_ROOT).as_posix().encode() + b"\0" + path.read_bytes() + b"\0")
    return h.hexdigest()[:16]


def _git_commit() -> str | None:
    """HEAD's short hash, with "+dirty" when tracked files differ from it (the run measured uncommitted code)."""
    try:
        head = subprocess.run(["git", "-C", str(REPO_ROOT), "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, timeout=10).stdout.strip()
        changed = subprocess.run(["git", "-C", str(REPO_ROOT), "status", "--porcelain", "--untracked-files=no"],
                                 capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return head + ("+dirty" if changed else "") if head else None


def _nvidia_smi(query: str) -> str | None:
    try:
        out = subprocess.run(["nvidia-smi", f"--query-gpu={query}", "--format=csv,noheader"], capture_output=True,
                             text=True, timeout=20)
        return out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout.strip() else None
    except (OSError, subprocess.SubprocessError, IndexError):
        return None


# ---------------------------------------------------------------------------------------------- timing

@dataclass
class Timing:
    """Seconds per iteration: the median over windows, with the spread."""

    median_s: float
    min_s: float
    max_s: float
    iters_per_window: int
    windows_s: list[float] = field(default_factory=list)  # per-iteration seconds of each window

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def time_windows(fn: Callable[[], Any], sync: Callable[[], None], iters: int, windows: int) -> Timing:
    """Run `fn` `iters` times per window, `windows` windows, synchronizing around each window."""
    per_iter = []
    for _ in range(windows):
        sync()
        t0 = time.perf_counter()
        for _ in range(iters):
            fn()
        sync()
        per_iter.append((time.perf_counter() - t0) / iters)
    return Timing(statistics.median(per_iter), min(per_iter), max(per_iter), iters, per_iter)


def iters_for(fn: Callable[[], Any], sync: Callable[[], None], target_s: float, lo: int, hi: int) -> int:
    """How many calls of an already warmed-up `fn` fill about `target_s` seconds, clamped to [lo, hi]."""
    sync()
    t0 = time.perf_counter()
    fn()
    fn()
    sync()
    dt = max((time.perf_counter() - t0) / 2, 1e-6)
    return int(min(max(math.ceil(target_s / dt), lo), hi))


def timed_once(fn: Callable[[], Any], sync: Callable[[], None]) -> tuple[Any, float]:
    """(fn(), seconds) with the device synchronized before and after."""
    sync()
    t0 = time.perf_counter()
    out = fn()
    sync()
    return out, time.perf_counter() - t0


def matmul_peak(device: torch.device, n: int, windows: int = 5, iters: int = 20,
                sustained_s: float = 1.0) -> dict[str, Any]:
    """Dense bf16 matmul n x n x n on random data (never zeros: they run faster): the compute ceiling.

    `tflops` (the share's denominator in every report) is timed right after 3 calls of warm-up, as
    it always was, so shares stay comparable with earlier reports. The matmul then runs on for
    `sustained_s` seconds and is timed again (`tflops_sustained`); bench_train times it a third time
    after its cases. The three figures of one process differ, in no fixed order: they say how far the
    share's denominator moves (docs/experiments/2026-11-26-training-step-beside-the-twin-h100.md).
    """
    sync = synchronizer(device)
    g = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16, generator=g)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16, generator=g)
    for _ in range(3):
        a @ b
    timing = time_windows(lambda: a @ b, sync, iters, windows)
    sync()
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < sustained_s:
        for _ in range(3):
            a @ b
        sync()
    sustained = time_windows(lambda: a @ b, sync, iters, windows)
    flop = 2 * n**3
    return {"n": n, "dtype": "bfloat16", "median_ms": timing.median_s * 1e3,
            "tflops": flop / timing.median_s / 1e12, "tflops_best": flop / timing.min_s / 1e12,
            "sustained_s": sustained_s, "tflops_sustained": flop / sustained.median_s / 1e12}


# ---------------------------------------------------------------------------------------- CUDA graphs

def capture(body: Callable[[], Any], device: torch.device, *, warmup: int = 3) -> Callable[[], None]:
    """Capture `body` in a CUDA graph (ddpm.graphed) after `warmup` eager calls; returns a function that replays it.

    `body` must read its inputs from, and write its results into, tensors that outlive it (static
    buffers, parameters): a replay re-runs the same kernels on the same addresses. On the CPU there
    are no graphs: the returned function re-runs `body`, which checks the static-buffer plumbing and
    nothing more.
    """
    if device.type != "cuda":
        for _ in range(warmup):
            body()
        body()  # the "capture" run, as a real capture would
        return body
    on_side_stream(body, calls=warmup, device=device)
    captured = capture_graph(body, device=device)
    torch.cuda.synchronize(device)
    return captured.replay  # a bound method: keeps the graph (and its memory pool) alive


def free_memory(device: torch.device) -> None:
    import gc
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory_gib(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None


# ---------------------------------------------------------------------------------------------- budget

class Budget:
    """Wall-clock budget of one benchmark process: a case starts only if its estimate fits.

    A compile costs tens of seconds per new shape and mode on the GPU machine (shared/DEVICE.md); the
    first measured compile replaces the guess, so later estimates follow this machine.
    """

    def __init__(self, seconds: float, compile_guess_s: float):
        self.t0 = time.perf_counter()
        self.seconds = seconds
        self.compile_s = compile_guess_s
        self._compiles: list[float] = []

    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    def allows(self, estimate_s: float) -> bool:
        return self.elapsed() + estimate_s <= self.seconds

    def record_compile(self, seconds: float, scale: float = 1.0) -> None:
        """Record a measured compile of a model of relative cost `scale` (by FLOPs/size, roughly)."""
        self._compiles.append(seconds / scale)
        self.compile_s = max(self._compiles) * 1.15

    def compile_estimate(self, scale: float = 1.0) -> float:
        return self.compile_s * scale


# --------------------------------------------------------------------------------------------- reports

def fmt(v: Any, digits: int = 1) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        if math.isnan(v):
            return "nan"
        if abs(v) >= 10000:
            return f"{v:,.0f}"
        return f"{v:.{digits}f}"
    return str(v)


def md_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


class Report:
    """A JSON document and its markdown rendering, rewritten after every case so that a run killed
    at its time limit still leaves everything measured so far."""

    def __init__(self, json_path: str | None, md_path: str | None, render: Callable[[dict[str, Any]], str]):
        self.json_path = Path(json_path) if json_path else None
        self.md_path = Path(md_path) if md_path else None
        self.render = render
        self.doc: dict[str, Any] = {}

    def save(self) -> None:
        if self.json_path:
            atomic_write_bytes(self.json_path, (json.dumps(self.doc, indent=2, default=_json_default) + "\n").encode())
        if self.md_path:
            atomic_write_bytes(self.md_path, (self.render(self.doc) + "\n").encode())


def _json_default(o: Any) -> Any:
    if isinstance(o, (torch.device, torch.dtype, Path)):
        return str(o)
    if isinstance(o, float) and not math.isfinite(o):
        return None
    raise TypeError(f"not JSON serializable: {type(o).__name__}")


def parse_inductor_option(text: str) -> tuple[str, bool | int | float | str]:
    """`--inductor KEY=VALUE`: a torch._inductor.config setting (VALUE as a Python literal), checked to exist."""
    import torch._inductor.config as inductor_config
    key, sep, raw = text.partition("=")
    if not sep or not hasattr(inductor_config, key):
        raise argparse.ArgumentTypeError(f"--inductor {text!r}: expected KEY=VALUE with KEY a torch._inductor.config "
                                         f"setting, e.g. coordinate_descent_tuning=True")
    current = getattr(inductor_config, key)
    try:
        value = ast.literal_eval(raw)
    except (ValueError, SyntaxError):
        value = raw
    if current is not None and type(value) is not type(current):
        raise argparse.ArgumentTypeError(f"--inductor {text!r}: {key} is a {type(current).__name__} "
                                         f"(now {current!r}); {raw!r} is not")
    return key, value


def set_inductor_options(options: list[tuple[str, Any]]) -> None:
    import torch._inductor.config as inductor_config

    from ddpm.train_compile import keep_multi_kernel_choices_in_memory
    for key, value in options:
        setattr(inductor_config, key, value)
        if key == "triton.multi_kernel" and value:
            keep_multi_kernel_choices_in_memory()


def start_report(args: Any, render: Callable[[dict[str, Any]], str], tag: str) -> tuple[torch.device, Report]:
    """What every benchmark does first: device, compile limits, cuDNN mode, seed, the report with the
    environment, settings and the bf16 matmul ceiling measured in this process."""
    device = resolve_device(args.device)
    set_compile_limits()
    torch.backends.cudnn.benchmark = args.cudnn_benchmark
    set_inductor_options(args.inductor)
    torch.manual_seed(0)
    report = Report(args.out, args.out_md, render)
    doc = report.doc
    doc["environment"] = environment(device)
    doc["settings"] = {k: v for k, v in vars(args).items() if k not in ("out", "out_md")}
    log(f"[{tag}] {doc['environment'].get('gpu') or device}, torch {torch.__version__}")
    doc["matmul_peak"] = matmul_peak(device, args.matmul_n)
    log(f"[{tag}] bf16 matmul {args.matmul_n}^3: {doc['matmul_peak']['tflops']:.1f} TFLOP/s "
        f"({doc['matmul_peak']['tflops_sustained']:.1f} after {doc['matmul_peak']['sustained_s']:.0f} s of it)")
    return device, report


def report_footer(doc: dict[str, Any]) -> list[str]:
    """The markdown lines that close every report: what was left out, and the wall time."""
    out = [f"\n{k}: left out: {why}" for k, why in doc.get("left_out", {}).items()]
    out.append(f"\nWall time {fmt(doc.get('wall_s'))} s.")
    return out


def parse_int_list(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise SystemExit(f"expected a comma-separated list of integers, got {text!r}") from None
    if not values or any(v <= 0 for v in values):
        raise SystemExit(f"expected positive integers, got {text!r}")
    return values


def parse_choices(text: str, allowed: Sequence[str], what: str) -> list[str]:
    values = [v.strip() for v in text.split(",") if v.strip()]
    bad = [v for v in values if v not in allowed]
    if bad or not values:
        raise SystemExit(f"{what}: {bad[0] if bad else text!r} is not allowed; choose from {', '.join(allowed)}")
    return values


def log(msg: str) -> None:
    print(msg, flush=True)
