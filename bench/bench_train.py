"""Training throughput of the U-Net on one GPU: images/s, ms/step, TFLOP/s, share of the bf16 peak, memory.

One step is ddpm.train_step's step, the one `ddpm train` runs (make_train_step), on random uint8
data already on the device: draw a batch (gather + scaling), t and noise from the state's generator;
q_sample + forward + loss (p_losses) under bf16 autocast; backward; gradient clipping
(train.grad_clip); fused AdamW at the scheduled learning rate; EMA with its warm-up; the NaN guard.

Modes (--modes):
  eager          plain PyTorch, as ddpm.train runs with train.compile=false.
  graph          eager kernels, the update captured once in a CUDA graph and replayed, as `ddpm train`
                 with train.cuda_graphs (the batch drawn eagerly and copied in; fused AdamW with
                 capturable=True). No compile cost; removes launch overhead.
  compile        torch.compile(model, dynamic=False), default mode, as ddpm.train with compile=true:
                 our U-Net with ddpm.train_compile.compile_options(cuda_graphs=False) (--inductor settings
                 override them), the twins with inductor's defaults (--compile-options).
  compile-graph  the same, with compile_options(cuda_graphs=True) for our U-Net (its own compile;
                 for a twin without options it reuses the compile of `compile`), the update
                 captured in a CUDA graph as in `graph`.
  reduce-overhead, max-autotune-no-cudagraphs
                 torch.compile modes, opt-in. reduce-overhead graphs forward and backward only
                 (the optimizer and EMA stay eager) and compiles again; max-autotune autotunes
                 matmul/conv templates and takes minutes per shape. compile-graph is the sensible
                 CUDA-graph mode for this budget; see bench/README.md.
Compile-based modes run only at --compile-batches (each new batch size compiles again; the compile
times are in each result's `compile_s`). Our U-Net compiles once for
`compile` and once for `compile-graph`; compile-graph runs first.

FLOPs: forward FLOPs per image counted by torch.utils.flop_counter.FlopCounterMode; a training
step counts 3x forward. The share is of a dense bf16 8192^3 matmul timed in the same process.

    python bench/bench_train.py --out results/train.json --out-md results/train.md
    python bench/bench_train.py --device cpu --smoke
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import math
import sys
import traceback
from pathlib import Path
from typing import Any, Callable, Literal

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from bench import harness as H
from bench.models import MODEL_NAMES, Spec, forward_flops, num_params, specs
from ddpm.config import Config
from ddpm.layers import use_hashed_dropout, use_padded_image_convs, use_per_channel_group_norm
from ddpm.schedule import Schedule
from ddpm.train_compile import compile_options
from ddpm.train_step import EAGER_STEPS_BEFORE_CAPTURE, TrainData, TrainState, make_train_step

MODES = ("eager", "graph", "compile", "compile-graph", "reduce-overhead", "max-autotune-no-cudagraphs")
# torch.compile mode behind each compile-based mode; modes with one Trainee.compile_key share a compiled model.
TORCH_COMPILE_MODE = {"compile": "default", "compile-graph": "default", "reduce-overhead": "reduce-overhead",
                      "max-autotune-no-cudagraphs": "max-autotune-no-cudagraphs"}
GRAPH_MODES = {"graph", "compile-graph"}
# --smoke: a narrower, shallower U-Net of the same layout, so a 2-core CPU runs every code path in minutes.
SMOKE_OVERRIDES = ("model.base_channels=32", "model.num_res_blocks=1")
POOL_IMAGES = 8192  # random uint8 "training set" on the device; batches are gathered from it


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    p.add_argument("--models", default="mnist,cifar10", help=f"comma-separated, from {', '.join(MODEL_NAMES)}")
    p.add_argument("--reference", action=argparse.BooleanOptionalAction, default=True,
                   help="also run the diffusers UNet2DModel twin of each model")
    p.add_argument("--reference-only", action="store_true",
                   help="run the twins alone (e.g. in their usual NCHW layout, our U-Net in another process); "
                        "not with --no-reference")
    p.add_argument("--reference-compile", action="store_true",
                   help="run compile-based modes on the twins too (each costs its own compile)")
    p.add_argument("--modes", default=None,
                   help=f"from {', '.join(MODES)} (default: eager,graph,compile,compile-graph; "
                        "with --smoke: eager,graph, since a CPU compile takes minutes)")
    p.add_argument("--batches", default="128,512")
    p.add_argument("--compile-batches", default="512",
                   help="batches at which compile-based modes run ('all': every --batches value)")
    p.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=True,
                   help="bf16 autocast (CUDA only, as ddpm.train)")
    p.add_argument("--channels-last", action="store_true",
                   help="model and inputs in channels_last (as train.channels_last, set in the gpu profiles)")
    p.add_argument("--per-channel-gn", action=argparse.BooleanOptionalAction, default=True,
                   help="our U-Net's GroupNorm statistics from per-channel sums when compiled, as ddpm.train "
                        "does with train.compile (ddpm.layers.GroupNorm)")
    p.add_argument("--compile-options", default="ours", choices=["ours", "all", "none"],
                   help="which networks the default-mode compile gives ddpm.train_compile.compile_options "
                        "(ours: as ddpm train; the twins keep inductor's defaults)")
    p.add_argument("--hashed-dropout", action=argparse.BooleanOptionalAction, default=True,
                   help="our U-Net's dropout masks from a hash of each element's offset when compiled, as "
                        "ddpm.train does with train.compile (ddpm.layers.Dropout)")
    p.add_argument("--padded-image-convs", action=argparse.BooleanOptionalAction, default=True,
                   help="with --channels-last, our U-Net's image-channel convolutions padded to 8 channels when "
                        "compiled, as ddpm.train with train.compile and train.channels_last (ddpm.layers.ImageConv2d)")
    p.add_argument("--cudnn-benchmark", action="store_true", help="torch.backends.cudnn.benchmark = True")
    p.add_argument("--inductor", action="append", type=H.parse_inductor_option, default=[], metavar="KEY=VALUE",
                   help="a torch._inductor.config setting for compile-based modes (repeatable), "
                        "e.g. coordinate_descent_tuning=True; for networks compiled with "
                        "ddpm.train_compile.compile_options it overrides those, e.g. triton.multi_kernel=0")
    p.add_argument("--windows", type=int, default=5, help="timed windows per case (the median is reported)")
    p.add_argument("--window-s", type=float, default=0.25, help="target seconds per timed window")
    p.add_argument("--matmul-n", type=int, default=8192)
    p.add_argument("--budget-s", type=float, default=225.0,
                   help="start no case whose estimate would end past this many seconds from start")
    p.add_argument("--compile-guess-s", type=float, default=80.0,
                   help="first guess of one training compile of the MNIST model, until one is measured")
    p.add_argument("--smoke", action="store_true", help="tiny batches and iterations, to check the code path")
    p.add_argument("--out", default=None, help="JSON results path")
    p.add_argument("--out-md", default=None, help="markdown results path")
    args = p.parse_args(argv)
    if args.reference_only and not args.reference:
        p.error("--reference-only runs the twins alone; --no-reference leaves nothing to run")
    args.models = H.parse_choices(args.models, MODEL_NAMES, "--models")
    args.modes = H.parse_choices(args.modes or ("eager,graph" if args.smoke else "eager,graph,compile,compile-graph"),
                                 MODES, "--modes")
    args.batches = H.parse_int_list(args.batches)
    args.compile_batches = (list(args.batches) if args.compile_batches == "all"
                            else H.parse_int_list(args.compile_batches))
    args.overrides, args.warmup = (), 3
    if args.smoke:
        args.batches, args.compile_batches = [2], [2]
        args.windows, args.matmul_n, args.budget_s, args.warmup = 2, 256, 1e9, 1
        args.overrides = SMOKE_OVERRIDES
    return args


# ------------------------------------------------------------------------------------------------ plan

def plan(all_specs: list[Spec], args: argparse.Namespace) -> list[tuple[Spec, int, str]]:
    """Cases in priority order: every cheap (no-compile) case first, then the compiled ones, compile-graph
    (what the gpu profiles train with) before the others, so that a tight --budget-s is spent on it."""
    cheap = [m for m in args.modes if m not in TORCH_COMPILE_MODE]
    costly = sorted((m for m in args.modes if m in TORCH_COMPILE_MODE), key=lambda m: m != "compile-graph")
    cases = [(s, b, m) for s in all_specs for b in args.batches for m in cheap]
    for s in all_specs:
        if s.is_reference and not args.reference_compile:
            continue
        for b in args.compile_batches:
            cases += [(s, b, m) for m in costly]
    return cases


# ------------------------------------------------------------------------------------------------ step

class Trainee:
    """One network's persistent training state: model, EMA copy, compiled wrappers, random data pool."""

    def __init__(self, spec: Spec, device: torch.device, channels_last: bool, per_channel_gn: bool = True,
                 options_for: Literal["ours", "all", "none"] = "ours", hashed_dropout: bool = True,
                 inductor: dict[str, Any] | None = None, padded_image_convs: bool = True):
        self.spec = spec
        # --inductor settings, also set globally; repeated here because torch.compile's options win over
        # the global config (e.g. triton.multi_kernel=0 against compile_options(True))
        self.inductor = dict(inductor or {})
        # ddpm.train's inductor settings for the default-mode compile (torch.compile takes no options
        # with another mode)
        if options_for not in ("ours", "all", "none"):
            raise ValueError(f"options_for={options_for!r}: expected 'ours', 'all' or 'none'")
        self.with_options = options_for == "all" or (options_for == "ours" and not spec.is_reference)
        self.model = spec.build().to(device)
        self.per_channel_gn = per_channel_gn and not spec.is_reference
        if self.per_channel_gn:  # as ddpm.train sets it; it acts in compiled modes only
            use_per_channel_group_norm(self.model)
        self.hashed_dropout = hashed_dropout and not spec.is_reference
        if self.hashed_dropout:  # as ddpm.train sets it; it acts in compiled modes only
            use_hashed_dropout(self.model)
        self.padded_image_convs = padded_image_convs and channels_last and not spec.is_reference
        if self.padded_image_convs:  # as ddpm.train sets it with train.channels_last; compiled modes only
            use_padded_image_convs(self.model)
        if channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        self.model.train()
        self.ema = copy.deepcopy(self.model).eval().requires_grad_(False)
        self.schedule = Schedule.from_config(spec.cfg.diffusion).to(device)
        g = torch.Generator(device=device).manual_seed(0)
        pool = torch.randint(0, 256, (POOL_IMAGES, *spec.shape), device=device, dtype=torch.uint8, generator=g)
        if channels_last:  # as ddpm.train lays out its training set with train.channels_last
            pool = pool.contiguous(memory_format=torch.channels_last)
        self.data = TrainData(pool, torch.zeros(POOL_IMAGES, device=device, dtype=torch.long))
        self.compiled: dict[str, Callable[..., torch.Tensor]] = {}
        self.compiled_batches: set[tuple[str, int]] = set()
        self.units = sum(1 for _ in self.model.modules())  # a proxy for compile cost
        self.state_bytes = sum(t.numel() * t.element_size() for t in
                               [*self.model.parameters(), *self.ema.parameters(), pool])

    def options(self, mode: str) -> dict[str, Any] | None:
        """The inductor options `mode` compiles with (None: a torch.compile mode, which takes none)."""
        if mode not in TORCH_COMPILE_MODE or TORCH_COMPILE_MODE[mode] != "default":
            return None
        return {**compile_options(mode in GRAPH_MODES), **self.inductor} if self.with_options else {}

    def compile_key(self, mode: str) -> str:
        """Modes with one key share one compiled model."""
        return TORCH_COMPILE_MODE[mode] + repr(sorted((self.options(mode) or {}).items()))

    def net(self, mode: str) -> Callable[..., torch.Tensor]:
        if mode not in TORCH_COMPILE_MODE:
            return self.model
        key, options = self.compile_key(mode), self.options(mode)
        if key not in self.compiled:
            kw = {"mode": TORCH_COMPILE_MODE[mode]} if options is None else {"options": options}
            self.compiled[key] = torch.compile(self.model, dynamic=False, **kw)
        return self.compiled[key]


