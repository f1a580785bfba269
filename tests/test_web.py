"""The sampling page in a real browser (Debian's chromium, headless, driven by Playwright) and `ddpm web`.

The page must draw what `ddpm onnx-sample --noise counter` draws from the same seed: the same counter-based
noise (web/noise.js, ddpm/counter_noise.py), the same schedule from the model's metadata and the same float32
arithmetic, on onnxruntime-web's WASM kernels instead of onnxruntime's CPU ones.
"""

from __future__ import annotations

import io
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path
from urllib.parse import urlsplit

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from ddpm.fileio import grid_png
from ddpm.onnx_sampler import sample_model_range
from ddpm.web import CHROMIUM, CHROMIUM_ARGS
from testkit import with_sampler_entry

ROOT = Path(__file__).resolve().parents[1]
X0_ATOL = 1e-3  # x_0 in [-1, 1], page against onnxruntime in Python from the same seed
STATUS_DONE = "document.getElementById('status').textContent.startsWith('done')"
SETTLED = f"{STATUS_DONE} || !document.getElementById('error').hidden"


def _serve(model: Path, *args: str) -> tuple[subprocess.Popen, str]:
    """`ddpm web --model MODEL --port 0` in a subprocess; returns it and the URL it printed."""
    proc = subprocess.Popen([sys.executable, "-m", "ddpm.cli", "web", "--model", str(model), "--port", "0", *args],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    line = proc.stdout.readline()
    match = re.search(r"http://127\.0\.0\.1:\d+/", line)
    if match is None:
        proc.kill()
        pytest.fail(f"ddpm web printed no URL: {line!r} {proc.stderr.read()[-2000:]}")
    return proc, match[0]


def _stop(proc: subprocess.Popen) -> tuple[int, str]:
    proc.send_signal(signal.SIGINT)
    out, _ = proc.communicate(timeout=30)
    return proc.returncode, out


@pytest.fixture(scope="module")
def browser():
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (the test extra)")
    if not Path(CHROMIUM).is_file() or not (ROOT / "web" / "node_modules").is_dir():
        pytest.skip("chromium or web/node_modules is missing (.ci/run and `make install` bring them)")
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield b
        b.close()


@pytest.fixture(scope="module")
def served(tiny_exports):
    proc, url = _serve(tiny_exports["cond"])
    yield url
    _stop(proc)


def _open(browser, url: str):
    """A page at url, with its console errors and uncaught exceptions collected in page.problems."""
    page = browser.new_page()
    page.problems = []
    page.on("console", lambda m: page.problems.append(m.text) if m.type == "error" else None)
    page.on("pageerror", lambda e: page.problems.append(str(e)))
    page.goto(url)
    page.evaluate("window.ddpm.ready")
    return page


def _canvas(page) -> np.ndarray:
    """The canvas's pixels: uint8 [H, W] (its red channel; the images are grey)."""
    rgba = page.evaluate("""() => { const c = document.getElementById('grid');
        return Array.from(c.getContext('2d').getImageData(0, 0, c.width, c.height).data); }""")
    h, w = page.evaluate("[document.getElementById('grid').height, document.getElementById('grid').width]")
    return np.array(rgba, dtype=np.uint8).reshape(h, w, 4)[..., 0]


@pytest.mark.browser
def test_page_draws_what_onnx_sample_draws_from_the_same_seed(browser, served, tiny_exports, tmp_path):
    model = tiny_exports["cond"]
    page = _open(browser, served)
    assert "class-conditional (10 classes), 1x28x28 images, T = 50 (cosine, predicts v)" in page.text_content("#model")
    page.fill("#steps", "6")
    page.fill("#seed", "4242")
    page.fill("#batch", "6")
    page.fill("#guidance", "2.5")
    page.click("#sample")
    page.wait_for_function(SETTLED, timeout=60_000)
    assert page.text_content("#status").startswith("done: 6 steps"), page.text_content("#error")
    page.screenshot(path=str(tmp_path / "page.png"))
    x0 = np.array(page.evaluate("Array.from(window.ddpm.state.last.images)"), np.float32).reshape(6, 1, 28, 28)
    expected = sample_model_range(model, 6, "ddim", 6, seed=4242, guidance_scale=2.5, noise="counter")
    assert np.abs(x0 - expected).max() <= X0_ATOL
    out = tmp_path / "cli"
    done = subprocess.run([sys.executable, "-m", "ddpm.cli", "onnx-sample", "--model", str(model), "--noise", "counter",
                           "--steps", "6", "--seed", "4242", "-n", "6", "--guidance", "2.5", "--out", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    from PIL import Image

    cli_grid = np.array(Image.open(io.BytesIO(grid_png(np.load(out / "samples.npz")["images"]))))
    assert np.array_equal(np.array(Image.open(out / "samples.png")), cli_grid)
    page_grid = _canvas(page)
    assert page_grid.shape == cli_grid.shape == (3 * 30 + 2, 2 * 30 + 2)
    # uint8 rounding may tip a value that differs by 1e-6 to the next level
    assert np.abs(page_grid.astype(int) - cli_grid).max() <= 1 and np.mean(page_grid == cli_grid) > 0.999
    assert page.problems == []
    assert (tmp_path / "page.png").stat().st_size > 0


@pytest.mark.browser
def test_ddpm_on_an_unconditional_model_and_a_stop_mid_trajectory(browser, served, tiny_exports):
    page = browser.new_page()
    page.route("**/model.onnx", lambda route: route.fulfill(body=tiny_exports["uncond"].read_bytes()))
    page.goto(served)
    page.evaluate("window.ddpm.ready")
    assert "unconditional" in page.text_content("#model") and page.is_hidden("#conditional")
    result = page.evaluate("window.ddpm.run({sampler: 'ddpm', seed: 9, batch: 3}).then(r => Array.from(r.images))")
    expected = sample_model_range(tiny_exports["uncond"], 3, "ddpm", seed=9, noise="counter")
    assert np.abs(np.array(result, np.float32).reshape(3, 1, 28, 28) - expected).max() <= X0_ATOL
    stopped = page.evaluate("window.ddpm.run({sampler: 'ddim', steps: 20, seed: 9, batch: 3}, 7)"
                            ".then(r => [r.stopped, r.stepMs.length])")
    assert stopped == [True, 7] and page.text_content("#status").startswith("stopped: 7 steps")


def _wrong_shapes_model(meta: str | None) -> bytes:
    """A valid ONNX graph whose x is [N, 3, 32, 32], with `meta` as its "ddpm" metadata (None: none)."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 32, 32])
    t = helper.make_tensor_value_info("t", TensorProto.INT64, ["N"])
    labels = helper.make_tensor_value_info("labels", TensorProto.INT64, ["N"])
    out = helper.make_tensor_value_info("output", TensorProto.FLOAT, ["N", 3, 32, 32])
    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["output"])], "wrong", [x, t, labels], [out])
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    if meta is not None:
        helper.set_model_props(proto, {"ddpm": meta})
    return proto.SerializeToString()


@pytest.mark.browser
@pytest.mark.parametrize("entry, shown", [({"steps": 7, "eta": 0.0, "guidance_scale": 2.5}, ("7", "2.5")),
                                          (None, ("25", "1"))])
def test_the_form_starts_from_the_settings_the_export_was_checked_with(browser, served, tiny_exports, entry, shown):
    """The metadata's sampler entry sets the steps and guidance (`ddpm onnx-sample`'s defaults); an export made
    before exports recorded it keeps the form's own."""
    body = with_sampler_entry(tiny_exports["cond"], entry)
    page = browser.new_page()
    page.route("**/model.onnx", lambda route: route.fulfill(status=200, body=body))
    page.goto(served)
    page.evaluate("window.ddpm.ready")
    assert (page.input_value("#steps"), page.input_value("#guidance")) == shown
    assert page.text_content("#status") == "ready"


@pytest.mark.browser
@pytest.mark.parametrize("case", ["garbage", "missing", "no metadata", "wrong shapes", "bad sampler"])
def test_a_bad_model_shows_what_is_wrong_on_the_page(browser, served, tiny_exports, case):
    meta = {p.key: p.value for p in onnx.load(str(tiny_exports["cond"]), load_external_data=False).metadata_props}
    bodies = {"garbage": (200, b"\x0b\xffnot an onnx model"), "missing": (404, b""),
              "no metadata": (200, _wrong_shapes_model(None)),
              "wrong shapes": (200, _wrong_shapes_model(meta["ddpm"])),
              "bad sampler": (200, with_sampler_entry(tiny_exports["cond"], {"steps": 0, "eta": 0.0,
                                                                            "guidance_scale": 1.0}))}
    expected = {"garbage": "model.onnx is not an ONNX model", "missing": "could not be fetched (HTTP 404)",
                "no metadata": "no 'ddpm' metadata", "wrong shapes": "input 'x' has shape [N,3,32,32], but the "
                                                                     "metadata's image shape is [1,28,28]",
                "bad sampler": "metadata has an invalid sampler entry {\"steps\":0"}
    status, body = bodies[case]
    page = browser.new_page()
    page.route("**/model.onnx", lambda route: route.fulfill(status=status, body=body))
    page.goto(served)
    page.evaluate("window.ddpm.ready")
    assert page.is_visible("#error") and expected[case] in page.text_content("#error")
    assert page.is_disabled("#sample") and page.text_content("#status") == "error"


@pytest.mark.browser
def test_without_cross_origin_isolation_the_page_says_it_runs_on_one_thread(browser, served):
    def strip_isolation(route):
        response = route.fetch()
        headers = {k: v for k, v in response.headers.items() if not k.lower().startswith("cross-origin")}
        route.fulfill(response=response, headers=headers)

    page = browser.new_page()
    page.route(lambda url: urlsplit(url).path in ("/", "/index.html"), strip_isolation)
    page.goto(served + "?threads=2")
    page.evaluate("window.ddpm.ready")
    assert not page.evaluate("self.crossOriginIsolated")
    assert "runs on one thread" in page.text_content("#note") and "WASM, 1 thread" in page.text_content("#model")
    assert page.evaluate("window.ddpm.run({steps: 2, batch: 1}).then(r => r.stepMs.length)") == 2


def test_ddpm_web_refuses_bad_input_in_one_line(tiny_exports, tmp_path):
    def web(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "ddpm.cli", "web", *args], cwd=ROOT, capture_output=True,
                              text=True, timeout=120)

    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"not a model")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        cases = {("--model", str(tmp_path / "none.onnx")): "does not exist",
                 ("--model", str(bad)): "could not be loaded",
                 ("--model", str(tiny_exports["cond"]), "--port", "70000"): "port: 70000 is out of range",
                 ("--model", str(tiny_exports["cond"]), "--port", str(taken.getsockname()[1])): "choose another with",
                 ("--registered", "ddpm-unet"): "is not a registry URI"}
        for args, message in cases.items():
            done = web(*args)
            assert done.returncode == 2, (args, done.stderr)
            lines = done.stderr.strip().splitlines()
            assert len(lines) == 1 and lines[0].startswith("ddpm web: error: ") and message in lines[0], lines


