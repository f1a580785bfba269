"""MLflow tracking: one parent run per pipeline run, one nested run per stage.

Everything goes through `MlflowClient` with explicit run ids (no fluent "active run"), so tasks may
run in any thread. The store is $MLFLOW_TRACKING_URI, else `pipeline.tracking_uri`, else
sqlite:///<project>/mlflow/mlflow.db with artifacts in <project>/mlflow/artifacts.

When tracking fails: the stage's files come first. A ddpm function writes its outputs (checkpoint,
loss.csv, metrics.json, model.onnx) to disk before anything is logged, and per-step training metrics
that cannot be sent are not retried in the training loop: live logging stops with one warning and
the whole curve is sent from loss.csv when the stage ends. If sending the stage's record fails
then, the stage fails with that error (the run is not silently incomplete), its files stay, and a
rerun skips the finished work and logs the record again. So MLflow is "buffer to disk, fail at the
stage boundary", never "lose a checkpoint".

When the tracking server itself goes away mid-run (killed, restarted): training does not stop for
it (checkpoints and loss.csv keep being written to the end of train.steps); the first record that
cannot be sent afterwards raises TrackingUnavailable, which names the server and says what to do,
and the process exits with status 2 within seconds (MLflow's retries are capped, see
flows.runtime.ENV_DEFAULTS, and nothing more is sent to a server known to be down). The runs that
could not be ended are listed in <train.out_dir>/.mlflow-unended.json, and the next run on the same
store ends them FAILED (KILLED after a signal) with the original error, then resumes: finished
stages are skipped and their records, the whole loss curve included, are sent again.
"""

from __future__ import annotations

import contextlib
import csv
import json
import logging
import os
import signal
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Mapping

import mlflow
from mlflow.entities import Metric, Param, RunStatus, RunTag
from mlflow.tracking import MlflowClient
from prefect.exceptions import TerminationSignal

from ddpm.errors import TrainingInterrupted
from flows.runtime import (ServiceUnavailable, Settings, check_tracking_uri, dvc_dataset_version, git_commit,  # noqa: F401
                           tracking_uri_for)  # (tracking_uri_for: imported from here by flows.stages)

log = logging.getLogger(__name__)

MAX_TAG_CHARS = 5000
METRICS_PER_BATCH = 1000  # MLflow's limit per log_batch request
PARAMS_PER_BATCH = 100


class TrackingUnavailable(ServiceUnavailable):
    """The MLflow tracking server stopped answering during a run; the stages' files are on disk."""


def _chain(exc: BaseException) -> list[BaseException]:
    """exc and the exceptions it was raised from or while handling, outermost first."""
    chain: list[BaseException] = []
    e: BaseException | None = exc
    while e is not None and not any(e is c for c in chain):
        chain.append(e)
        e = e.__cause__ or e.__context__
    return chain


def server_unreachable(exc: BaseException, uri: str) -> bool:
    """True when exc comes from a request to the tracking server `uri` that got no answer (refused, reset,
    timed out), as opposed to an answer that refused the request."""
    import requests

    if not uri.startswith(("http://", "https://")):
        return False
    chain = _chain(exc)
    no_answer = any(isinstance(e, (ConnectionError, TimeoutError, requests.ConnectionError, requests.Timeout))
                    for e in chain)
    return no_answer and any(uri.rstrip("/") in str(e) for e in chain)


_sigterms: list[int] = []  # the SIGTERMs noted by _noting_sigterm in this process


def sigterm_count() -> int:
    """How many SIGTERMs arrived during run blocks of this process (compare before and after a call)."""
    return len(_sigterms)


@contextlib.contextmanager
def _noting_sigterm() -> Iterator[None]:
    """Note each SIGTERM, then pass it on to the handler in place (in a flow run Prefect's, which raises
    TerminationSignal wherever the main thread is). That exception may not survive the way up: a C
    extension being imported turns it into "ImportError: initialization failed". The note does."""
    handler = signal.getsignal(signal.SIGTERM)

    def note(signum: int, frame: Any) -> None:
        _sigterms.append(signum)
        handler(signum, frame)

    installed = callable(handler)  # else nothing in Python to pass it on to
    if installed:
        try:
            signal.signal(signal.SIGTERM, note)
        except ValueError:  # not the main thread: signals stay with the caller
            installed = False
    if not installed:
        yield
        return
    try:
        yield
    finally:
        if signal.getsignal(signal.SIGTERM) is note:
            signal.signal(signal.SIGTERM, handler)