def case_config(cfg: Config, batch: int, mode: str, args: argparse.Namespace) -> Config:
    """The spec's settings with this case's batch, precision, layout, compile and CUDA-graph choices."""
    tc = dataclasses.replace(cfg.train, batch_size=batch, channels_last=args.channels_last,
                             compile=mode in TORCH_COMPILE_MODE, cuda_graphs=mode in GRAPH_MODES)
    return dataclasses.replace(cfg, train=tc, runtime=dataclasses.replace(cfg.runtime, bf16=args.bf16))


def run_case(tr: Trainee, batch: int, mode: str, args: argparse.Namespace, device: torch.device,
             fwd_flops: float, peak_tflops: float, budget: H.Budget) -> dict[str, Any]:
    sync = H.synchronizer(device)
    H.free_memory(device)
    # Other models stay resident between cases; count only this model's own state and the step.
    resident = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0
    cfg = case_config(tr.spec.cfg, batch, mode, args)
    graphed = mode in GRAPH_MODES and device.type == "cuda"
    state = TrainState.create(tr.model, cfg.train, device, graphed=graphed, seed=0, ema=tr.ema)
    net = tr.net(mode)
    step = make_train_step(state, cfg, tr.data, tr.schedule, net=net)
    mark = torch.compiler.cudagraph_mark_step_begin if mode == "reduce-overhead" else (lambda: None)
    losses: list[torch.Tensor] = []

    def fn() -> None:
        mark()
        losses[:] = [step()]
    row: dict[str, Any] = {"model": tr.spec.name, "batch": batch, "mode": mode, "channels_last": args.channels_last,
                           "per_channel_gn": tr.per_channel_gn, "hashed_dropout": tr.hashed_dropout,
                           "padded_image_convs": tr.padded_image_convs, "bf16": args.bf16 and device.type == "cuda",
                           "compile_options": tr.options(mode)}
    try:
        first_s, compiled_before = None, True
        if mode in TORCH_COMPILE_MODE:
            compiled_before = (tr.compile_key(mode), batch) in tr.compiled_batches
            _, first_s = H.timed_once(fn, sync)
            tr.compiled_batches.add((tr.compile_key(mode), batch))
        # a graphed step runs eagerly at first, is captured at the next call and replayed from then on
        for _ in range(args.warmup + (EAGER_STEPS_BEFORE_CAPTURE + 1 if graphed else 0)):
            fn()
        iters = 1 if args.smoke else H.iters_for(fn, sync, args.window_s, lo=3, hi=500)
        timing = H.time_windows(fn, sync, iters, args.windows)
        row.update(measured(timing, batch, fwd_flops, peak_tflops, float(losses[0])),
                   peak_mem_gib=case_peak_gib(device, resident, tr.state_bytes), first_step_s=first_s)
        if first_s is not None and not compiled_before:
            row["compile_s"] = max(first_s - timing.median_s, 0.0)
            budget.record_compile(row["compile_s"], tr.units / args.mnist_units)
    except Exception as exc:  # one broken mode must not cost the other measurements
        traceback.print_exc()
        row.update(status="error", error=f"{type(exc).__name__}: {str(exc)[:600]}")
    finally:
        fn = step = net = state = None  # noqa: F841  (drop the graph, its memory pool, the optimizer state)
        tr.model.zero_grad(set_to_none=True)
        H.free_memory(device)
    return row


