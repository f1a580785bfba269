"""What a Prefect run shows while it works: the library's log lines, and progress every few seconds.

`bridge_library_logs` sends the `ddpm` and `flows` loggers' records (sampling time, parity, FID,
feature-net reuse, ...) to the run's Prefect log, whichever process runs the flow: `python -m
flows.pipeline`, `python -m flows.serve` or a worker of a work pool. Prefect's own
PREFECT_LOGGING_EXTRA_LOGGERS would need to be set before Prefect is imported (a worker imports it
long before the flows) and leaves the loggers at the root's WARNING level.

Under `ddpm-pipeline` (`echoed_to`), those records also go to the pipeline's own run, whose log is the one
that `prefect deployment run --watch` follows.

`log_failure` (each flow's on_failure hook) ends a failed run's log with its reason in one line.

`StageProgress` is a stage's progress: a Prefect progress artifact (`<stage>-progress`) updated every
INTERVAL_S seconds and a log line every LOG_EVERY_S seconds, from a background thread, whether or not
the work moved: a slow step still shows that the run is alive. The work reports where it is through
ddpm.progress (sampling, evaluation phases) or a training-step callback; nothing here blocks it.
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
import threading
import time
from typing import Any, Iterator

from prefect.logging.handlers import APILogHandler

from ddpm import progress

log = logging.getLogger(__name__)

BRIDGED_LOGGERS = ("ddpm", "flows")
INTERVAL_S = 5.0
LOG_EVERY_S = 10.0


_pipeline_run: contextvars.ContextVar[str | None] = contextvars.ContextVar("ddpm_pipeline_run", default=None)


@contextlib.contextmanager
def echoed_to(flow_run_id: Any) -> Iterator[None]:
    """Inside this block (ddpm-pipeline's body), a bridged record made in a stage's subflow run goes to that
    run's log and to `flow_run_id`'s too: `prefect deployment run ... --watch` and `prefect flow-run logs`
    on the pipeline's run read that run's log alone."""
    token = _pipeline_run.set(str(flow_run_id) if flow_run_id else None)
    try:
        yield
    finally:
        _pipeline_run.reset(token)


class RunLogHandler(APILogHandler):
    """Prefect's API log handler for records made inside a flow or task run; others stay local (no warning).
    A record made in a stage's subflow under ddpm-pipeline goes to the pipeline's run too (`echoed_to`)."""

    def emit(self, record: logging.LogRecord) -> None:
        from prefect.context import FlowRunContext, TaskRunContext

        given, flow, task = getattr(record, "flow_run_id", None), FlowRunContext.get(), TaskRunContext.get()
        if not (given or flow or task):
            return
        super().emit(record)
        current = given or (flow.flow_run.id if flow and flow.flow_run else task.task_run.flow_run_id if task else None)
        pipeline = _pipeline_run.get()
        if pipeline and current and str(current) != pipeline:
            super().emit(logging.makeLogRecord({**record.__dict__, "flow_run_id": pipeline, "task_run_id": None}))


# Prefect's engine loggers: each logs a failing run's exception with its traceback.
ENGINE_LOGGERS = ("prefect.flow_runs", "prefect.task_runs")


class UserErrorsInOneLine(logging.Filter):
    """On Prefect's flow-run and task-run loggers, which log a failing run's exception with its traceback ("Task
    run failed with exception", "Encountered exception during execution", and again in a worker's "Engine
    execution exited ..."): for a user error (flows.runtime.is_user_error) the line alone, so `--watch` ends in
    the reason rather than in the engine's frames; any other exception keeps its traceback."""

    def filter(self, record: logging.LogRecord) -> bool:
        from flows.runtime import is_user_error

        if record.exc_info and record.exc_info[1] is not None and is_user_error(record.exc_info[1]):
            record.exc_info, record.exc_text = None, None
        return True


def bridge_library_logs() -> None:
    """Send the BRIDGED_LOGGERS' INFO records to the current run's Prefect log (idempotent), and log a user
    error of a failing run in one line (UserErrorsInOneLine).

    A logger whose level the user set keeps it; one that already has an API handler (say, from
    PREFECT_LOGGING_EXTRA_LOGGERS) gets no second one.
    """
    for engine in map(logging.getLogger, ENGINE_LOGGERS):
        if not any(isinstance(f, UserErrorsInOneLine) for f in engine.filters):
            engine.addFilter(UserErrorsInOneLine())
    for name in BRIDGED_LOGGERS:
        logger = logging.getLogger(name)
        if logger.level == logging.NOTSET:
            logger.setLevel(logging.INFO)
        if not any(isinstance(h, APILogHandler) for h in logger.handlers):
            logger.addHandler(RunLogHandler())


FAILURE_PREFIX = "Flow run encountered an exception: "  # how Prefect begins the message of a raising flow


def log_failure(flow: Any, flow_run: Any, state: Any) -> None:
    """on_failure hook: the reason, in one line, as the run's last log line (`prefect deployment run --watch`
    ends with it; the state's message, which `prefect flow-run inspect` shows, holds it as well)."""
    from prefect.logging.loggers import flow_run_logger

    lines = (state.message or "no message").removeprefix(FAILURE_PREFIX).strip().splitlines() or ["no message"]
    flow_run_logger(flow_run, flow).error("%s failed: %s", flow.name, lines[0])


class StageProgress:
    """Publishes a stage's progress while the `with` block runs; also the ddpm.progress hook inside it.

    Call it as `progress(phase, done, total)` (ddpm.progress.advance inside the block calls it too).
    """

    def __init__(self, stage: str, interval_s: float = INTERVAL_S, log_every_s: float = LOG_EVERY_S):
        self.stage, self.interval_s, self.log_every_s = stage, interval_s, log_every_s
        self.state: tuple[str, int, int] = ("starting", 0, 0)  # (phase, done, total), replaced as a whole
        self.fraction = 0.0
        self.started = time.monotonic()
        self._stop = threading.Event()
        self._artifact_id: Any = None
        self._thread: threading.Thread | None = None
        self._reporting: Any = None

    def __call__(self, phase: str, done: int = 0, total: int = 0) -> None:
        self.state = (phase, done, total)

    @property
    def seconds(self) -> float:
        return time.monotonic() - self.started

    def snapshot(self) -> tuple[float, str]:
        """(fraction done, a line saying where the stage is); a phase without a count keeps the last fraction."""
        phase, done, total = self.state
        if total:
            self.fraction = min(1.0, done / total)
        where = f"{phase} {done}/{total} ({self.fraction:.0%})" if total else phase
        return self.fraction, f"{self.stage}: {where}, {self.seconds:.0f} s"

    def __enter__(self) -> "StageProgress":
        self._artifact_id = _create_progress_artifact(self.stage)
        context = contextvars.copy_context()  # the run's context: the thread's log lines go to this run
        self._thread = threading.Thread(target=context.run, args=(self._beat,), name=f"{self.stage}-progress",
                                        daemon=True)
        self._thread.start()
        self._reporting = progress.reporting(self)
        self._reporting.__enter__()
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        self._reporting.__exit__(exc_type, exc, tb)
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        if exc_type is None:
            self.state = ("done", 1, 1)
        self._publish(*self.snapshot())

    def _beat(self) -> None:
        last_log = time.monotonic()
        while not self._stop.wait(self.interval_s):
            fraction, text = self.snapshot()
            self._publish(fraction, text)
            if time.monotonic() - last_log >= self.log_every_s - self.interval_s / 2:
                log.info("%s", text)
                last_log = time.monotonic()

    def _publish(self, fraction: float, text: str) -> None:
        if self._artifact_id is None:
            return
        from prefect.artifacts import update_progress_artifact

        try:
            update_progress_artifact(self._artifact_id, 100.0 * fraction, description=text, _sync=True)
        except Exception as exc:  # noqa: BLE001 - progress is a view; the work goes on without it
            log.warning("stopped updating the %s progress artifact: %s", self.stage, exc)
            self._artifact_id = None


def _create_progress_artifact(stage: str) -> Any:
    from prefect.artifacts import create_progress_artifact

    try:
        return create_progress_artifact(0.0, key=f"{stage}-progress", description=f"{stage}: starting", _sync=True)
    except Exception as exc:  # noqa: BLE001
        log.warning("no %s progress artifact: %s", stage, exc)
        return None