def _stopped_by_signal(error: BaseException) -> bool:
    """SIGINT (KeyboardInterrupt), SIGTERM in the training loop (TrainingInterrupted) or anywhere else in a
    Prefect flow (Prefect's TerminationSignal)."""
    return isinstance(error, (KeyboardInterrupt, TrainingInterrupted, TerminationSignal))


def _describe(error: BaseException, signalled: bool = False) -> str:
    if isinstance(error, TerminationSignal):  # it carries no message, only the signal number
        return f"TerminationSignal: stopped by {signal.Signals(error.signal).name}"
    if signalled and not _stopped_by_signal(error):
        return f"stopped by SIGTERM, which surfaced as {type(error).__name__}: {error}"
    return f"{type(error).__name__}: {error}"


def artifact_location_for(uri: str) -> str | None:
    """Artifacts of a sqlite store go beside the database, not into ./mlruns of whatever the cwd is."""
    if uri.startswith("sqlite:///"):
        return (Path(uri.removeprefix("sqlite:///")).parent / "artifacts").resolve().as_uri()
    return None  # a tracking server decides (its --artifacts-destination)


@dataclass(frozen=True)
class RunRef:
    """Where to log: a tracking URI and a run id. Small and plain, so it can be a task argument."""

    uri: str
    run_id: str

    def logger(self) -> "RunLogger":
        return RunLogger(MlflowClient(self.uri), self.run_id)


class RunLogger:
    """Logging calls for one run, by id."""

    def __init__(self, client: MlflowClient, run_id: str):
        self.client, self.run_id = client, run_id

    def params(self, params: dict[str, str]) -> None:
        items = [Param(k, str(v)[:6000]) for k, v in params.items()]
        for i in range(0, len(items), PARAMS_PER_BATCH):
            self.client.log_batch(self.run_id, params=items[i:i + PARAMS_PER_BATCH])

    def tags(self, tags: dict[str, Any]) -> None:
        self.client.log_batch(self.run_id, tags=[RunTag(k, str(v)[:MAX_TAG_CHARS]) for k, v in tags.items()])

    def metrics(self, metrics: dict[str, float], step: int = 0) -> None:
        now = int(time.time() * 1000)
        self.metric_batch([Metric(k, float(v), now, step) for k, v in metrics.items()])

    def metric_batch(self, metrics: list[Metric]) -> None:
        for i in range(0, len(metrics), METRICS_PER_BATCH):
            self.client.log_batch(self.run_id, metrics=metrics[i:i + METRICS_PER_BATCH])

    def artifact(self, path: str | Path, folder: str | None = None) -> None:
        self.client.log_artifact(self.run_id, str(path), folder)

    def artifact_folder(self, path: str | Path, folder: str) -> None:
        """Every file under `path`, as the run's artifact folder `folder` (subfolders kept)."""
        self.client.log_artifacts(self.run_id, str(path), folder)

    def image(self, png: str | Path, key: str, step: int) -> None:
        """A PNG as a step-indexed image (MLflow's image panel), besides `artifact`."""
        from PIL import Image

        with Image.open(png) as img:
            self.client.log_image(self.run_id, img.convert("RGB"), key=key, step=step)


class LiveMetrics:
    """on_log callback for ddpm.train: sends each row as it comes; on the first failure it stops
    trying (training must not wait on a tracking server) and `backfill` later sends what is missing."""

    def __init__(self, run: RunLogger):
        self.run, self.sent, self.failed = run, set(), None

    def __call__(self, step: int, metrics: dict[str, float]) -> None:
        if self.failed is not None:
            return
        try:
            self.run.metrics(metrics, step)
            self.sent.add(step)
        except Exception as exc:  # noqa: BLE001 - any tracking failure; the rows stay in loss.csv
            self.failed = exc
            log.warning("MLflow logging failed at step %d (%s); training goes on, and the loss curve will be "
                        "sent from loss.csv when the stage ends", step, exc)


