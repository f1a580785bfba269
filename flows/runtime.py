"""What one pipeline run works with: its settings, its paths, and checks made before any work.

Relative paths in params.yaml (data.root, train.out_dir, pipeline.feature_net) are relative to the
folder of the params file, the project root, whatever the current directory: a served deployment,
a DVC stage and `make pipeline` all write to the same places.

This module imports neither torch, Prefect nor MLflow, so that importing `flows` stays cheap.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import subprocess
import tempfile
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import yaml

from ddpm.fileio import file_sha256  # noqa: F401  (used by flows.tasks too)
from ddpm.config import Config, load_config
from ddpm.errors import ConfigError
from ddpm.layout import RunLayout
from ddpm.threads import apply_thread_defaults, cpu_threads
from ddpm.feature_pins import resolve_feature_net

log = logging.getLogger(__name__)

PROJECT_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_PARAMS = "params.yaml"

# Set unless the environment already has them. Nothing here should phone home or wait minutes on
# an unreachable server; MLflow's defaults (7 retries, 120 s timeout) can hang a run for minutes.
ENV_DEFAULTS = {
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "DO_NOT_TRACK": "1",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    # The first ephemeral start on a fresh 2-core machine migrates a database: more than the default 20 s.
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120",
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "30",
}
HEALTH_TIMEOUT_S = 3.0


class ServiceUnavailable(RuntimeError):
    """A server the run needs (Prefect API, MLflow tracking) did not answer: before anything was started,
    or, for TrackingUnavailable, during the run (its files are on disk)."""


def apply_env_defaults() -> None:
    """ENV_DEFAULTS and the CPU thread defaults (ddpm.threads), where the environment has none."""
    for key, value in ENV_DEFAULTS.items():
        os.environ.setdefault(key, value)
    try:
        apply_thread_defaults()
    except ConfigError:
        pass  # a bad DDPM_CPU_THREADS: load_settings reports it, as it does any bad setting


def _config_dict(cfg: Config) -> dict[str, Any]:
    return cfg.to_dict()


@dataclass(frozen=True)
class Settings:
    """The validated config of one run, with every path made absolute, and where it came from."""

    cfg: Config                 # paths absolute; what the stages use
    params_path: Path
    profile: str | None         # the profile actually applied (params.yaml's `profile:` if none was asked for)
    overrides: tuple[str, ...]

    @property
    def project(self) -> Path:
        return self.params_path.parent

    @property
    def layout(self) -> RunLayout:
        """Every path of the run, in train.out_dir (absolute)."""
        return RunLayout(self.cfg.train.out_dir)

    @property
    def feature_net(self) -> Path:
        return Path(self.cfg.pipeline.feature_net)

    def params(self) -> dict[str, str]:
        """Every setting as `section.key` -> string, as configured (relative paths stay relative)."""
        raw = load_config(self.params_path, self.profile, self.overrides)
        flat = {f"{section}.{key}": _param_str(value)
                for section, values in _config_dict(raw).items() for key, value in values.items()}
        flat["profile"] = str(self.profile)
        flat["overrides"] = json.dumps(list(self.overrides))
        return flat


def tracking_uri_for(settings: Settings) -> str:
    """The MLflow store of a run: $MLFLOW_TRACKING_URI, else pipeline.tracking_uri, else the project's
    sqlite:///<project>/mlflow/mlflow.db (here, not in flows.tracking, so that reading it imports no MLflow)."""
    return (os.environ.get("MLFLOW_TRACKING_URI") or settings.cfg.pipeline.tracking_uri
            or f"sqlite:///{settings.project / 'mlflow' / 'mlflow.db'}")


def _param_str(value: Any) -> str:
    return json.dumps(value) if isinstance(value, (list, tuple, bool)) or value is None else str(value)


def resolve_params_path(params_path: str | Path | None) -> Path:
    """A relative params path is looked up in the current directory, then in the project root."""
    path = Path(params_path or DEFAULT_PARAMS).expanduser()
    if not path.is_absolute():
        path = path if path.is_file() else PROJECT_ROOT / path
    return path.resolve()


