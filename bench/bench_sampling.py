"""Sampling throughput on one GPU: 1000-step DDPM and 50-step DDIM, per mode and batch size.

The sampling loops (bench/sampling_loops.py) compute what ddpm.samplers computes, each step reading
only device tensors so that one captured CUDA graph replays every step. Each mode's DDIM output is
compared with ddpm.samplers.ddim_sample_loop on the same x_T (and, in eager mode, DDPM with
p_sample_loop on the same random stream); one case is bench/sampling_cases.py.

Modes (--modes):
  eager          the U-Net and the update in plain PyTorch.
  graph          one step (U-Net forward + update) captured in a torch.cuda.CUDAGraph on static
                 buffers, replayed once per step. No compile cost.
  compile        torch.compile(net, dynamic=False); the update stays eager. DDPM and DDIM share
                 the compiled U-Net, so each batch size compiles once. Our U-Net's GroupNorms take
                 their per-channel form, as under `sample.compile`.
  compile-graph  the compiled U-Net + update captured in a CUDA graph, as `graph` (no second compile).
  reduce-overhead  torch.compile(net, mode="reduce-overhead"), opt-in (its own compile).

Plan, in priority order under --budget-s: batch --batch (256) in the cheap modes (our U-Net, then
the diffusers twin: per-step latency); DDIM in `graph` mode at each --search-batches value to find
the max-throughput batch; the other modes at that batch (compile-based ones compile there); the
"10,000 MNIST images with 50-step DDIM" wall time on the fastest (mode, batch) measured; last,
compile-based modes at --batch.

    python bench/bench_sampling.py --out results/sampling.json --out-md results/sampling.md
    python bench/bench_sampling.py --device cpu --smoke
"""

from __future__ import annotations

import argparse
import sys
import traceback
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import harness as H
from bench.models import MODEL_NAMES, Spec, specs
from bench.sampling_cases import Bench
from bench.sampling_loops import MODES, TORCH_COMPILE_MODE, Runner
SMOKE_OVERRIDES = ("model.base_channels=32", "model.num_res_blocks=1", "diffusion.timesteps=20", "sampler.steps=5")


# ------------------------------------------------------------------------------------------- samplers

# ------------------------------------------------------------------------------------------------- args

def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    p.add_argument("--models", default="mnist", help=f"comma-separated, from {', '.join(MODEL_NAMES)}")
    p.add_argument("--reference", action=argparse.BooleanOptionalAction, default=True,
                   help="also time the diffusers UNet2DModel twin at --batch (per-step latency)")
    p.add_argument("--reference-compile", action="store_true", help="compile-based modes for the twin too")
    p.add_argument("--modes", default=None,
                   help=f"from {', '.join(MODES)} (default: eager,graph,compile,compile-graph; with --smoke: "
                        "eager,graph)")
    p.add_argument("--batch", type=int, default=256, help="the latency batch size")
    p.add_argument("--search-batches", default="512,1024,2048",
                   help="larger batches tried (DDIM, graph mode) for the max-throughput batch")
    p.add_argument("--compile-at", default="best,batch",
                   help="where compile-based modes run, in order: 'best' (max-throughput batch), 'batch' (--batch)")
    p.add_argument("--ddim-steps", type=int, default=50)
    p.add_argument("--windows", type=int, default=3, help="timed windows (DDIM: one full chain each)")
    p.add_argument("--ddpm-window-s", type=float, default=1.5,
                   help="target seconds per DDPM window: the first K steps of the 1000-step chain, "
                        "K <= 1000 (K = 1000 is a full chain)")
    p.add_argument("--check-ddpm", action=argparse.BooleanOptionalAction, default=None,
                   help="compare eager/compile DDPM with p_sample_loop on the same noise (two more full "
                        "1000-step chains; default: only with --smoke)")
    p.add_argument("--fast-images", type=int, default=10000, help="images of the fastest-path wall-time run")
    p.add_argument("--fast-runs", type=int, default=2)
    p.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=True, help="bf16 autocast (CUDA only)")
    p.add_argument("--channels-last", action="store_true")
    p.add_argument("--cudnn-benchmark", action="store_true")
    p.add_argument("--inductor", action="append", type=H.parse_inductor_option, default=[], metavar="KEY=VALUE",
                   help="a torch._inductor.config setting for compile-based modes (repeatable), "
                        "e.g. coordinate_descent_tuning=True")
    p.add_argument("--matmul-n", type=int, default=8192)
    p.add_argument("--budget-s", type=float, default=200.0,
                   help="start no case whose estimate would end past this many seconds from start")
    p.add_argument("--compile-guess-s", type=float, default=60.0,
                   help="first guess of one inference compile of the MNIST U-Net, until one is measured")
    p.add_argument("--smoke", action="store_true", help="tiny model, schedule and batches, to check the code path")
    p.add_argument("--out", default=None)
    p.add_argument("--out-md", default=None)
    args = p.parse_args(argv)
    args.models = H.parse_choices(args.models, MODEL_NAMES, "--models")
    args.modes = H.parse_choices(args.modes or ("eager,graph" if args.smoke else "eager,graph,compile,compile-graph"),
                                 MODES, "--modes")
    args.search_batches = H.parse_int_list(args.search_batches)
    args.compile_at = H.parse_choices(args.compile_at, ("best", "batch"), "--compile-at")
    args.overrides, args.warmup = (), 3
    if args.check_ddpm is None:
        args.check_ddpm = args.smoke
    if args.smoke:
        args.batch, args.search_batches, args.ddim_steps = 2, [4], 5
        args.windows, args.matmul_n, args.budget_s, args.warmup = 1, 256, 1e9, 1
        args.fast_images, args.fast_runs = 10, 1
        args.overrides = SMOKE_OVERRIDES
    return args


