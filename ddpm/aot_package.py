"""The sampling network compiled ahead of time: an AOTInductor package (.pt2) that sampling runs with no compile.

`ddpm export` on a CUDA machine also writes `<name>.pt2` beside `<name>.onnx`: the EMA U-Net in the
layout that compiled sampling uses (ddpm.generate.sampling_copy), under bf16 autocast when the run
trained in bf16, exported with a dynamic batch and compiled for this GPU by
torch._inductor.aoti_compile_and_package, with inductor's default options and its kernels tuned for
sample.batch_size (the example batch). Before it is written, DDIM samples from the package and
from the eager network, from the same noise at the same precision, must agree (mean |diff| at most
export.aot_mean_atol), as the ONNX export is checked; else no package is written and a warning says why.
That check loads the package in a process of its own (check_in_child), so a loader that crashes costs
the package, never the export. Loading is ddpm.aot_loader's (libstdc++ scope, CPU instruction sets).

The package's own record (the zip entry `ddpm.json`) names the GPU, torch, CUDA, the CPU instruction sets
and the checkpoint's SHA-256. `ddpm sample` and `ddpm evaluate` use a package only when all of them match
this machine and that checkpoint; otherwise they sample as before, with one log line saying why. The check reads
the record alone: a package built for another GPU or torch is never loaded.

Graph: x float32 [B, C, H, W], t int64 [B] (indices in [0, T-1]), labels int64 [B] (class-conditional
models only; num_classes is the null label) -> float32 [B, C, H, W], the network's prediction.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
import zipfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ddpm.aot_loader import cpu_flags, missing_cpu_isa, open_package, package_cpu_isa
from ddpm.checkpoint import load_model
from ddpm.config import Config, image_shape
from ddpm.errors import ConfigError
from ddpm.fileio import file_sha256, fsync_dir
from ddpm.generate import samples_in_bf16, sampling_copy
from ddpm.run_folder import owned
from ddpm.samplers import ddim_sample_loop
from ddpm.schedule import Schedule

log = logging.getLogger(__name__)

SUFFIX = ".pt2"
RECORD_ENTRY = "ddpm.json"
FORMAT = 1
MAX_BATCH = 1 << 16


def package_path(onnx_out: str | Path) -> Path:
    """model.onnx -> model.pt2"""
    return Path(onnx_out).with_suffix(SUFFIX)


def machine(device: torch.device) -> dict[str, Any]:
    """What a package is only valid for: the torch build, its CUDA, the device's name and compute capability."""
    cuda = device.type == "cuda"
    return {"torch": torch.__version__, "cuda": torch.version.cuda if cuda else None,
            "device": torch.cuda.get_device_name(device) if cuda else "cpu",
            "capability": list(torch.cuda.get_device_capability(device)) if cuda else None}


