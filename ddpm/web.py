"""The sampling page (web/) with one exported model: its files, a folder of them, and `ddpm web`'s server.

The page is static: web/index.html, its ES modules and onnxruntime-web's WASM build (installed by
`npm ci` in web/, pinned by web/package-lock.json), next to the model as model.onnx. `site_files` is
the one place that lays them out; `write_site` copies that layout into a folder (the export stage
logs it to MLflow) and `serve` answers for it on loopback with the cross-origin isolation headers
that WASM threads need (SharedArrayBuffer). Only the standard library and ddpm.onnx_model are used.
"""

from __future__ import annotations

import errno
import http.server
import os
import shutil
import signal
import sys
import tempfile
from pathlib import Path
from typing import Any

from ddpm.errors import ConfigError, DDPMError

WEB_DIR = Path(__file__).resolve().parents[1] / "web"
PAGE_FILES = ("index.html", "app.js", "model.js", "sampler.js", "noise.js")
ORT_DIST = Path("node_modules") / "onnxruntime-web" / "dist"
# The WASM-only build of onnxruntime-web and the two files it loads beside itself (SIMD, threads).
ORT_FILES = ("ort.wasm.min.mjs", "ort-wasm-simd-threaded.mjs", "ort-wasm-simd-threaded.wasm")
MODEL_FILE = "model.onnx"
HOST = "127.0.0.1"
CONTENT_TYPES = {".html": "text/html; charset=utf-8", ".js": "text/javascript; charset=utf-8",
                 ".mjs": "text/javascript; charset=utf-8", ".wasm": "application/wasm",
                 ".onnx": "application/octet-stream"}
# How the tests and bench/bench_browser.py start Debian's chromium headless: as root (no sandbox) and in
# containers whose /dev/shm is small.
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-dev-shm-usage"]
ISOLATION_HEADERS = {"Cross-Origin-Opener-Policy": "same-origin", "Cross-Origin-Embedder-Policy": "require-corp",
                     "Cross-Origin-Resource-Policy": "same-origin"}


class WebError(DDPMError):
    """The page cannot be served: its files are not installed, or the port cannot be had."""


def site_files(model: str | Path, web_dir: Path = WEB_DIR) -> dict[str, Path]:
    """URL path (no leading slash) -> file: the page, onnxruntime-web under ort/, and the model as model.onnx."""
    missing = [web_dir / name for name in PAGE_FILES if not (web_dir / name).is_file()]
    if missing:
        raise WebError(f"the page's files are missing ({', '.join(map(str, missing))}); use a complete checkout")
    ort = web_dir / ORT_DIST
    if not all((ort / name).is_file() for name in ORT_FILES):
        raise WebError(f"onnxruntime-web is not installed in {web_dir / 'node_modules'}: run `make install` "
                       f"(or `npm ci` in {web_dir})")
    files = {name: web_dir / name for name in PAGE_FILES}
    files.update({f"ort/{name}": ort / name for name in ORT_FILES})
    files[MODEL_FILE] = Path(model)
    return files


def write_site(model: str | Path, folder: str | Path, web_dir: Path = WEB_DIR) -> Path:
    """Copy the page with `model` into `folder` (replaced whole, never left half-written); returns it."""
    files, folder = site_files(model, web_dir), Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}-", dir=folder.parent))
    try:
        for rel, src in files.items():
            (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(src, tmp / rel)
        if folder.exists():
            shutil.rmtree(folder)
        os.replace(tmp, folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder


def _handler(files: dict[str, Path]) -> type[http.server.BaseHTTPRequestHandler]:
    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self._answer(body=True)

        def do_HEAD(self) -> None:
            self._answer(body=False)

        def _answer(self, body: bool) -> None:
            rel = self.path.split("?", 1)[0].split("#", 1)[0].lstrip("/") or "index.html"
            path = files.get(rel)
            if path is None:
                self.send_error(404, f"{rel} is not part of the page")
                return
            data = path.read_bytes()
            self.send_response(200)
            self.send_header("Content-Type", CONTENT_TYPES.get(path.suffix, "application/octet-stream"))
            self.send_header("Content-Length", str(len(data)))
            self.send_header("Cache-Control", "no-cache")
            for key, value in ISOLATION_HEADERS.items():
                self.send_header(key, value)
            self.end_headers()
            if body:
                self.wfile.write(data)

        def log_request(self, code: Any = "-", size: Any = "-") -> None:  # failed requests only
            if str(getattr(code, "value", code)).startswith(("4", "5")):
                sys.stderr.write(f"ddpm web: {self.requestline!r} -> {code}\n")

        def log_message(self, format: str, *args: Any) -> None:
            pass

    return Handler


def serve(files: dict[str, Path], port: int) -> http.server.ThreadingHTTPServer:
    """A server for `files` on 127.0.0.1:port (0: a free port), bound but not yet serving."""
    if not 0 <= port <= 65535:
        raise ConfigError(f"port: {port} is out of range; allowed: 0..65535 (0: any free port)")
    try:
        return http.server.ThreadingHTTPServer((HOST, port), _handler(files))
    except OSError as exc:
        if exc.errno in (errno.EADDRINUSE, errno.EACCES):
            raise WebError(f"port {port} on {HOST} cannot be used ({exc.strerror}); choose another with --port"
                           ) from None
        raise


def _stop(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def main(model: str | Path, port: int) -> int:
    """`ddpm web`: check the model, serve the page until Ctrl-C; prints the URL."""
    from ddpm.onnx_model import OnnxDenoiser

    den = OnnxDenoiser(model, "cpu")  # the page checks the same things; a bad file is refused here first
    files = site_files(den.path)
    server = serve(files, port)
    host, bound = server.server_address[:2]
    kind = f"class-conditional, {den.num_classes} classes" if den.class_conditional else "unconditional"
    print(f"serving {den.path} ({kind}, T = {den.schedule.num_timesteps}) at http://{host}:{bound}/ "
          f"- press Ctrl-C to stop", flush=True)
    for sig in (signal.SIGINT, signal.SIGTERM):  # also when started in the background, where SIGINT is ignored
        signal.signal(sig, _stop)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        print("ddpm web: stopped", flush=True)
    finally:
        server.server_close()
    return 0