def test_ddpm_web_serves_with_isolation_headers_and_stops_on_ctrl_c(tiny_exports):
    import urllib.request

    proc, url = _serve(tiny_exports["uncond"])
    try:
        with urllib.request.urlopen(url) as r:
            assert r.headers["Cross-Origin-Opener-Policy"] == "same-origin"
            assert r.headers["Cross-Origin-Embedder-Policy"] == "require-corp" and b"app.js" in r.read()
        with urllib.request.urlopen(url + "model.onnx") as r:
            assert r.read() == tiny_exports["uncond"].read_bytes()
        with urllib.request.urlopen(url + "ort/ort-wasm-simd-threaded.wasm") as r:
            assert r.headers["Content-Type"] == "application/wasm" and r.read(4) == b"\0asm"
        with pytest.raises(urllib.error.HTTPError, match="404"):
            urllib.request.urlopen(url + "../params.yaml")
    finally:
        rc, out = _stop(proc)
    assert rc == 0 and "stopped" in out


def test_the_site_folder_holds_the_page_and_the_model(tiny_exports, tmp_path):
    from ddpm.web import WebError, site_files, write_site

    folder = write_site(tiny_exports["cond"], tmp_path / "site")
    files = sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())
    assert files == sorted(site_files(tiny_exports["cond"]))
    assert (folder / "model.onnx").read_bytes() == tiny_exports["cond"].read_bytes()
    empty = tmp_path / "web"
    shutil.copytree(ROOT / "web", empty, ignore=shutil.ignore_patterns("node_modules"))
    with pytest.raises(WebError, match="run `make install`"):
        write_site(tiny_exports["cond"], tmp_path / "site", web_dir=empty)
    assert sorted(p.name for p in (tmp_path / "site").iterdir()) == sorted(
        {f.split("/")[0] for f in files})  # the failed write left the earlier folder as it was