def measured(timing: H.Timing, batch: int, fwd_flops: float, peak_tflops: float, loss: float) -> dict[str, Any]:
    """A case's figures from its timing: ms/step, images/s, TFLOP/s (3 x forward) and share of the bf16 peak."""
    s = timing.median_s
    ips = batch / s
    tflops = ips * 3 * fwd_flops / 1e12
    return {"status": "ok" if math.isfinite(loss) else "nonfinite-loss", "ms_per_step": s * 1e3,
            "ms_min": timing.min_s * 1e3, "ms_max": timing.max_s * 1e3, "images_per_s": ips, "train_tflops": tflops,
            "pct_of_bf16_matmul": 100 * tflops / peak_tflops, "iters_per_window": timing.iters_per_window,
            "windows_ms": [w * 1e3 for w in timing.windows_s], "loss": loss}


def case_peak_gib(device: torch.device, resident: int, own_bytes: int) -> float | None:
    """Peak memory of this model's training: the peak during the case, less what was resident at
    its start (every model's weights), plus this model's weights, EMA and data pool."""
    if device.type != "cuda":
        return None
    return (torch.cuda.max_memory_allocated(device) - resident + own_bytes) / 2**30


def estimate_s(tr: Trainee, batch: int, mode: str, budget: H.Budget, args: argparse.Namespace) -> float:
    run = 12.0 if tr.spec.shape[1] > 28 else 8.0
    if mode in TORCH_COMPILE_MODE and (tr.compile_key(mode), batch) not in tr.compiled_batches:
        return run + budget.compile_estimate(tr.units / args.mnist_units)
    return run