def load_settings(params_path: str | Path | None = None, profile: str | None = None,
                  overrides: Sequence[str] | None = ()) -> Settings:
    """Read and validate params.yaml + profile + overrides (ConfigError names a bad key); make paths absolute."""
    cpu_threads()  # DDPM_CPU_THREADS is a setting too: a bad value is a ConfigError here
    path = resolve_params_path(params_path)
    overrides = tuple(overrides or ())
    cfg = load_config(path, profile, overrides)
    if profile is None and path.is_file():
        profile = (yaml.safe_load(path.read_text()) or {}).get("profile")
    root = path.parent

    def absolute(p: str) -> str:
        return str(Path(p) if Path(p).is_absolute() else root / p)

    cfg = dataclasses.replace(
        cfg,
        data=dataclasses.replace(cfg.data, root=absolute(cfg.data.root)),
        train=dataclasses.replace(cfg.train, out_dir=absolute(cfg.train.out_dir)),
        pipeline=dataclasses.replace(  # pinned / retrain / a path -> the file (ddpm.feature_pins)
            cfg.pipeline, feature_net=absolute(str(resolve_feature_net(cfg.pipeline.feature_net, cfg.data.dataset)))),
    )
    return Settings(cfg=cfg, params_path=path, profile=profile, overrides=overrides)


# --- checks made before any work, so that an unreachable server fails in seconds ---------------

def check_device(cfg: Config) -> None:
    """ConfigError when the settings ask for CUDA (runtime.device: cuda) on a machine without it: said before
    any stage works, and in DVC's settings stage before DVC removes the outputs of the stages that would fail.
    Only then is torch imported (runtime.device: auto runs anywhere)."""
    if cfg.runtime.device == "cuda":
        from ddpm.train import resolve_device

        resolve_device("cuda")


def _get(url: str, timeout: float) -> tuple[int, str]:
    req = urllib.request.Request(url, headers={"User-Agent": "ddpm-pipeline"})
    with urllib.request.urlopen(req, timeout=timeout) as resp:  # noqa: S310 - URLs come from the user's config
        return resp.status, resp.read(200).decode(errors="replace")


def check_prefect_api(timeout: float = HEALTH_TIMEOUT_S) -> str | None:
    """Return the configured Prefect API URL after checking that it answers; None means ephemeral mode."""
    from prefect.settings import PREFECT_API_URL  # light: no server or client is started

    url = PREFECT_API_URL.value()
    if not url:
        return None
    try:
        status, _ = _get(url.rstrip("/") + "/health", timeout)
    except (urllib.error.URLError, OSError) as exc:
        raise ServiceUnavailable(
            f"the Prefect API at {url} (PREFECT_API_URL) did not answer within {timeout:.0f} s: "
            f"{getattr(exc, 'reason', exc)}. Start it with `prefect server start --host 127.0.0.1`, or unset "
            f"PREFECT_API_URL (`prefect config unset PREFECT_API_URL`) to run on a temporary local API.") from None
    if status != 200:
        raise ServiceUnavailable(f"the Prefect API at {url} answered /health with HTTP {status}")
    return url