class _Sampling(nn.Module):
    """net(x, t) in float32 out, under autocast to `dtype` when given (weights already cast: sampling_copy)."""

    def __init__(self, net: nn.Module, device_type: str, dtype: torch.dtype | None):
        super().__init__()
        self.net, self.device_type, self.dtype = net, device_type, dtype

    def run(self, x: torch.Tensor, t: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
        with torch.autocast(self.device_type, dtype=self.dtype or torch.float32, enabled=self.dtype is not None):
            return self.net(x, t, labels).float()

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.run(x, t, None)


class _ConditionalSampling(_Sampling):
    def forward(self, x: torch.Tensor, t: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return self.run(x, t, labels)


# The inductor options of the package: the defaults. Coordinate-descent tuning, which compiled sampling uses
# (ddpm.generate.sampling_network), made the build much longer and sampling no faster
# (docs/experiments/2026-12-04-aot-package-tuning-h200.md).
INDUCTOR_CONFIGS: dict[str, Any] = {}


def batch_hint(settings: Config) -> int:
    """The example batch a package is exported with, so the batch its kernels are tuned for: sample.batch_size,
    within the package's batch range and at least 2 (torch.export specialises a dimension whose example is 1)."""
    return min(MAX_BATCH, max(2, settings.sample.batch_size))


def built_as_asked(path: Path, settings: Config) -> bool:
    """Whether the package at `path` was built with the tuning that export_package would build it with now
    (batch_hint and INDUCTOR_CONFIGS); refusal() says whether it may sample at all."""
    try:
        record = read_record(path)
    except (OSError, ValueError):
        return False
    return record.get("batch_hint") == batch_hint(settings) and record.get("inductor_configs") == INDUCTOR_CONFIGS


def build_package(model: nn.Module, cfg: Config, device: torch.device, path: Path, bf16: bool,
                  example_batch: int) -> Path:
    """Compile `model` (on `device`, eval mode) into an AOTInductor package at `path` (its record: write_record).

    The batch is dynamic; `example_batch` (batch_hint(), so at least 2) is the size the kernels are tuned for: the
    batch sampling will run."""
    dtype = torch.bfloat16 if bf16 else None
    conditional = cfg.model.class_conditional
    net = (_ConditionalSampling if conditional else _Sampling)(sampling_copy(model, dtype), device.type, dtype).eval()
    args: tuple[torch.Tensor, ...] = (torch.randn(example_batch, *image_shape(cfg), device=device),
                                      torch.arange(example_batch, device=device) % 2)
    if conditional:
        args += (torch.arange(example_batch, device=device) % (model.num_classes + 1),)
    batch = torch.export.Dim("batch", min=1, max=MAX_BATCH)
    names = ["x", "t", "labels"][:len(args)]
    with torch.no_grad():
        program = torch.export.export(net, args, dynamic_shapes={n: {0: batch} for n in names})
        torch._inductor.aoti_compile_and_package(program, package_path=str(path), inductor_configs=INDUCTOR_CONFIGS)
    return path


def write_record(path: Path, record: dict[str, Any]) -> None:
    """Add `record` to the package's zip as <folder>/ddpm.json (the loader ignores entries it does not know)."""
    with zipfile.ZipFile(path, "a") as z:
        folder = z.namelist()[0].split("/")[0]
        z.writestr(f"{folder}/{RECORD_ENTRY}", json.dumps(record, sort_keys=True))


def read_record(path: Path) -> dict[str, Any]:
    """The record of a package; ValueError when the file is not a package with one."""
    try:
        with zipfile.ZipFile(path) as z:
            entry = next((n for n in z.namelist() if n.endswith(f"/{RECORD_ENTRY}")), None)
            if entry is None:
                raise ValueError("it holds no ddpm record: not written by `ddpm export`")
            record = json.loads(z.read(entry))
    except (zipfile.BadZipFile, json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"it is not a readable package ({exc})") from None
    if not isinstance(record, dict) or record.get("format") != FORMAT:
        raise ValueError(f"its record is not of format {FORMAT}")
    return record


def refusal(path: Path, device: torch.device, checkpoint_sha256: str, bf16: bool) -> str | None:
    """Why the package at `path` may not sample for this checkpoint on `device` in this process, or None."""
    if not path.is_file():
        return f"no AOT package at {path}"
    try:
        record = read_record(path)
    except (OSError, ValueError) as exc:
        return f"{path} is unusable: {exc}"
    built, here = record.get("machine", {}), machine(device)
    if built != here:
        return (f"{path} was built for {built.get('device')} with torch {built.get('torch')} "
                f"(CUDA {built.get('cuda')}); this is {here['device']} with torch {here['torch']} "
                f"(CUDA {here['cuda']})")
    missing = missing_cpu_isa(record.get("cpu_isa", ""), cpu_flags())
    if missing:
        return f"{path} was compiled for CPU instruction sets this CPU lacks ({', '.join(missing)})"
    if record.get("checkpoint_sha256") != checkpoint_sha256:
        return f"{path} was built from another checkpoint (SHA-256 {str(record.get('checkpoint_sha256'))[:12]})"
    if record.get("bf16") != bf16:
        return f"{path} computes in {'bf16' if record.get('bf16') else 'float32'}, this run samples in " \
               f"{'bf16' if bf16 else 'float32'}"
    return None


class AotDenoiser:
    """A loaded package, callable like the model: (x [B, C, H, W], t int64 [B], labels int64 [B] | None).

    Loaded single-threaded: the default runner keeps a pool of model instances and waits on CUDA events
    to reuse one, which a call inside a CUDA-graph capture (ddpm.graphed, as sampling replays it) may
    not do."""

    def __init__(self, path: Path, record: dict[str, Any]):
        self.path, self.record = path, record
        self.num_classes = record["num_classes"]
        self.conditional = record["class_conditional"]
        self.runner = open_package(path)

    def __call__(self, x: torch.Tensor, t: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        if self.conditional:
            if labels is None:
                labels = torch.full_like(t, self.num_classes)
            return self.runner(x.contiguous(), t, labels)
        return self.runner(x.contiguous(), t)


def choose_package(package: str | Path | None, checkpoint: str | Path, device: torch.device,
                   bf16: bool) -> tuple[AotDenoiser | None, dict[str, Any]]:
    """The package to sample `checkpoint` with, or None, and the record of the choice for the run's tracking:
    {"network": "aot", "package", "device"} or {"network": "eager", "reason"}.

    `package`: a path, "auto" (<checkpoint folder>/model.pt2 when it exists) or None/"off" (never). A path
    that is no file is an error (ConfigError); a package that does not fit is refused with one log line."""
    if package in (None, "off"):
        return None, {"network": "eager", "reason": "no AOT package asked for"}
    path = Path(checkpoint).with_name(f"model{SUFFIX}") if package == "auto" else Path(package)
    if package != "auto" and not path.is_file():
        raise ConfigError(f"--aot {path}: no such file; pass the {SUFFIX} package that `ddpm export` wrote on a "
                          f"GPU of this kind, or auto, or off")
    if package == "auto" and device.type != "cuda":
        return None, {"network": "eager", "reason": f"packages are built for CUDA; sampling on {device.type}"}
    if package == "auto" and not path.is_file():
        return None, {"network": "eager", "reason": f"no AOT package at {path}"}
    start = time.perf_counter()
    why = refusal(path, device, file_sha256(checkpoint), bf16)
    if why is None:
        try:
            checked = time.perf_counter()
            den = AotDenoiser(path, read_record(path))
            loaded = time.perf_counter()
            if device.type == "cuda":
                _replays_in_a_cuda_graph(den, device)
        except Exception as exc:  # noqa: BLE001 - a package that will not load leaves the eager network
            why = f"{path} did not load ({type(exc).__name__}: {' '.join(str(exc).split())[:200]})"
        else:
            replay = f", graph replay checked in {time.perf_counter() - loaded:.1f} s" if device.type == "cuda" else ""
            log.info("sampling with the AOT package %s (no compile; checked in %.1f s, loaded in %.1f s%s)", path,
                     checked - start, loaded - checked, replay)
            return den, {"network": "aot", "package": str(path), "device": machine(device)["device"]}
    log.warning("AOT package refused, sampling eagerly: %s", why)
    return None, {"network": "eager", "reason": why}


@torch.no_grad()
def _replays_in_a_cuda_graph(den: AotDenoiser, device: torch.device) -> None:
    """Capture and replay one call at batch 2, as sampling will (ddpm.graphed); raises when the package cannot."""
    from ddpm.graphed import GraphedDenoiser

    x = torch.zeros((2, *den.record["image_shape"]), device=device)
    t = torch.zeros(2, dtype=torch.long, device=device)
    GraphedDenoiser(den)(x, t, torch.zeros_like(t) if den.conditional else None)
    torch.cuda.synchronize(device)  # an error of the replay is raised here, inside choose_package's try


def fsync_file(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


@torch.no_grad()
def sample_parity(den: AotDenoiser, model: nn.Module, cfg: Config, device: torch.device, bf16: bool, n: int,
                  steps: int, seed: int = 0) -> dict[str, Any]:
    """DDIM-`steps` images from the package and from the eager model, from the same x_T, at the same precision
    (bf16 autocast when `bf16`): mean and max |diff| in [-1, 1]."""
    schedule = Schedule.from_config(cfg.diffusion).to(device)
    x_T = torch.randn((n, *image_shape(cfg)), generator=torch.Generator(device=device).manual_seed(seed),
                      device=device)
    labels = torch.arange(n, device=device) % model.num_classes if cfg.model.class_conditional else None
    common = dict(labels=labels, prediction=cfg.diffusion.prediction, steps=steps)
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16, cache_enabled=False):
        a = ddim_sample_loop(den, schedule, x_T, **common).float().clamp(-1, 1)
        b = ddim_sample_loop(model, schedule, x_T, **common).float().clamp(-1, 1)
    diff = (a - b).abs()
    return {"n": n, "steps": steps, "seed": seed, "mean_abs_diff": float(diff.mean()),
            "max_abs_diff": float(diff.max())}


def export_package(checkpoint: str | Path, out: str | Path, settings: Config,
                   device: torch.device | None = None) -> dict[str, Any]:
    """Build, check and write the AOT package of `checkpoint`'s EMA U-Net at `out` (on CUDA only, as export.aot
    asks), for sampling in the precision `settings` ask for (runtime.bf16), checked on export.check_samples
    DDIM images of sampler.steps; returns the record: {"written": True, "file", "machine", "parity", ...} or
    {"written": False, "reason"}.

    Not written (a warning says why, the ONNX export stands without it): no CUDA device, a compile that
    fails, or samples that differ from the eager network's by more than export.aot_mean_atol (then a
    package already at `out` is removed: it cannot be this checkpoint's). The folder is held meanwhile."""
    out = Path(out)
    if not settings.export.aot:
        return {"written": False, "reason": "export.aot is off"}
    if device is None and not torch.cuda.is_available():
        log.info("no AOT package: no CUDA device here, and a package is built on the GPU it is for")
        return {"written": False, "reason": "no CUDA device: a package is built on the GPU it is for"}
    device = device or torch.device("cuda", torch.cuda.current_device())
    with owned(out.parent, "ddpm export"):
        tmp = out.with_name(f".{out.stem}.tmp-{os.getpid()}{SUFFIX}")  # aoti_compile_and_package wants .pt2
        try:
            return _export(Path(checkpoint), out, tmp, settings, device)
        finally:
            tmp.unlink(missing_ok=True)


def _export(checkpoint: Path, out: Path, tmp: Path, settings: Config, device: torch.device) -> dict[str, Any]:
    ecfg = settings.export
    model, cfg, ckpt = load_model(checkpoint, device, use_ema=True)
    bf16 = samples_in_bf16(settings, device)
    record = {"format": FORMAT, "machine": machine(device), "checkpoint_sha256": file_sha256(checkpoint),
              "bf16": bf16, "class_conditional": cfg.model.class_conditional, "num_classes": model.num_classes,
              "image_shape": list(image_shape(cfg)), "step": int(ckpt["step"]), "batch": [1, MAX_BATCH],
              "batch_hint": batch_hint(settings), "inductor_configs": INDUCTOR_CONFIGS}
    try:
        build_package(model, cfg, device, tmp, bf16, record["batch_hint"])
    except Exception as exc:  # noqa: BLE001 - the package is optional: a failed compile leaves the ONNX export
        reason = f"the AOT compile failed ({type(exc).__name__}: {' '.join(str(exc).split())[:300]})"
        log.warning("no AOT package: %s", reason)
        return {"written": False, "reason": reason}
    del model  # the check process loads its own copy
    record["cpu_isa"] = package_cpu_isa(tmp)
    try:
        parity = check_in_child(tmp, checkpoint, record, device, ecfg.check_samples, settings.sampler.steps)
    except PackageCheckFailed as exc:
        log.warning("no AOT package: %s", exc)
        return {"written": False, "reason": str(exc)}
    log.info("AOT package vs eager DDIM-%d samples: mean |diff| %.3g (allowed %.3g), max %.3g", parity["steps"],
             parity["mean_abs_diff"], ecfg.aot_mean_atol, parity["max_abs_diff"])
    if not parity["mean_abs_diff"] <= ecfg.aot_mean_atol:
        out.unlink(missing_ok=True)
        reason = (f"its samples differ from the eager network's by {parity['mean_abs_diff']:.3g} on average, more "
                  f"than export.aot_mean_atol={ecfg.aot_mean_atol:.3g}")
        log.warning("no AOT package: %s", reason)
        return {"written": False, "reason": reason, "parity": parity}
    record["parity"] = parity
    write_record(tmp, record)
    fsync_file(tmp)
    os.replace(tmp, out)
    fsync_dir(out.parent)
    return {"written": True, "file": str(out), **record}


class PackageCheckFailed(Exception):
    """The package's check process did not report its samples: it crashed, failed or timed out."""


CHECK_ENTRY = "from ddpm.aot_package import check_main; check_main()"
RESULT_PREFIX = "ddpm-aot-check "
CHECK_TIMEOUT_S = 900


def check_in_child(package: Path, checkpoint: Path, record: dict[str, Any], device: torch.device, n: int,
                   steps: int) -> dict[str, Any]:
    """sample_parity of `package` against `checkpoint`'s EMA network, run in a process of its own: AOTInductor's
    loader can crash the process that loads a package (docs/experiments/2026-12-03-aot-package-load-h200.md),
    and an export must survive that with its ONNX files. PackageCheckFailed says why."""
    args = {"package": str(package), "checkpoint": str(checkpoint), "record": record, "device": str(device),
            "n": n, "steps": steps}
    root = str(Path(__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p)}
    try:
        done = subprocess.run([sys.executable, "-c", CHECK_ENTRY], input=json.dumps(args), capture_output=True,
                              text=True, env=env, timeout=CHECK_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        raise PackageCheckFailed(f"its check did not finish in {CHECK_TIMEOUT_S} s") from None
    if done.returncode < 0:
        name = signal.Signals(-done.returncode).name if -done.returncode in signal.valid_signals() else "a signal"
        raise PackageCheckFailed(
            f"loading it crashed the check process ({name}): AOTInductor cannot load this package with torch "
            f"{torch.__version__} on {record['machine']['device']}; sampling stays eager")
    lines = [ln for ln in done.stdout.splitlines() if ln.startswith(RESULT_PREFIX)]
    if done.returncode != 0 or not lines:
        last = (done.stderr.strip().splitlines() or ["no output"])[-1]
        raise PackageCheckFailed(f"its check process failed (exit status {done.returncode}: {last[:300]})")
    return json.loads(lines[-1][len(RESULT_PREFIX):])


def check_main() -> None:
    """The check process of check_in_child: its arguments as JSON on stdin, the parity on one stdout line."""
    args = json.loads(sys.stdin.read())
    device = torch.device(args["device"])
    model, cfg, _ = load_model(args["checkpoint"], device, use_ema=True)
    den = AotDenoiser(Path(args["package"]), args["record"])
    if device.type == "cuda":
        _replays_in_a_cuda_graph(den, device)
    parity = sample_parity(den, model, cfg, device, args["record"]["bf16"], args["n"], args["steps"])
    print(RESULT_PREFIX + json.dumps(parity), flush=True)