# ----------------------------------------------------------------------------------------------- report

def render(doc: dict[str, Any]) -> str:
    env, peak, after = doc.get("environment", {}), doc.get("matmul_peak", {}), doc.get("matmul_peak_after", {})
    out = [f"# Training throughput: {env.get('gpu') or env.get('device')} ({env.get('date_utc')})", "",
           f"torch {env.get('torch')}, CUDA {env.get('cuda')}, cuDNN {env.get('cudnn')}, triton {env.get('triton')}, "
           f"diffusers {env.get('diffusers')}, driver {env.get('driver')}, git {env.get('git_commit')}.",
           f"Dense bf16 matmul {peak.get('n')}^3 in this process: {H.fmt(peak.get('tflops'))} TFLOP/s "
           f"(best window {H.fmt(peak.get('tflops_best'))}; after {H.fmt(peak.get('sustained_s'))} s of it "
           f"{H.fmt(peak.get('tflops_sustained'))}; after the cases {H.fmt(after.get('tflops'))}).",
           f"Settings: {doc.get('settings')}.", "",
           "One step = ddpm.train_step (batch gather + q_sample + forward + loss + backward + grad clip + fused AdamW "
           "+ EMA + NaN guard); "
           "training FLOPs = 3 x forward FLOPs (FlopCounterMode).", ""]
    models = doc.get("models", {})
    out.append(H.md_table(["model", "network", "params (M)", "fwd GFLOP/img", "train GFLOP/img"], [
        [k, v["class"], H.fmt(v["params"] / 1e6, 3), H.fmt(v["fwd_flops_per_image"] / 1e9, 3),
         H.fmt(3 * v["fwd_flops_per_image"] / 1e9, 2)] for k, v in models.items()]))
    out.append("")
    rows = []
    for r in doc.get("results", []):
        if r.get("status") in ("ok", "nonfinite-loss"):
            rows.append([r["model"], r["batch"], r["mode"], H.fmt(r["ms_per_step"], 2),
                         f"{H.fmt(r['ms_min'], 2)}-{H.fmt(r['ms_max'], 2)}", H.fmt(r["images_per_s"], 0),
                         H.fmt(r["train_tflops"]), H.fmt(r["pct_of_bf16_matmul"]), H.fmt(r["peak_mem_gib"], 2),
                         H.fmt(r.get("compile_s")), r["status"]])
        else:
            rows.append([r["model"], r["batch"], r["mode"], "-", "-", "-", "-", "-", "-", "-",
                         f"{r['status']}: {r.get('error', '')[:120]}"])
    out.append(H.md_table(["model", "batch", "mode", "ms/step", "range", "img/s", "TFLOP/s", "% bf16 peak",
                           "peak GiB", "compile s", "status"], rows))
    out += H.report_footer(doc)
    return "\n".join(out)