def check_tracking_uri(uri: str, timeout: float = HEALTH_TIMEOUT_S) -> None:
    """Before any stage starts: fail in seconds when an MLflow tracking server does not answer, at once when a
    sqlite store cannot be written or the store is a folder that MLflow 3 refuses."""
    if uri.startswith(("http://", "https://")):
        try:
            status, _ = _get(uri.rstrip("/") + "/health", timeout)
        except urllib.error.HTTPError as exc:
            status = exc.code
        except (urllib.error.URLError, OSError) as exc:
            raise ServiceUnavailable(
                f"the MLflow tracking server at {uri} (MLFLOW_TRACKING_URI) did not answer within {timeout:.0f} s: "
                f"{getattr(exc, 'reason', exc)}. Start it (`mlflow server --host 127.0.0.1 --backend-store-uri "
                f"sqlite:///mlflow.db`) or unset MLFLOW_TRACKING_URI to use the local store "
                f"mlflow/mlflow.db.") from None
        if status != 200:
            raise ServiceUnavailable(f"the MLflow tracking server at {uri} answered /health with HTTP {status}")
    elif uri.startswith("sqlite:///"):
        check_sqlite_store(Path(uri.removeprefix("sqlite:///")))
    elif (uri.startswith("file:") or ":" not in uri and uri != "databricks") and not _file_store_allowed():
        raise ConfigError(
            f"the MLflow store {uri} (MLFLOW_TRACKING_URI or pipeline.tracking_uri) is a folder, which MLflow 3 "
            f"refuses unless MLFLOW_ALLOW_FILE_STORE=true; use a database, e.g. sqlite:///mlflow/mlflow.db (the "
            f"project's default, with MLFLOW_TRACKING_URI unset; `mlflow migrate-filestore` moves existing runs), "
            f"or a server's http:// address")


def _file_store_allowed() -> bool:
    return os.environ.get("MLFLOW_ALLOW_FILE_STORE", "").strip().lower() in ("true", "1")


def check_sqlite_store(db: Path) -> None:
    """Fail at once when the sqlite file `db` or its folder (where sqlite writes its journal) cannot be written:
    MLflow would otherwise retry each write for minutes before failing with a long traceback."""
    try:
        db.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ServiceUnavailable(f"cannot create the folder of the MLflow store {db}: {exc}") from None
    try:
        fd, probe = tempfile.mkstemp(dir=db.parent, prefix=".ddpm-write-check-")
        os.close(fd)
        os.unlink(probe)
        if db.exists():
            with open(db, "r+b"):
                pass
    except OSError as exc:
        raise ServiceUnavailable(
            f"the MLflow store {db} cannot be written ({exc.strerror or exc}: {exc.filename or db.parent}); make "
            f"{db.parent} and {db.name} writable, or point MLFLOW_TRACKING_URI (or pipeline.tracking_uri) at a "
            f"writable store") from None


# --- provenance -------------------------------------------------------------------------------

def git_commit(project: Path) -> tuple[str, bool]:
    """(commit hash or "unknown", whether tracked files differ from it)."""
    def git(*args: str) -> str:
        return subprocess.run(["git", "-C", str(project), *args], capture_output=True, text=True, timeout=10,
                              check=True).stdout.strip()
    try:
        commit = git("rev-parse", "HEAD")
        dirty = bool(git("status", "--porcelain", "--untracked-files=no"))
    except (OSError, subprocess.SubprocessError):
        return "unknown", False
    return commit, dirty


def dvc_dataset_version(project: Path, data_root: str | Path) -> str:
    """The md5 that data.dvc records for data.root, or "untracked" when data.dvc tracks another folder."""
    dvc_file = project / "data.dvc"
    try:
        outs = (yaml.safe_load(dvc_file.read_text()) or {}).get("outs") or []
    except (OSError, yaml.YAMLError):
        return "untracked"
    for out in outs:
        if (project / out.get("path", "")).resolve() == Path(data_root).resolve():
            return str(out.get("md5", "untracked"))
    return "untracked"


# --- freshness of a stage's outputs on the Prefect path (dvc repro has dvc.lock: flows/README.md) -----

