"""Progress of the library's long loops, for whoever watches: a callback that the caller installs.

Sampling (ddpm.generate, ddpm.onnx_sampler) and evaluation (ddpm.evaluate) call
`advance(phase, done, total)` as their work moves. Nothing happens unless the caller installed a
hook for the current context:

    with progress.reporting(lambda phase, done, total: print(phase, done, total)):
        evaluate_checkpoint(...)

The pipeline (flows/) installs one that publishes to Prefect; the library knows nothing of Prefect.
A hook must be cheap (it runs inside sampling loops) and must not raise.
"""

from __future__ import annotations

import contextlib
import logging
import math
import sys
import time
from contextvars import ContextVar
from typing import Callable, Iterator

log = logging.getLogger(__name__)

Hook = Callable[[str, int, int], None]  # (phase, done, total); total 0: a phase without a count
_hook: ContextVar[Hook | None] = ContextVar("ddpm_progress_hook", default=None)


@contextlib.contextmanager
def reporting(hook: Hook | None) -> Iterator[None]:
    """Send `advance` calls made in this context (this thread, and tasks started from it) to `hook`."""
    token = _hook.set(hook)
    try:
        yield
    finally:
        _hook.reset(token)


def advance(phase: str, done: int = 0, total: int = 0) -> None:
    """`done` of `total` units of `phase` are finished (a no-op without a hook)."""
    hook = _hook.get()
    if hook is not None:
        hook(phase, done, total)


class StepBar:
    """Training's own progress: a tqdm bar on a terminal; elsewhere (a log file, a pipe, or without tqdm) a log
    line at most every `every_s` seconds and at the last step, since a bar's redraws would fill a log file, and
    none where a caller reports progress already (a hook is installed: the pipeline's stages log their own)."""

    def __init__(self, total: int, start: int, enabled: bool = True, every_s: float = 10.0):
        self.bar, self.total, self.every_s, self.logged_at = None, total, every_s, -math.inf
        if not (enabled and sys.stderr.isatty()):
            return
        try:
            from tqdm import tqdm
            self.bar = tqdm(total=total, initial=start, unit="step", dynamic_ncols=True)
        except ImportError:
            pass

    def __call__(self, step: int, loss: float, ips: float) -> None:
        if self.bar is not None:
            self.bar.set_postfix(loss=f"{loss:.4f}", img_s=f"{ips:,.0f}")
            self.bar.n = step
            self.bar.refresh()
            return
        if _hook.get() is not None:
            return
        now = time.monotonic()
        if now - self.logged_at >= self.every_s or step >= self.total:
            self.logged_at = now
            log.info("step %d/%d  loss %.4f  %.0f img/s", step, self.total, loss, ips)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
