"""One sampling case of bench_sampling.py: a (model, mode, batch) timed for DDPM and DDIM, checked against
ddpm.samplers, under the time budget; and the "10,000 MNIST images" wall-time run on the fastest path.
"""

from __future__ import annotations

import argparse
import math
import time
import traceback
from typing import Any, Callable

import torch

from bench import harness as H
from bench.models import Spec, forward_flops, num_params
from bench.sampling_loops import TORCH_COMPILE_MODE, Chain, Runner, ddim_chain, ddpm_chain
from ddpm.data import from_model_range
from ddpm.layers import use_per_channel_group_norm
from ddpm.samplers import ddim_sample_loop, p_sample_loop
from ddpm.schedule import Schedule


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
                    timing = H.time_windows(lambda runner=runner: runner.run(x_T), sync, 1, args.windows)
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
                    timing = H.time_windows(lambda runner=runner, k=k: runner.run(x_T, k), sync, 1, args.windows)
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

                def generate(gen: torch.Generator = gen) -> torch.Tensor:
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