# ------------------------------------------------------------------------------------------------- main

def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    budget = H.Budget(args.budget_s, args.compile_guess_s)
    device, report = H.start_report(args, render, "train")
    doc = report.doc
    peak = doc["matmul_peak"]["tflops"]

    all_specs, doc["left_out"] = specs(args.models, args.reference, args.overrides)
    if args.reference_only:
        all_specs = [s for s in all_specs if s.is_reference]
    trainees: dict[str, Trainee] = {}
    doc["models"], doc["results"] = {}, []
    for s in list(all_specs):
        try:
            tr = Trainee(s, device, args.channels_last, args.per_channel_gn, args.compile_options,
                         args.hashed_dropout, dict(args.inductor), args.padded_image_convs)
        except Exception as exc:  # a twin that diffusers cannot build must not stop our own model's run
            if not s.is_reference:
                raise
            traceback.print_exc()
            doc["left_out"][s.name] = f"could not be built: {type(exc).__name__}: {exc}"
            all_specs.remove(s)
            continue
        trainees[s.name] = tr
        flops, by_op = forward_flops(tr.model, s.shape, device)
        doc["models"][s.name] = {"class": s.arch["class"], "params": num_params(tr.model),
                                 "fwd_flops_per_image": flops, "fwd_flops_by_op": by_op, "arch": s.arch}
        H.log(f"[train] {s.name}: {num_params(tr.model) / 1e6:.3f} M params, {flops / 1e9:.3f} GFLOP/img forward")
    if not trainees:
        raise SystemExit(f"bench_train: no network could be built ({doc['left_out']}); with --reference-only "
                         "carry .whl so that diffusers installs (bench/README.md)")
    # compile cost scales roughly with the number of modules; the default MNIST U-Net is one unit
    args.mnist_units = trainees["mnist"].units if "mnist" in trainees else next(iter(trainees.values())).units
    report.save()

    for s, batch, mode in plan(all_specs, args):
        tr = trainees[s.name]
        est = estimate_s(tr, batch, mode, budget, args)
        if not budget.allows(est):
            row = {"model": s.name, "batch": batch, "mode": mode, "status": "skipped",
                   "error": f"time budget: {budget.elapsed():.0f} s spent, this case needs about {est:.0f} s "
                            f"of --budget-s {args.budget_s:.0f}"}
            H.log(f"[train] skip {s.name} b{batch} {mode}: {row['error']}")
        else:
            H.log(f"[train] {s.name} b{batch} {mode} ... (t={budget.elapsed():.0f}s)")
            row = run_case(tr, batch, mode, args, device, doc["models"][s.name]["fwd_flops_per_image"], peak, budget)
            if row["status"] == "ok":
                H.log(f"[train]   {row['ms_per_step']:.2f} ms/step, {row['images_per_s']:,.0f} img/s, "
                      f"{row['train_tflops']:.1f} TFLOP/s ({row['pct_of_bf16_matmul']:.1f}% of bf16 matmul), "
                      f"peak {H.fmt(row['peak_mem_gib'], 2)} GiB" +
                      (f", compile {row['compile_s']:.0f} s" if "compile_s" in row else ""))
            else:
                H.log(f"[train]   {row['status']}: {row.get('error', '')}")
        doc["results"].append(row)
        doc["wall_s"] = budget.elapsed()
        report.save()

    # The ceiling again, on a GPU the cases have warmed: how far the share's denominator moves in a process.
    doc["matmul_peak_after"] = H.matmul_peak(device, args.matmul_n)
    H.log(f"[train] bf16 matmul {args.matmul_n}^3 after the cases: {doc['matmul_peak_after']['tflops']:.1f} TFLOP/s")
    doc["wall_s"] = budget.elapsed()
    report.save()
    print()
    print(render(doc))
    return doc


if __name__ == "__main__":
    main()
