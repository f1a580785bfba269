"""Progressive distillation on one GPU: FID of the students against DDIM at the same network calls, and times.

Trains the teacher with a profile of params.yaml (default gpu-fast; or --teacher CKPT), distils it
with ddpm.distill down to --steps (default 1, so that the 8-, 4-, 2- and 1-step students all exist),
then writes one JSON (updated after every figure, so a run cut short keeps what it measured):

  - FID (evaluate.num_samples samples, the pinned feature net) of each round's student at its own
    steps, of the teacher's DDIM at the same counts and at 50 steps, and the FID floor;
  - wall-clock seconds of the teacher's training and of the distillation rounds (loading and
    compiling included), with the rounds down to distill.steps of the profile summed apart;
  - seconds for 10,000 samples of the profile's student on the GPU in batches of --gpu-batch (CUDA
    graphs, bf16; compiled as well when less than --budget-s has passed), a warm run after an untimed one;
  - onnxruntime CPU seconds per image, the student at its steps against the teacher's DDIM-50.

    PYTHONPATH=. python3 bench/distill_quality.py --out $OUT/distill_quality.json --runs /tmp/distill_runs
    PYTHONPATH=. python3 bench/distill_quality.py --smoke --out /tmp/distill_smoke.json   # CPU, a tiny model
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # before onnxruntime: it loads the CUDA libraries

from bench.harness import environment, log
from ddpm.checkpoint import load_model
from ddpm.config import Config, load_config
from ddpm.distill import DistillLayout, distill, round_steps_of
from ddpm.evaluate import evaluate_checkpoint, fid_floor
from ddpm.generate import generate
from ddpm.schedule import Schedule
from ddpm.train import train

GPU_STEPS = (1, 2, 4, 8)
SMOKE_OVERRIDES = ("train.steps=2", "train.batch_size=4", "train.log_every=1", "train.checkpoint_every=2",
                   "train.warmup_steps=0", "model.base_channels=8", "model.channel_mult=[1,2]",
                   "model.attention_levels=[]", "model.norm_groups=4", "distill.teacher_steps=4",
                   "distill.first_round_steps=2", "distill.round_steps=2", "distill.steps=2",
                   "evaluate.num_samples=40", "evaluate.batch_size=20",
                   "runtime.device=cpu", "sample.batch_size=20")


class Record:
    """The JSON document, written again after every figure."""

    def __init__(self, path: Path, doc: dict[str, Any]):
        self.path, self.doc = path, doc
        self.save()

    def save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.write_text(json.dumps(self.doc, indent=1, default=str) + "\n")

    def set(self, key: str, value: Any) -> None:
        self.doc[key] = value
        self.save()


def timed(fn: Callable[[], Any]) -> tuple[Any, float]:
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    start = time.perf_counter()
    out = fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return out, time.perf_counter() - start


def guarded(rec: Record, what: str, fn: Callable[[], Any]) -> None:
    """fn(); a failure is recorded under errors.<what> and the benchmark goes on with the next figure."""
    try:
        fn()
    except Exception as exc:  # noqa: BLE001 - one failed figure must not lose the others of a device call
        rec.doc.setdefault("errors", {})[what] = f"{type(exc).__name__}: {exc}"
        rec.save()
        log(f"{what} failed: {type(exc).__name__}: {exc}")


def teacher_checkpoint(cfg: Config, given: str | None, rec: Record) -> Path:
    if given:
        rec.set("teacher", {"checkpoint": given, "trained_here": False})
        return Path(given)
    result, seconds = timed(lambda: train(cfg, overwrite=True))
    rec.set("teacher", {"checkpoint": str(result.checkpoint), "trained_here": True, "train_seconds": seconds,
                        "steps": result.step, "final_loss": result.loss})
    log(f"teacher: {result.step} steps in {seconds:.1f} s")
    return Path(result.checkpoint)


def distil(cfg: Config, teacher: Path, rec: Record, goal_steps: int) -> dict[int, Path]:
    start = time.perf_counter()
    try:
        result = distill(cfg, teacher, overwrite=True)
    except Exception as exc:  # noqa: BLE001 - one retry in eager mode rather than a lost device call
        if not cfg.train.cuda_graphs:
            raise
        rec.set("distill_failed_with_cuda_graphs", f"{type(exc).__name__}: {exc}")
        log(f"distillation failed with CUDA graphs ({exc}); again without")
        cfg = replace(cfg, train=replace(cfg.train, cuda_graphs=False))
        start = time.perf_counter()
        result = distill(cfg, teacher, overwrite=True)
    total = time.perf_counter() - start
    rounds = [{"steps": r.steps, "seconds": r.seconds, "loss": r.loss} for r in result.rounds]
    rec.set("distill", {"rounds": rounds, "seconds_all_rounds": total,
                        "seconds_to_goal_steps": sum(r.seconds for r in result.rounds if r.steps >= goal_steps),
                        "goal_steps": goal_steps, "settings": cfg.to_dict()["distill"]})
    log(f"distilled in {total:.1f} s: " + ", ".join(f"{r['steps']} steps loss {r['loss']:.4f} "
                                                    f"({r['seconds']:.0f} s)" for r in rounds))
    return {r.steps: r.checkpoint for r in result.rounds}


def fid_of(cfg: Config, checkpoint: Path, steps: int, out: Path) -> dict[str, Any]:
    m = evaluate_checkpoint(checkpoint, replace(cfg, sampler=replace(cfg.sampler, name="ddim", steps=steps)), out)
    return {k: m[k] for k in ("fid", "precision", "recall", "sample_seconds", "num_samples", "steps") if k in m}


def quality(cfg: Config, teacher: Path, students: dict[int, Path], rec: Record, out: Path,
            counts: tuple[int, ...]) -> None:
    rows = rec.doc.setdefault("fid", [])
    rec.set("fid_floor", fid_floor(cfg))
    jobs = [("student", n, students[n]) for n in sorted(students)] + [("ddim", 50, teacher)] + \
        [("ddim", n, teacher) for n in sorted(set(counts) - {50})]  # the ratio's pair first: a call cut short keeps it
    for kind, n, ckpt in jobs:
        m = fid_of(cfg, ckpt, n, out / f"eval_{kind}_{n}")
        rows.append({"sampler": kind, "network_calls": n, **m})
        rec.save()
        log(f"{kind} {n} steps: FID {m['fid']:.2f}")


def gpu_sampling(cfg: Config, student: Path, steps: int, rec: Record, compiled: bool, batch: int) -> None:
    """Seconds for 10,000 student samples in batches of `batch`: an untimed first run (graph capture, compile), then
    a timed one."""
    model, scfg, _ = load_model(student, "cuda")
    schedule = Schedule.from_config(scfg.diffusion)
    scfg = replace(scfg, sampler=replace(scfg.sampler, name="ddim", steps=steps))
    sc = replace(scfg.sample, batch_size=batch)

    def run() -> Any:
        return generate(model, schedule, scfg, 10000, sample_cfg=sc, compile=compiled)

    _, first = timed(run)
    _, warm = timed(run)
    rec.doc.setdefault("gpu_10k", []).append({"compiled": compiled, "batch": batch, "first_s": first, "warm_s": warm})
    rec.save()
    log(f"10,000 student samples, batch {batch}, compiled={compiled}: {warm:.3f} s warm ({first:.1f} s first)")


def onnx_cpu(cfg: Config, teacher: Path, student: Path, steps: int, out: Path, rec: Record, n: int) -> None:
    """onnxruntime CPU seconds per image at batch n: the student at its steps, the teacher's DDIM-50."""
    from ddpm.export import export_onnx
    from ddpm.onnx_model import OnnxDenoiser
    from ddpm.onnx_sampler import sample

    rows = rec.doc.setdefault("onnx_cpu", [])
    for name, ckpt, k in (("student", student, steps), ("ddim", teacher, 50)):
        path = export_onnx(ckpt, out / f"{name}.onnx", cfg.export)
        den = OnnxDenoiser(path, "cpu")
        sample(den, min(n, 4), steps=k, batch_size=n)  # warm-up
        _, seconds = timed(lambda d=den, k=k: sample(d, n, steps=k, batch_size=n))
        rows.append({"model": name, "network_calls": k, "batch": n, "seconds": seconds, "per_image_s": seconds / n})
        rec.save()
        log(f"onnxruntime CPU {name} {k} steps: {seconds / n * 1000:.1f} ms per image")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="the JSON file")
    p.add_argument("--runs", default=None, help="checkpoints, evaluations, ONNX files (default: <out stem>_runs/)")
    p.add_argument("--profile", default="gpu-fast")
    p.add_argument("--teacher", default=None, help="a trained checkpoint to distil instead of training one")
    p.add_argument("--steps", type=int, default=1, help="distil down to this many steps (default: %(default)s)")
    p.add_argument("--gpu-batch", type=int, default=2500, help="batch of the GPU sampling (default: %(default)s)")
    p.add_argument("--onnx-batch", type=int, default=64)
    p.add_argument("--budget-s", type=float, default=420.0,
                   help="skip the compiled sampling when this many seconds have passed (default: %(default)s)")
    p.add_argument("--smoke", action="store_true", help="CPU, a tiny model, a few samples: the code path only")
    p.add_argument("overrides", nargs="*")
    args = p.parse_args()
    start = time.perf_counter()
    out = Path(args.out)
    runs = Path(args.runs) if args.runs else out.with_name(out.stem + "_runs")
    profile = "cpu" if args.smoke else args.profile
    extra = [*(SMOKE_OVERRIDES if args.smoke else ("evaluate.num_samples=10000", "evaluate.batch_size=1000"))]
    base = load_config("params.yaml", profile, [*extra, f"train.out_dir={runs / 'teacher'}", "train.sample_every=0",
                                                *args.overrides])
    goal = base.distill.steps
    cfg = load_config("params.yaml", profile, [*extra, f"train.out_dir={runs / 'teacher'}", "train.sample_every=0",
                                               *args.overrides, f"distill.steps={args.steps}"])
    device = torch.device("cuda" if torch.cuda.is_available() and not args.smoke else "cpu")
    rec = Record(out, {"environment": environment(device), "profile": profile, "overrides": args.overrides,
                       "smoke": args.smoke, "feature_net": "pinned"})
    teacher = teacher_checkpoint(cfg, args.teacher, rec)
    students = distil(cfg, teacher, rec, goal)
    counts = tuple(n for n in (GPU_STEPS if not args.smoke else round_steps_of(cfg)) if n in students)
    guarded(rec, "fid", lambda: quality(cfg, teacher, students, rec, runs, counts))
    if device.type == "cuda":
        guarded(rec, "gpu_10k", lambda: gpu_sampling(cfg, students[goal], goal, rec, compiled=False,
                                                     batch=args.gpu_batch))
    guarded(rec, "onnx_cpu", lambda: onnx_cpu(cfg, teacher, students[goal], goal, runs, rec,
                                              4 if args.smoke else args.onnx_batch))
    if device.type == "cuda":
        if time.perf_counter() - start < args.budget_s:
            guarded(rec, "gpu_10k_compiled", lambda: gpu_sampling(cfg, students[goal], goal, rec, compiled=True,
                                                                  batch=args.gpu_batch))
        else:
            rec.set("gpu_10k_compiled_skipped", f"past --budget-s {args.budget_s:.0f} s")
    rec.set("total_seconds", time.perf_counter() - start)
    assert DistillLayout.of(cfg).student.is_file()
    return 0


if __name__ == "__main__":
    sys.exit(main())