# ----------------------------------------------------------------------------------------------- report

def render(doc: dict[str, Any]) -> str:
    env, peak = doc.get("environment", {}), doc.get("matmul_peak", {})
    out = [f"# Sampling throughput: {env.get('gpu') or env.get('device')} ({env.get('date_utc')})", "",
           f"torch {env.get('torch')}, CUDA {env.get('cuda')}, cuDNN {env.get('cudnn')}, triton {env.get('triton')}, "
           f"diffusers {env.get('diffusers')}, driver {env.get('driver')}, git {env.get('git_commit')}.",
           f"Dense bf16 matmul {peak.get('n')}^3 in this process: {H.fmt(peak.get('tflops'))} TFLOP/s.",
           f"Settings: {doc.get('settings')}.", "",
           f"DDIM: {doc.get('settings', {}).get('ddim_steps')}-step chains (eta = 0), median of timed chains. "
           "DDPM: the T-step chain (T below); img/s = batch / (T x median step time) over windows of the first K "
           "steps (K = T is a full chain). TFLOP/s counts forward FLOPs only (FlopCounterMode). "
           "'DDIM diff vs lib': max |x_0 - ddim_sample_loop's x_0| from the same x_T (bf16 rounding in "
           "compiled modes; about 0 in eager and graph modes, exactly 0 on the CPU).", ""]
    out.append(H.md_table(["model", "network", "params (M)", "fwd GFLOP/img", "T"], [
        [k, v["class"], H.fmt(v["params"] / 1e6, 3), H.fmt(v["fwd_flops_per_image"] / 1e9, 3), v["timesteps"]]
        for k, v in doc.get("models", {}).items()]))
    out.append("")
    rows = []
    for r in doc.get("results", []):
        if r.get("status") != "ok":
            why = f"{r['status']}: {r.get('error', '')[:120]}"
            rows.append([r["model"], r["batch"], r["mode"]] + ["-"] * 8 + [why])
            continue
        ddpm_k = r.get("ddpm_steps_per_window")
        rows.append([r["model"], r["batch"], r["mode"],
                     H.fmt(r.get("ddim_ms_per_step"), 3), H.fmt(r.get("ddim_images_per_s"), 0),
                     H.fmt(r.get("ddim_tflops")), H.fmt(r.get("ddpm_ms_per_step"), 3),
                     H.fmt(r.get("ddpm_images_per_s"), 0) + (f" (K={ddpm_k})" if ddpm_k else ""),
                     H.fmt(r.get("peak_mem_gib"), 2), H.fmt(r.get("compile_s")),
                     H.fmt(r.get("ddim_max_abs_diff_vs_library"), 4) if "ddim_max_abs_diff_vs_library" in r else "-",
                     "ok"])
    out.append(H.md_table(["model", "batch", "mode", "DDIM ms/step", "DDIM-50 img/s", "DDIM TFLOP/s",
                           "DDPM ms/step", "DDPM-T img/s", "peak GiB", "compile s", "DDIM diff vs lib",
                           "status"], rows))
    for name, best in doc.get("best_batch", {}).items():
        tried = ", ".join(f"{b}: {H.fmt(v, 0)}" for b, v in best["tried"].items())
        out.append(f"\nMax-throughput batch for {name} (DDIM img/s in {best['mode']} mode: {tried}): "
                   f"**{best['batch']}**.")
    fast = doc.get("fastest")
    if fast:
        if fast.get("status") == "ok":
            out.append(f"\n**{fast['images']:,} MNIST-shaped images, {fast['ddim_steps']}-step DDIM** "
                       f"({fast['model']}, "
                       f"{fast['mode']}, batch {fast['batch']}, {fast['images_generated']} generated): "
                       f"**{fast['wall_s']:.2f} s** wall, noise to uint8 on the host "
                       f"(runs: {', '.join(f'{w:.2f}' for w in fast['wall_s_runs'])}); goal < 5 s "
                       f"{'met' if fast['meets_goal'] else 'NOT met'}.")
        else:
            out.append(f"\nFastest-path run: {fast.get('status')}: {fast.get('error')}")
    out += H.report_footer(doc)
    return "\n".join(out)


# ------------------------------------------------------------------------------------------------- main

