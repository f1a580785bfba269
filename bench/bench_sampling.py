"""Sampling throughput on one GPU: 1000-step DDPM and 50-step DDIM, per mode and batch size.

The sampling loops compute what ddpm.samplers computes (p_sample_loop: posterior mean with x0
clipping, sigma^2 = beta_tilde; ddim_sample_loop with eta = 0), rewritten so that one step reads
only device tensors: the step number lives in a static int64 tensor that the host fills before
each step, and t and the step's coefficients are gathered from per-step tables on the device.
That lets a step be captured once in a CUDA graph and replayed with changing timesteps. Each
mode's DDIM output is compared with ddpm.samplers.ddim_sample_loop on the same x_T (and, in
eager mode, DDPM with p_sample_loop on the same random stream).

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
import math
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from bench import harness as H
from bench.models import MODEL_NAMES, Spec, forward_flops, num_params, specs
from ddpm.data import from_model_range
from ddpm.samplers import ddim_sample_loop, ddim_timesteps, p_sample_loop
from ddpm.schedule import Schedule
from ddpm.layers import use_per_channel_group_norm

MODES = ("eager", "graph", "compile", "compile-graph", "reduce-overhead")
TORCH_COMPILE_MODE = {"compile": "default", "compile-graph": "default", "reduce-overhead": "reduce-overhead"}
GRAPH_MODES = {"graph", "compile-graph"}
SMOKE_OVERRIDES = ("model.base_channels=32", "model.num_res_blocks=1", "diffusion.timesteps=20", "sample.steps=5",
                   "evaluate.steps=5")


# ------------------------------------------------------------------------------------------- samplers

@dataclass(frozen=True)
class Chain:
    """Per-step tables of one sampling chain, on the device, indexed by step number i (not by t).

    Step i visits timestep t[i] (descending, in [0, T-1]); every coefficient is float32 [n].
    """

    kind: str  # "ddpm" or "ddim"
    t: torch.Tensor  # int64 [n]
    recip: torch.Tensor  # sqrt(1 / alpha_bar_t): x0 = recip * x_t - recipm1 * eps (eq. 4 for x0)
    recipm1: torch.Tensor  # sqrt(1 / alpha_bar_t - 1)
    a: torch.Tensor  # ddpm: posterior_mean_coef1 (of x0, eq. 7); ddim: sqrt(alpha_bar_t)
    b: torch.Tensor  # ddpm: posterior_mean_coef2 (of x_t, eq. 7); ddim: sqrt(1 - alpha_bar_t)
    c: torch.Tensor  # ddpm: sigma_t = exp(log beta_tilde_t / 2), 0 at t = 0; ddim: sqrt(alpha_bar_prev)
    d: torch.Tensor  # ddpm: unused (0); ddim: sqrt(1 - alpha_bar_prev) (eta = 0)

    @property
    def n(self) -> int:
        return len(self.t)


def ddpm_chain(s: Schedule) -> Chain:
    """Algorithm 2 over all T steps, as ddpm.samplers.p_sample (variance beta_tilde, x0 clipped)."""
    t = torch.arange(s.num_timesteps - 1, -1, -1, device=s.device)
    sigma = (0.5 * s.posterior_log_variance_clipped[t]).exp()
    sigma = torch.where(t == 0, torch.zeros_like(sigma), sigma)  # no noise at the last step
    return Chain("ddpm", t, s.sqrt_recip_alphas_cumprod[t], s.sqrt_recipm1_alphas_cumprod[t],
                 s.posterior_mean_coef1[t], s.posterior_mean_coef2[t], sigma, torch.zeros_like(sigma))


def ddim_chain(s: Schedule, steps: int) -> Chain:
    """DDIM (Song et al. 2021, eq. 12) with eta = 0, as ddpm.samplers.ddim_sample_loop."""
    seq = ddim_timesteps(s.num_timesteps, steps)
    t = torch.tensor(seq, device=s.device)
    acp = s.alphas_cumprod
    a_t = acp[t]
    a_prev = torch.cat([acp[t[1:]], torch.ones(1, device=s.device)])
    return Chain("ddim", t, s.sqrt_recip_alphas_cumprod[t], s.sqrt_recipm1_alphas_cumprod[t],
                 a_t.sqrt(), (1 - a_t).sqrt(), a_prev.sqrt(), (1 - a_prev).clamp(min=0).sqrt())


def make_step(net: Callable[..., torch.Tensor], ch: Chain, batch: int, device: torch.device, bf16: bool,
              before_net: Callable[[], None] = lambda: None, fmt: torch.memory_format = torch.contiguous_format,
              ) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """step(x_t [B, C, H, W] float32, i int64 [1]) -> x_{next} [B, C, H, W] float32 in layout `fmt`; no host sync."""

    def at(table: torch.Tensor, i: torch.Tensor) -> torch.Tensor:
        return table.index_select(0, i).squeeze(0)  # 0-dim, gathered on the device

    @torch.no_grad()
    def step(x: torch.Tensor, i: torch.Tensor) -> torch.Tensor:
        t = ch.t.index_select(0, i).expand(batch)  # [B], the same timestep for the whole batch
        before_net()
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16, cache_enabled=False):
            eps = net(x, t).float()
        x0 = (at(ch.recip, i) * x - at(ch.recipm1, i) * eps).clamp(-1.0, 1.0)
        if ch.kind == "ddim":
            eps = (x - at(ch.a, i) * x0) / at(ch.b, i)  # eps consistent with the clipped x0
            x_next = at(ch.c, i) * x0 + at(ch.d, i) * eps
        else:
            mean = at(ch.a, i) * x0 + at(ch.b, i) * x
            x_next = mean + at(ch.c, i) * torch.randn_like(x)
        return x_next.contiguous(memory_format=fmt)
    return step


class Runner:
    """Runs one chain at one batch size in one mode; `sample(x_T)` returns x_0 (a buffer that the
    next call overwrites in graph modes)."""

    def __init__(self, net: Callable[..., torch.Tensor], ch: Chain, batch: int, shape: tuple[int, int, int],
                 mode: str, device: torch.device, bf16: bool, channels_last: bool, warmup: int):
        self.ch, self.mode, self.device = ch, mode, device
        self.i = torch.zeros(1, dtype=torch.long, device=device)
        # one memory layout throughout, so that a compiled U-Net (which guards on strides) never recompiles
        self.fmt = fmt = torch.channels_last if channels_last else torch.contiguous_format
        mark = torch.compiler.cudagraph_mark_step_begin if mode == "reduce-overhead" else (lambda: None)
        self.step = make_step(net, ch, batch, device, bf16, before_net=mark, fmt=fmt)
        self.x = torch.randn(batch, *shape, device=device).contiguous(memory_format=fmt)
        self.replay: Callable[[], None] | None = None
        if mode in GRAPH_MODES:
            x = self.x  # the static buffer: read and overwritten by every replay
            self.replay = H.capture(lambda: x.copy_(self.step(x, self.i)), device, warmup=warmup)
        else:
            for _ in range(warmup):
                self.step(self.x, self.i)

    def advance(self, i: int) -> None:
        self.i.fill_(i)
        if self.replay is not None:
            self.replay()
        else:
            self.x = self.step(self.x, self.i)

    def run(self, x_T: torch.Tensor, steps: int | None = None) -> torch.Tensor:
        """Steps 0..steps-1 of the chain (default: all) from x_T."""
        if self.replay is not None:
            self.x.copy_(x_T)
        else:
            self.x = x_T.contiguous(memory_format=self.fmt)
        for i in range(self.ch.n if steps is None else steps):
            self.advance(i)
        return self.x


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


# ------------------------------------------------------------------------------------------------ bench

class Bench:
    """Holds the process-wide state: models, compiled wrappers, chains, budget and the report."""

    def __init__(self, args: argparse.Namespace, device: torch.device, report: H.Report):
        self.args, self.device, self.report, self.doc = args, device, report, report.doc
        self.sync = H.synchronizer(device)
        self.budget = H.Budget(args.budget_s, args.compile_guess_s)
        self.bf16 = args.bf16 and device.type == "cuda"
        self.nets: dict[str, torch.nn.Module] = {}
        self.compiled: dict[tuple[str, str], Callable[..., torch.Tensor]] = {}
        self.compiled_batches: set[tuple[str, str, int]] = set()
        self.flops: dict[str, float] = {}
        self.chains: dict[str, dict[str, Chain]] = {}
        self.units: dict[str, int] = {}
        self.base_units = 1
        self.lib_ref: dict[tuple[str, int], torch.Tensor] = {}  # library DDIM output per (model, batch)

    # -- setup
    def add_model(self, s: Spec) -> None:
        # Our U-Net's GroupNorms take their per-channel form when compiled, as under `sample.compile`
        # (ddpm.generate.sampling_network); the twin's nn.GroupNorms are not ours and stay as they are.
        net = use_per_channel_group_norm(s.build().to(self.device).eval().requires_grad_(False))
        if self.args.channels_last:
            net = net.to(memory_format=torch.channels_last)
        self.nets[s.name] = net
        self.units[s.name] = sum(1 for _ in net.modules())
        flops, by_op = forward_flops(net, s.shape, self.device)
        self.flops[s.name] = flops
        sched = Schedule.from_config(s.cfg.diffusion).to(self.device)
        self.chains[s.name] = {"ddpm": ddpm_chain(sched), "ddim": ddim_chain(sched, self.args.ddim_steps)}
        self.doc["models"][s.name] = {"class": s.arch["class"], "params": num_params(net), "fwd_flops_per_image": flops,
                                      "fwd_flops_by_op": by_op, "timesteps": sched.num_timesteps, "arch": s.arch}
        H.log(f"[sample] {s.name}: {num_params(net) / 1e6:.3f} M params, {flops / 1e9:.3f} GFLOP/img forward")

    def net(self, name: str, mode: str) -> Callable[..., torch.Tensor]:
        if mode not in TORCH_COMPILE_MODE:
            return self.nets[name]
        tmode = TORCH_COMPILE_MODE[mode]
        if (name, tmode) not in self.compiled:
            kw = {} if tmode == "default" else {"mode": tmode}
            self.compiled[(name, tmode)] = torch.compile(self.nets[name], dynamic=False, **kw)
        return self.compiled[(name, tmode)]

    def needs_compile(self, name: str, mode: str, batch: int) -> bool:
        return mode in TORCH_COMPILE_MODE and (name, TORCH_COMPILE_MODE[mode], batch) not in self.compiled_batches

    def estimate_s(self, spec: Spec, mode: str, batch: int, samplers: tuple[str, ...]) -> float:
        """A rough cost of one case: ~15% of the bf16 peak, or launch-bound at small batches."""
        peak = self.doc["matmul_peak"]["tflops"] * 1e12
        step_s = max(batch * self.flops[spec.name] / (0.15 * peak), 2e-3 if mode == "eager" else 5e-4)
        cost = 3.0 + (self.args.windows + 3) * self.args.ddim_steps * step_s
        if "ddpm" in samplers:
            cost += (self.args.windows + 1) * min(self.args.ddpm_window_s, 1000 * step_s)
        if self.needs_compile(spec.name, mode, batch):
            cost += self.budget.compile_estimate(self.units[spec.name] / self.base_units)
        return cost

    # -- one case
    def case(self, spec: Spec, mode: str, batch: int, samplers: tuple[str, ...], check: bool,
             keep: bool = False, reserve_s: float = 0.0) -> tuple[dict[str, Any], dict[str, Runner]]:
        """Time `samplers` for (model, mode, batch); returns the row and, if `keep`, the runners.
        The case starts only if it fits the budget with `reserve_s` to spare."""
        args, dev, sync = self.args, self.device, self.sync
        row: dict[str, Any] = {"model": spec.name, "mode": mode, "batch": batch, "bf16": self.bf16,
                               "channels_last": args.channels_last}
        est = self.estimate_s(spec, mode, batch, samplers) + reserve_s
        if not self.budget.allows(est):
            row.update(status="skipped", error=f"time budget: {self.budget.elapsed():.0f} s spent, this case needs "
                                               f"about {est:.0f} s of --budget-s {args.budget_s:.0f}")
            H.log(f"[sample] skip {spec.name} {mode} b{batch}: {row['error']}")
            return self._add(row), {}
        H.log(f"[sample] {spec.name} {mode} b{batch} {'+'.join(samplers)} ... (t={self.budget.elapsed():.0f}s)")
        H.free_memory(dev)
        resident = torch.cuda.memory_allocated(dev) if dev.type == "cuda" else 0
        runners: dict[str, Runner] = {}
        try:
            net = self.net(spec.name, mode)
            compiling = self.needs_compile(spec.name, mode, batch)
            flops = self.flops[spec.name]
            gen = torch.Generator(device=dev).manual_seed(1234)
            x_T = torch.randn(batch, *spec.shape, device=dev, generator=gen)
            for kind in samplers:
                ch = self.chains[spec.name][kind]
                t0 = time.perf_counter()
                runner = Runner(net, ch, batch, spec.shape, mode, dev, self.bf16, args.channels_last, args.warmup)
                sync()
                setup_s = time.perf_counter() - t0
                if compiling:
                    row["compile_s"] = setup_s
                    self.compiled_batches.add((spec.name, TORCH_COMPILE_MODE[mode], batch))
                    self.budget.record_compile(setup_s, self.units[spec.name] / self.base_units)
                    compiling = False
                row[f"{kind}_setup_s"] = setup_s
                if kind == "ddim":
                    runner.run(x_T)  # one warm-up chain
                    timing = H.time_windows(lambda: runner.run(x_T), sync, 1, args.windows)
                    row.update(ddim_ms_per_chain=timing.median_s * 1e3, ddim_ms_min=timing.min_s * 1e3,
                               ddim_ms_max=timing.max_s * 1e3, ddim_ms_per_step=timing.median_s * 1e3 / ch.n,
                               ddim_images_per_s=batch / timing.median_s,
                               ddim_tflops=batch * ch.n * flops / timing.median_s / 1e12)
                    if check:
                        row["ddim_max_abs_diff_vs_library"] = self.check_ddim(spec, runner, batch, x_T)
                else:
                    per_step = self.ddim_step_ms(spec.name, mode, batch, row) / 1e3
                    k = ch.n if args.smoke else int(min(ch.n, max(20, math.ceil(args.ddpm_window_s / per_step))))
                    runner.run(x_T, min(k, 20))  # warm-up
                    timing = H.time_windows(lambda: runner.run(x_T, k), sync, 1, args.windows)
                    step_s = timing.median_s / k
                    row.update(ddpm_steps_per_window=k, ddpm_full_chain=k == ch.n, ddpm_ms_per_step=step_s * 1e3,
                               ddpm_ms_step_min=timing.min_s / k * 1e3, ddpm_ms_step_max=timing.max_s / k * 1e3,
                               ddpm_images_per_s=batch / (step_s * ch.n), ddpm_tflops=batch * flops / step_s / 1e12)
                    if check and args.check_ddpm and mode in ("eager", "compile"):
                        row["ddpm_max_abs_diff_vs_library"] = self.check_ddpm(spec, runner, batch, x_T)
                if keep:
                    runners[kind] = runner
                else:
                    del runner
            row["peak_mem_gib"] = ((torch.cuda.max_memory_allocated(dev) - resident) / 2**30
                                   if dev.type == "cuda" else None)
            row["status"] = "ok"
            H.log("[sample]   " + ", ".join(
                f"{k}: {row[f'{k}_images_per_s']:,.0f} img/s ({row[f'{k}_ms_per_step']:.3f} ms/step)" for k in samplers)
                + (f", compile {row['compile_s']:.0f} s" if "compile_s" in row else "")
                + "".join(f", {k} diff {row[k]:.2e}" for k in row if k.endswith("vs_library")))
        except Exception as exc:
            traceback.print_exc()
            row.update(status="error", error=f"{type(exc).__name__}: {str(exc)[:600]}")
            runners = {}
        H.free_memory(dev)
        return self._add(row), runners

    def check_ddim(self, spec: Spec, runner: Runner, batch: int, x_T: torch.Tensor) -> float:
        """max |x_0 - library x_0| for the same x_T (bf16 modes differ by rounding, not by formula)."""
        key = (spec.name, batch)
        if key not in self.lib_ref:
            with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16, cache_enabled=False):
                self.lib_ref[key] = ddim_sample_loop(self.nets[spec.name], self.chains_schedule(spec), x_T,
                                                     steps=self.args.ddim_steps).float()
        return float((runner.run(x_T) - self.lib_ref[key]).abs().max())

    def check_ddpm(self, spec: Spec, runner: Runner, batch: int, x_T: torch.Tensor) -> float:
        """Both loops draw their noise from the global generator in the same order, so a reseed gives
        both the same noise (the runner draws one extra, unused, at the last step)."""
        torch.manual_seed(99)
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16, cache_enabled=False):
            ref = p_sample_loop(self.nets[spec.name], self.chains_schedule(spec), x_T).float()
        torch.manual_seed(99)
        return float((runner.run(x_T) - ref).abs().max())

    def ddim_step_ms(self, name: str, mode: str, batch: int, row: dict[str, Any]) -> float:
        """The DDIM step time measured for this (model, mode, batch), to size the DDPM windows."""
        if "ddim_ms_per_step" in row:
            return row["ddim_ms_per_step"]
        for r in self.doc["results"]:
            if (r["model"], r["mode"], r["batch"], r.get("status")) == (name, mode, batch, "ok") \
                    and "ddim_ms_per_step" in r:
                return r["ddim_ms_per_step"]
        return 5.0

    def chains_schedule(self, spec: Spec) -> Schedule:
        return Schedule.from_config(spec.cfg.diffusion).to(self.device)

    def _add(self, row: dict[str, Any]) -> dict[str, Any]:
        self.doc["results"].append(row)
        self.doc["wall_s"] = self.budget.elapsed()
        self.report.save()
        return row

    # -- the fastest path
    def fast_run(self, spec: Spec, row: dict[str, Any], runner: Runner) -> None:
        """Wall time of --fast-images images by DDIM on `runner`, noise to uint8 images on the host."""
        args, dev, batch = self.args, self.device, row["batch"]
        n_batches = math.ceil(args.fast_images / batch)
        out: dict[str, Any] = {"model": spec.name, "mode": row["mode"], "batch": batch, "images": args.fast_images,
                               "images_generated": n_batches * batch, "ddim_steps": self.args.ddim_steps}
        H.log(f"[sample] fastest path: {args.fast_images} images, {row['mode']} at batch {batch} "
              f"({n_batches} batches) (t={self.budget.elapsed():.0f}s)")
        try:
            walls = []
            for r in range(args.fast_runs):
                gen = torch.Generator(device=dev).manual_seed(r)

                def generate() -> torch.Tensor:
                    imgs = []
                    for _ in range(n_batches):
                        x_T = torch.randn(batch, *spec.shape, device=dev, generator=gen)
                        imgs.append(from_model_range(runner.run(x_T)))  # uint8 copy, off the static buffer
                    return torch.cat(imgs)[:args.fast_images].cpu()

                images, wall = H.timed_once(generate, self.sync)
                walls.append(wall)
                assert images.shape == (args.fast_images, *spec.shape) and images.dtype == torch.uint8
            out.update(status="ok", wall_s=sorted(walls)[len(walls) // 2], wall_s_runs=walls,
                       images_per_s=args.fast_images / sorted(walls)[len(walls) // 2],
                       goal_s=5.0, meets_goal=sorted(walls)[len(walls) // 2] < 5.0,
                       pixel_mean=float(images.float().mean()))
            H.log(f"[sample]   {out['wall_s']:.2f} s (runs {', '.join(f'{w:.2f}' for w in walls)}), "
                  f"{out['images_per_s']:,.0f} img/s; goal < 5 s: {'met' if out['meets_goal'] else 'NOT met'}")
        except Exception as exc:
            traceback.print_exc()
            out.update(status="error", error=f"{type(exc).__name__}: {str(exc)[:600]}")
        self.doc["fastest"] = out
        self.report.save()


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
            rows.append([r["model"], r["batch"], r["mode"]] + ["-"] * 8 + [f"{r['status']}: {r.get('error', '')[:120]}"])
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
            out.append(f"\n**{fast['images']:,} MNIST-shaped images, {fast['ddim_steps']}-step DDIM** ({fast['model']}, "
                       f"{fast['mode']}, batch {fast['batch']}, {fast['images_generated']} generated): "
                       f"**{fast['wall_s']:.2f} s** wall, noise to uint8 on the host "
                       f"(runs: {', '.join(f'{w:.2f}' for w in fast['wall_s_runs'])}); goal < 5 s "
                       f"{'met' if fast['meets_goal'] else 'NOT met'}.")
        else:
            out.append(f"\nFastest-path run: {fast.get('status')}: {fast.get('error')}")
    out += H.report_footer(doc)
    return "\n".join(out)


# ------------------------------------------------------------------------------------------------- main

def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    device, report = H.start_report(args, render, "sample")
    doc = report.doc
    bench = Bench(args, device, report)
    all_specs, doc["left_out"] = specs(args.models, args.reference, args.overrides)
    doc["models"], doc["results"] = {}, []
    for s in list(all_specs):
        try:
            bench.add_model(s)
        except Exception as exc:  # a twin that diffusers cannot build must not stop our own model's run
            if not s.is_reference:
                raise
            traceback.print_exc()
            doc["left_out"][s.name] = f"could not be built: {type(exc).__name__}: {exc}"
            all_specs.remove(s)
    bench.base_units = bench.units.get("mnist", next(iter(bench.units.values())))
    report.save()

    cheap = [m for m in args.modes if m not in TORCH_COMPILE_MODE]
    costly = [m for m in args.modes if m in TORCH_COMPILE_MODE]
    ours = [s for s in all_specs if not s.is_reference]
    refs = [s for s in all_specs if s.is_reference]
    both = ("ddim", "ddpm")
    fast_candidates: list[tuple[float, Spec, dict[str, Any], Runner]] = []

    def consider(spec: Spec, row: dict[str, Any], runners: dict[str, Runner]) -> None:
        if row.get("status") == "ok" and "ddim" in runners and spec.shape[1:] == (28, 28):
            fast_candidates.append((row["ddim_images_per_s"], spec, row, runners["ddim"]))
            fast_candidates.sort(key=lambda c: -c[0])
            del fast_candidates[1:]  # keep only the fastest runner (and its graph) alive

    for spec in ours:
        # 1. the latency batch, cheap modes
        for mode in cheap:
            row, runners = bench.case(spec, mode, args.batch, both, check=True, keep=True)
            consider(spec, row, runners)
        # 2. the twin at the same batch, same process
        for ref in [r for r in refs if r.name == f"{spec.name}-ref"]:
            for mode in cheap + (costly if args.reference_compile else []):
                bench.case(ref, mode, args.batch, ("ddim",), check=True)
        # 3. the max-throughput batch, DDIM in the search mode
        search_mode = "graph" if "graph" in cheap else (cheap[0] if cheap else None)
        tput = {args.batch: next((r["ddim_images_per_s"] for r in doc["results"] if r["model"] == spec.name and
                                  r["mode"] == search_mode and r["batch"] == args.batch and r["status"] == "ok"), 0.0)}
        if search_mode is not None:
            for b in args.search_batches:
                row, runners = bench.case(spec, search_mode, b, ("ddim",), check=False, keep=True)
                if row["status"] == "ok":
                    tput[b] = row["ddim_images_per_s"]
                    consider(spec, row, runners)
        top = max(tput.values()) if tput else 0.0
        # the smallest batch within 2% of the best: as fast, less memory and less padding
        best = min(b for b, v in tput.items() if v >= 0.98 * top) if top > 0 else args.batch
        doc.setdefault("best_batch", {})[spec.name] = {"mode": search_mode, "batch": best, "images_per_s": top,
                                                       "tried": {str(k): v for k, v in sorted(tput.items())}}
        H.log(f"[sample] max-throughput batch for {spec.name}: {best} ({top:,.0f} img/s, {search_mode})")
        # time kept back for the fastest-path run, which must not be squeezed out by a compile
        reserve = (args.fast_runs * args.fast_images / top + 10.0 if top > 0 else 30.0) \
            if spec.shape[1:] == (28, 28) else 0.0
        # 4. every mode at that batch (DDPM too); compile-based ones compile here
        at_best = [m for m in cheap] if best != args.batch else []
        at_best += costly if "best" in args.compile_at else []
        for mode in at_best:
            samplers = ("ddpm",) if mode == search_mode and best != args.batch else both  # DDIM done in 3.
            row, runners = bench.case(spec, mode, best, samplers, check=best == args.batch, keep=True,
                                      reserve_s=reserve)
            consider(spec, row, runners)
        # 5. the 10,000-image run on the fastest path so far (MNIST-shaped models only)
        if fast_candidates and spec.shape[1:] == (28, 28):
            _, fspec, frow, frunner = fast_candidates[0]
            bench.fast_run(fspec, frow, frunner)
        fast_candidates.clear()
        H.free_memory(device)
        # 6. compile-based modes at the latency batch, unless step 4 already ran them there
        if "batch" in args.compile_at and not (best == args.batch and "best" in args.compile_at):
            for mode in costly:
                bench.case(spec, mode, args.batch, both, check=True)

    doc["wall_s"] = bench.budget.elapsed()
    report.save()
    print()
    print(render(doc))
    return doc


if __name__ == "__main__":
    main()