def backfill_loss_csv(run: RunLogger, loss_csv: Path, sent: set[int] = frozenset()) -> int:
    """Send every row of loss.csv whose step was not sent yet: metrics loss, lr, images_per_sec."""
    now = int(time.time() * 1000)
    batch = []
    with open(loss_csv, newline="") as f:
        for row in csv.DictReader(f):
            step = int(row["step"])
            if step not in sent:
                batch += [Metric(k, float(row[k]), now, step) for k in ("loss", "lr", "images_per_sec")]
    run.metric_batch(batch)
    return len(batch) // 3


# What DVC tells a stage's command (`dvc repro`: the stage; `dvc exp run`: also the experiment's name and the commit
# it starts from), and the tags that keep it on the stage's MLflow run.
DVC_ENV_TAGS = {"DVC_STAGE": "dvc.stage", "DVC_EXP_NAME": "dvc.experiment", "DVC_EXP_BASELINE_REV": "dvc.baseline_rev"}


def dvc_tags(environ: Mapping[str, str] = os.environ) -> dict[str, str]:
    """The DVC stage and experiment this process runs in, as tags; none outside DVC."""
    return {tag: environ[var] for var, tag in DVC_ENV_TAGS.items() if environ.get(var)}


class Tracker:
    """The experiment of a run's settings; creates parent and stage runs."""

    def __init__(self, settings: Settings):
        self.settings = settings
        self.uri = tracking_uri_for(settings)
        check_tracking_uri(self.uri)
        # Model logging (mlflow.<flavor>.log_model) reads the process-wide URI and experiment.
        mlflow.set_tracking_uri(self.uri)
        self.client = MlflowClient(self.uri)
        name = settings.cfg.pipeline.experiment
        with self._reaching():
            exp = self.client.get_experiment_by_name(name)
            self.experiment_id = exp.experiment_id if exp else self.client.create_experiment(
                name, artifact_location=artifact_location_for(self.uri))
            mlflow.set_experiment(experiment_id=self.experiment_id)
        self._end_unended()

    def provenance_tags(self) -> dict[str, str]:
        s = self.settings
        commit, dirty = git_commit(s.project)
        tags = {
            "git.commit": commit, "git.dirty": str(dirty).lower(), "mlflow.source.git.commit": commit,
            "dataset.name": s.cfg.data.dataset,
            "dataset.version": dvc_dataset_version(s.project, s.cfg.data.root),
            "profile": str(s.profile), "params_file": str(s.params_path),
        }
        with contextlib.suppress(Exception):  # outside a flow run there is no Prefect context
            from prefect.runtime import flow_run

            if flow_run.id:
                tags.update({"prefect.flow_run_id": flow_run.id, "prefect.flow_run_name": flow_run.name})
        return {**tags, **dvc_tags()}

    def start_run(self, name: str, parent_run_id: str | None = None, tags: dict[str, str] | None = None) -> RunRef:
        all_tags = {**self.provenance_tags(), **(tags or {})}
        if parent_run_id:
            all_tags["mlflow.parentRunId"] = parent_run_id
        experiment = all_tags.get("dvc.experiment")  # the runs of one `dvc exp run` share its name in the UI's list
        with self._reaching():
            run = self.client.create_run(self.experiment_id, run_name=f"{name} ({experiment})" if experiment else name,
                                         tags=all_tags)
        ref = RunRef(self.uri, run.info.run_id)
        with self._reaching_about(ref):
            ref.logger().params(self.settings.params())
        return ref

    def end_run(self, ref: RunRef, error: BaseException | None = None, signalled: bool = False) -> None:
        """FINISHED; KILLED when a signal stopped the work (`signalled`: a SIGTERM was noted, whatever `error`
        became); else FAILED. The error becomes tag `error` and its traceback the artifact error.txt. A run
        that cannot be ended is left for the next run."""
        if error is None:
            with self._reaching_about(ref):
                self.client.set_terminated(ref.run_id, RunStatus.to_string(RunStatus.FINISHED))
            return
        killed = signalled or _stopped_by_signal(error)
        status = RunStatus.to_string(RunStatus.KILLED if killed else RunStatus.FAILED)
        message = _describe(error, signalled)[:MAX_TAG_CHARS]
        if isinstance(error, TrackingUnavailable):  # the store is what failed: each try would wait for retries
            self._leave_unended(ref, status, message)
            return
        try:
            self.client.set_tag(ref.run_id, "error", message)
            self.client.log_text(ref.run_id, "".join(traceback.format_exception(error)), "error.txt")
        except Exception as exc:  # noqa: BLE001 - the store may be what failed; report the original error
            log.warning("could not record the error in MLflow run %s: %s", ref.run_id, exc)
        try:
            self.client.set_terminated(ref.run_id, status)
        except Exception:  # noqa: BLE001
            self._leave_unended(ref, status, message)

    def _leave_unended(self, ref: RunRef, status: str, message: str) -> None:
        path = self.settings.layout.unended_runs
        runs = json.loads(path.read_text()) if path.is_file() else []
        runs.append({"uri": ref.uri, "run_id": ref.run_id, "status": status, "error": message})
        write_json(path, runs)
        log.warning("MLflow run %s could not be ended (%s); the next run on %s ends it", ref.run_id, status, ref.uri)

    def _end_unended(self) -> None:
        """End the runs that an earlier run could not end (its tracking server was down)."""
        path = self.settings.layout.unended_runs
        if not path.is_file():
            return
        left = []
        for run in json.loads(path.read_text()):
            if run["uri"] != self.uri:
                left.append(run)
                continue
            try:
                with self._reaching():
                    self.client.set_tag(run["run_id"], "error", run["error"])
                    self.client.set_terminated(run["run_id"], run["status"])
            except TrackingUnavailable:
                raise
            except Exception as exc:  # noqa: BLE001 - e.g. a store made anew, without that run: nothing to end
                log.warning("could not end MLflow run %s of an earlier run: %s", run["run_id"], exc)
                continue
            log.info("ended MLflow run %s of an earlier run as %s", run["run_id"], run["status"])
        if left:
            write_json(path, left)
        else:
            path.unlink()

    @contextlib.contextmanager
    def _reaching(self) -> Iterator[None]:
        """Turn "the tracking server did not answer" into TrackingUnavailable, which says what to do."""
        try:
            yield
        except Exception as exc:
            if isinstance(exc, TrackingUnavailable) or not server_unreachable(exc, self.uri):
                raise
            innermost = _chain(exc)[-1]
            reason = (str(innermost).splitlines() or [type(innermost).__name__])[0][:200]
            raise TrackingUnavailable(
                f"the MLflow tracking server at {self.uri} stopped answering ({reason}). What finished is on disk "
                f"in {self.settings.layout.out_dir}. Start the server again on the same backend store and rerun: "
                f"finished stages are skipped and their records sent then.") from exc

    @contextlib.contextmanager
    def _reaching_about(self, ref: RunRef) -> Iterator[None]:
        """_reaching for requests about the existing run `ref`: if the server stopped answering, the run is
        left for the next run to end (FAILED)."""
        try:
            with self._reaching():
                yield
        except TrackingUnavailable as exc:
            self._leave_unended(ref, RunStatus.to_string(RunStatus.FAILED), _describe(exc)[:MAX_TAG_CHARS])
            raise

    @contextlib.contextmanager
    def run(self, name: str, parent_run_id: str | None = None, tags: dict[str, str] | None = None) -> Iterator[RunRef]:
        """A run around a block: FINISHED, or ended by `end_run` with the block's error."""
        ref = self.start_run(name, parent_run_id, tags)
        noted = sigterm_count()
        try:
            with self._reaching(), _noting_sigterm():
                yield ref
        except BaseException as exc:
            self.end_run(ref, exc, signalled=sigterm_count() > noted)
            raise
        self.end_run(ref)

    def stage(self, name: str, parent_run_id: str | None = None) -> contextlib.AbstractContextManager[RunRef]:
        """A run for one stage, nested under the pipeline's run when there is one."""
        return self.run(name, parent_run_id, {"ddpm.stage": name})


def write_json(path: Path, data: dict[str, Any] | list[Any]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True, default=str) + "\n")
    os.replace(tmp, path)
    return path