class Fastest:
    """The fastest DDIM runner seen so far for an MNIST-shaped model (only it, and its graph, stays alive)."""

    def __init__(self) -> None:
        self.best: tuple[float, Spec, dict[str, Any], Runner] | None = None

    def consider(self, spec: Spec, row: dict[str, Any], runners: dict[str, Runner]) -> None:
        if row.get("status") == "ok" and "ddim" in runners and spec.shape[1:] == (28, 28):
            if self.best is None or row["ddim_images_per_s"] > self.best[0]:
                self.best = (row["ddim_images_per_s"], spec, row, runners["ddim"])


def add_models(bench: Bench, all_specs: list[Spec]) -> list[Spec]:
    """Build every network; a twin that diffusers cannot build is left out (and said so), ours must build."""
    doc = bench.doc
    built = []
    for s in all_specs:
        try:
            bench.add_model(s)
            built.append(s)
        except Exception as exc:
            if not s.is_reference:
                raise
            traceback.print_exc()
            doc["left_out"][s.name] = f"could not be built: {type(exc).__name__}: {exc}"
    bench.base_units = bench.units.get("mnist", next(iter(bench.units.values())))
    bench.report.save()
    return built


def search_best_batch(bench: Bench, spec: Spec, search_mode: str | None, fastest: Fastest) -> tuple[int, float]:
    """Step 3: DDIM in `search_mode` at each --search-batches value; the smallest batch within 2% of the best
    throughput (as fast, less memory and less padding) and that throughput."""
    args, doc = bench.args, bench.doc
    tput = {args.batch: next((r["ddim_images_per_s"] for r in doc["results"] if r["model"] == spec.name and
                              r["mode"] == search_mode and r["batch"] == args.batch and r["status"] == "ok"), 0.0)}
    if search_mode is not None:
        for b in args.search_batches:
            row, runners = bench.case(spec, search_mode, b, ("ddim",), check=False, keep=True)
            if row["status"] == "ok":
                tput[b] = row["ddim_images_per_s"]
                fastest.consider(spec, row, runners)
    top = max(tput.values()) if tput else 0.0
    best = min(b for b, v in tput.items() if v >= 0.98 * top) if top > 0 else args.batch
    doc.setdefault("best_batch", {})[spec.name] = {"mode": search_mode, "batch": best, "images_per_s": top,
                                                   "tried": {str(k): v for k, v in sorted(tput.items())}}
    H.log(f"[sample] max-throughput batch for {spec.name}: {best} ({top:,.0f} img/s, {search_mode})")
    return best, top


def run_model(bench: Bench, spec: Spec, refs: list[Spec]) -> None:
    """Every case of one of our models (and its twin), in the priority order of the module docstring."""
    args = bench.args
    cheap = [m for m in args.modes if m not in TORCH_COMPILE_MODE]
    costly = [m for m in args.modes if m in TORCH_COMPILE_MODE]
    both, fastest = ("ddim", "ddpm"), Fastest()
    for mode in cheap:  # 1. the latency batch, cheap modes
        row, runners = bench.case(spec, mode, args.batch, both, check=True, keep=True)
        fastest.consider(spec, row, runners)
    for ref in [r for r in refs if r.name == f"{spec.name}-ref"]:  # 2. the twin at the same batch, same process
        for mode in cheap + (costly if args.reference_compile else []):
            bench.case(ref, mode, args.batch, ("ddim",), check=True)
    search_mode = "graph" if "graph" in cheap else (cheap[0] if cheap else None)
    best, top = search_best_batch(bench, spec, search_mode, fastest)  # 3.
    # time kept back for the fastest-path run, which must not be squeezed out by a compile
    reserve = (args.fast_runs * args.fast_images / top + 10.0 if top > 0 else 30.0) \
        if spec.shape[1:] == (28, 28) else 0.0
    # 4. every mode at that batch (DDPM too); compile-based ones compile here
    at_best = [m for m in cheap] if best != args.batch else []
    at_best += costly if "best" in args.compile_at else []
    for mode in at_best:
        samplers = ("ddpm",) if mode == search_mode and best != args.batch else both  # DDIM done in 3.
        row, runners = bench.case(spec, mode, best, samplers, check=best == args.batch, keep=True, reserve_s=reserve)
        fastest.consider(spec, row, runners)
    if fastest.best is not None and spec.shape[1:] == (28, 28):  # 5. the 10,000-image run, MNIST-shaped models
        _, fspec, frow, frunner = fastest.best
        bench.fast_run(fspec, frow, frunner)
    fastest.best = None
    H.free_memory(bench.device)
    # 6. compile-based modes at the latency batch, unless step 4 already ran them there
    if "batch" in args.compile_at and not (best == args.batch and "best" in args.compile_at):
        for mode in costly:
            bench.case(spec, mode, args.batch, both, check=True)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    device, report = H.start_report(args, render, "sample")
    doc = report.doc
    bench = Bench(args, device, report)
    all_specs, doc["left_out"] = specs(args.models, args.reference, args.overrides)
    doc["models"], doc["results"] = {}, []
    all_specs = add_models(bench, all_specs)
    refs = [s for s in all_specs if s.is_reference]
    for spec in [s for s in all_specs if not s.is_reference]:
        run_model(bench, spec, refs)
    doc["wall_s"] = bench.budget.elapsed()
    report.save()
    print()
    print(render(doc))
    return doc


if __name__ == "__main__":
    main()
