"""DDIM in the browser (onnxruntime-web, WASM) against onnxruntime in Python, on the same machine: ms per step.

The page is served by ddpm.web on loopback, with the cross-origin isolation that WASM threads need, and
driven in Debian's headless chromium through Playwright. For each thread count and batch size, the page
and Python each run a short DDIM warm-up, then one DDIM sample of --steps steps from the same seed
(the counter-based noise of ddpm.counter_noise and web/noise.js), and ms per step is that run's time over
its steps: the network plus the sampler's arithmetic, without the page's drawing. Both x_0 are compared
(max |diff| in [-1, 1]) so that a fast wrong page shows. Python's session gets intra_op_num_threads =
the page's WASM threads. Guidance scale 1 (one network call per step).

    python bench/bench_browser.py --model runs/default/model.onnx --out bench/results/browser.json
    python bench/bench_browser.py --smoke --out /tmp/browser_smoke.json     # a tiny export, seconds

--on-screen STUDENT.onnx adds a user's first visit: the page opened in a new browser context, Sample pressed with
the form's defaults (16 images, the student's own DDIM steps), timed to the last step drawn.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np

from ddpm.fileio import atomic_write_bytes, file_sha256
from ddpm.onnx_model import OnnxDenoiser
from ddpm.onnx_sampler import sample_model_range

WARMUP_STEPS = 2
SEED = 0


def python_case(model: Path, threads: int, batch: int, steps: int) -> tuple[float, np.ndarray]:
    """onnxruntime in Python: (ms per DDIM step, x_0 [batch, C, H, W]) of one timed sample after a warm-up."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
    den = OnnxDenoiser(model, "cpu", session_options=options)
    sample_model_range(den, batch, "ddim", WARMUP_STEPS, seed=SEED, batch_size=batch, noise="counter")
    start = time.perf_counter()
    x0 = sample_model_range(den, batch, "ddim", steps, seed=SEED, batch_size=batch, noise="counter")
    return (time.perf_counter() - start) * 1000 / steps, x0


def browser_case(page: Any, batch: int, steps: int, shape: tuple[int, ...]) -> tuple[float, np.ndarray]:
    """The page: (ms per DDIM step, x_0) of one timed sample after a warm-up, from its own per-step timings."""
    page.evaluate(f"window.ddpm.run({{sampler: 'ddim', steps: {WARMUP_STEPS}, seed: {SEED}, batch: {batch}}})")
    ms, x0 = page.evaluate(f"""window.ddpm.run({{sampler: 'ddim', steps: {steps}, seed: {SEED}, batch: {batch}}})
        .then(r => [r.stepMs.reduce((a, b) => a + b, 0) / r.stepMs.length, Array.from(r.images)])""")
    return ms, np.array(x0, dtype=np.float32).reshape(batch, *shape)


def run_cases(model: Path, threads_list: list[int], batches: list[int], steps: int) -> tuple[list[dict], dict]:
    from playwright.sync_api import sync_playwright

    from ddpm.web import CHROMIUM, CHROMIUM_ARGS, serve, site_files

    shape = OnnxDenoiser(model, "cpu").image_shape
    server = serve(site_files(model), 0)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}/"
    rows, about = [], {}
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
            about["chromium"] = browser.version
            for threads in threads_list:
                page = browser.new_page()
                page.goto(f"{url}?threads={threads}")
                if page.evaluate("window.ddpm.ready") is None:
                    raise SystemExit(f"bench_browser: the page did not load: {page.text_content('#error')}")
                about["page"] = page.text_content("#model")
                for batch in batches:
                    web_ms, web_x0 = browser_case(page, batch, steps, shape)
                    py_ms, py_x0 = python_case(model, threads, batch, steps)
                    rows.append({"threads": threads, "batch": batch, "steps": steps, "browser_ms_per_step": web_ms,
                                 "python_ms_per_step": py_ms, "browser_over_python": web_ms / py_ms,
                                 "max_abs_diff_x0": float(np.abs(web_x0 - py_x0).max())})
                    print(f"threads {threads}, batch {batch}: browser {web_ms:.1f} ms/step, python {py_ms:.1f} "
                          f"({web_ms / py_ms:.2f}x), max |diff| {rows[-1]['max_abs_diff_x0']:.1e}", flush=True)
                page.close()
            browser.close()
    finally:
        server.shutdown()
        server.server_close()
    return rows, about