class Stamp:
    """A record, beside a stage's outputs (RunLayout.stamp), of the inputs they were made from and of their hashes.

    `fresh()` is true only when the inputs key is unchanged and every output (those asked for and those
    recorded) still has the recorded hash, so a rerun of the pipeline skips a finished stage and redoes
    one whose outputs changed. The train stage's record is its checkpoint (CheckpointStamp). A stage that
    DVC runs is forced: it does not read its stamp, but writes it.
    """

    def __init__(self, out_dir: Path, stage: str, inputs: dict[str, Any]):
        self.path = RunLayout(out_dir).stamp(stage)
        self.key = hashlib.sha256(json.dumps(inputs, sort_keys=True, default=str).encode()).hexdigest()

    def fresh(self, outputs: Sequence[Path]) -> bool:
        try:
            rec = json.loads(self.path.read_text())
            return rec["key"] == self.key and all(
                Path(p).is_file() and file_sha256(p) == rec["outputs"].get(p)
                for p in {str(p) for p in outputs} | set(rec["outputs"]))
        except (OSError, ValueError, KeyError, TypeError):
            return False

    def write(self, outputs: Sequence[Path]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        rec = {"key": self.key, "outputs": {str(p): file_sha256(p) for p in outputs}}
        tmp = self.path.with_name(f".{self.path.name}.tmp-{os.getpid()}")
        tmp.write_text(json.dumps(rec, indent=1))
        os.replace(tmp, self.path)

    def clear(self) -> None:
        self.path.unlink(missing_ok=True)


# Settings a run may change and still resume from a checkpoint: they do not change what is learned.
RESUMABLE_TRAIN_KEYS = {"steps", "log_every", "sample_every", "checkpoint_every", "out_dir", "compile", "nproc"}
LEARNING_RUNTIME_KEYS = {"bf16"}  # runtime settings that change what is learned (runtime.device does not)


class CheckpointMismatch(RuntimeError):
    """A checkpoint in train.out_dir was trained with other settings; it is kept, not resumed."""


def is_user_error(exc: BaseException) -> bool:
    """Whether `exc` says what the user must change (a bad setting or input, a checkpoint of other settings, a
    server that does not answer): reported in one line, without a traceback, by the commands and in Prefect."""
    from ddpm.errors import DDPMError

    return isinstance(exc, (DDPMError, ServiceUnavailable, CheckpointMismatch))


def checkpoint_differences(saved: dict[str, Any], wanted: dict[str, Any], step: int, steps: int) -> list[str]:
    """Settings that make a saved checkpoint unusable for resuming the wanted run.

    Stricter than `ddpm train --resume` (ddpm.run_folder.resume_changes), which also lets train.lr and
    the other train settings change: a pipeline run is defined by its settings, so it resumes only its own.
    """
    from ddpm.run_folder import setting_changes

    diffs = []
    for key, old, new in setting_changes(saved, wanted):
        section, name = key.split(".", 1)
        if section in ("diffusion", "model") or key == "data.dataset" or (
                section == "train" and name not in RESUMABLE_TRAIN_KEYS) or (
                section == "runtime" and name in LEARNING_RUNTIME_KEYS):
            diffs.append(f"{key}: {old!r} -> {new!r}")
    if step > steps:
        diffs.append(f"the checkpoint is at step {step}, past train.steps={steps}")
    return diffs


class CheckpointStamp:
    """The train stage's record: its checkpoint, which ddpm.train writes with the settings and the step at every
    checkpoint, so that it describes a run stopped halfway too (a Stamp is written only when a stage ends).

    `check()` refuses a checkpoint of other settings (checkpoint_differences); `fresh()` is true when the
    checkpoint is at train.steps and every output exists: the stage is skipped. Otherwise it resumes.
    """

    def __init__(self, layout: RunLayout, wanted: Config):
        self.path, self.steps = layout.checkpoint, wanted.train.steps
        self.step: int | None = None
        self.differences: list[str] = []
        if self.path.is_file():
            from ddpm.checkpoint import load_checkpoint

            ckpt = load_checkpoint(self.path)
            self.step = int(ckpt["step"])
            self.differences = checkpoint_differences(ckpt["config"], wanted.to_dict(), self.step, self.steps)

    def check(self) -> None:
        if self.differences:
            raise CheckpointMismatch(
                f"{self.path} was trained with other settings ({'; '.join(self.differences)}); it was kept. Set "
                f"train.out_dir to a new folder, or rerun with force (--force; a deployment run: the parameter "
                f"force=true) to train from scratch over it.")

    def fresh(self, outputs: Sequence[Path]) -> bool:
        return self.step == self.steps and not self.differences and all(Path(p).is_file() for p in outputs)