def on_screen_cases(model: Path, threads_list: list[int]) -> list[dict]:
    """A first visit with the form's defaults (batch 16, the model's own DDIM steps for a distilled student): a new
    browser context opens the page, waits until it is ready (WASM and model fetched and compiled), presses Sample
    and waits for 'done', the last step drawn. Seconds from opening to ready and from the press to done."""
    from playwright.sync_api import sync_playwright

    from ddpm.web import CHROMIUM, CHROMIUM_ARGS, serve, site_files

    server = serve(site_files(model), 0)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}/"
    rows = []
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
            for threads in threads_list:
                context = browser.new_context()
                page = context.new_page()
                opened = time.perf_counter()
                page.goto(f"{url}?threads={threads}")
                if page.evaluate("window.ddpm.ready") is None:
                    raise SystemExit(f"bench_browser: the page did not load: {page.text_content('#error')}")
                ready = time.perf_counter()
                page.click("#sample")
                page.wait_for_function("document.querySelector('#status').textContent.startsWith('done') || "
                                       "!document.querySelector('#error').hidden", timeout=600_000)
                if page.is_visible("#error"):
                    raise SystemExit(f"bench_browser: sampling on the page failed: {page.text_content('#error')}")
                done = time.perf_counter()
                rows.append({"threads": threads, "batch": int(page.input_value("#batch")),
                             "steps": int(page.input_value("#steps")), "open_to_ready_s": ready - opened,
                             "press_to_done_s": done - ready, "open_to_done_s": done - opened,
                             "status": page.text_content("#status")})
                print(f"on screen, threads {threads}: ready after {ready - opened:.2f} s, {rows[-1]['batch']} "
                      f"images in {rows[-1]['steps']} steps {done - ready:.2f} s after the press", flush=True)
                context.close()
            browser.close()
    finally:
        server.shutdown()
        server.server_close()
    return rows


def smoke_model(folder: Path) -> Path:
    """A tiny random-weight export (8 channels, T = 20) for --smoke."""
    import torch

    from bench.models import randomize_zero_layers
    from ddpm.checkpoint import save_checkpoint
    from ddpm.config import ExportConfig, config_from_dict, image_shape
    from ddpm.export import export_onnx
    from ddpm.unet import build_unet

    cfg = config_from_dict({"diffusion": {"timesteps": 20}, "sampler": {"steps": 5},
                            "model": {"base_channels": 8, "channel_mult": [1, 2], "num_res_blocks": 1,
                                      "attention_levels": [1], "num_heads": 2, "norm_groups": 4}})
    torch.manual_seed(0)
    net = build_unet(cfg.model, image_shape(cfg))
    randomize_zero_layers(net)
    state = net.state_dict()
    save_checkpoint(folder / "tiny.pt", {"model": state, "ema": state, "config": cfg.to_dict(), "step": 0})
    return export_onnx(folder / "tiny.pt", folder / "model.onnx", ExportConfig())


def environment(model: Path) -> dict[str, Any]:
    import datetime
    import platform
    import subprocess

    import onnxruntime as ort

    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    return {"date_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "python": sys.version.split()[0], "onnxruntime": ort.__version__, "cpu": cpu, "cpus": os.cpu_count(),
            "load_average_at_start": Path("/proc/loadavg").read_text().split()[:3], "git_commit": commit or None,
            "argv": sys.argv, "model": str(model), "model_sha256": file_sha256(model)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="runs/default/model.onnx", help="an exported model (default: %(default)s)")
    ap.add_argument("--out", default="bench/results/browser.json", help="result JSON (default: %(default)s)")
    ap.add_argument("--threads", default="1,2",
                    help="WASM threads = onnxruntime intra-op threads (default: %(default)s)")
    ap.add_argument("--batches", default="1,16", help="(default: %(default)s)")
    ap.add_argument("--steps", type=int, default=20, help="timed DDIM steps per case (default: %(default)s)")
    ap.add_argument("--on-screen", metavar="MODEL", help="also time a first visit to the page serving MODEL (a "
                    "distilled student) with the form's defaults, from opening the page to its images drawn")
    ap.add_argument("--smoke", action="store_true", help="a tiny export, one thread, batch 1, 2 steps; and a "
                    "first visit to it")
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="bench-browser-") as tmp:
        if args.smoke:
            model, threads, batches, steps = smoke_model(Path(tmp)), [1], [1], 2
            args.on_screen = str(model)
        else:
            model, steps = Path(args.model), args.steps
            threads, batches = [int(v) for v in args.threads.split(",")], [int(v) for v in args.batches.split(",")]
            if args.on_screen and not Path(args.on_screen).is_file():
                print(f"bench_browser: --on-screen {args.on_screen} does not exist; distil and export a student "
                      "(`ddpm distill`, then `ddpm export --checkpoint <run>/distill/student.pt`)", file=sys.stderr)
                return 2
            if not model.is_file():
                print(f"bench_browser: {model} does not exist; export one (`make pipeline`) or pass --model",
                      file=sys.stderr)
                return 2
        env = environment(model)
        rows, about = run_cases(model, threads, batches, steps)
        screen = on_screen_cases(Path(args.on_screen), threads) if args.on_screen else []
        screen_sha = file_sha256(Path(args.on_screen)) if args.on_screen else None
    doc = {"environment": {**env, **about}, "warmup_steps": WARMUP_STEPS, "seed": SEED, "rows": rows,
           "by_case": {f"t{r['threads']}_b{r['batch']}": r for r in rows}}
    if screen:
        doc["on_screen"] = {"model": args.on_screen, "model_sha256": screen_sha,
                            "by_threads": {f"t{r['threads']}": r for r in screen}}
    atomic_write_bytes(Path(args.out), (json.dumps(doc, indent=1) + "\n").encode())
    print(f"-> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
