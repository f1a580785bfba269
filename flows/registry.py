"""From the model registry to a local ONNX file: `models:/<name>@<alias>` or `models:/<name>/<version>`.

The store is the pipeline's own (flows.runtime.tracking_uri_for: $MLFLOW_TRACKING_URI, else
pipeline.tracking_uri of params.yaml, else the project's sqlite store mlflow/mlflow.db), so a registry
URI names the same model for `ddpm onnx-sample` as for the export stage that registered it. Every
MLflow call is given that store: none falls back to MLflow's default, which would create an empty
mlflow.db in the current directory. A sqlite store that does not exist is an error, never created.

A version's ONNX file is downloaded once into a cache, <cache>/<name>/<version>/model.onnx, and
checked against the SHA-256 that the export stage tagged on the version (`onnx_sha256`). A cached
file that no longer matches (another store that reuses the name and version) is downloaded again;
a download that does not match is refused and leaves nothing in the cache.

MLflow is imported inside the functions that talk to the store, so `ddpm onnx-sample` with a plain
file path never imports it.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from ddpm.errors import DDPMError
from flows.runtime import ServiceUnavailable, check_tracking_uri, file_sha256, load_settings, tracking_uri_for

MODEL_URI = re.compile(r"models:/(?P<name>[^/@]+)(?:@(?P<alias>[^/@]+)|/(?P<version>[0-9]+))")
ONNX_FILE = "model.onnx"  # the name in the cache; the file in the logged model is named by its MLmodel


class RegistryError(DDPMError):
    """A registry URI that names no model in the store, or a store that cannot be reached or read."""


@dataclass(frozen=True)
class RegisteredOnnx:
    """A registered model version and its ONNX file in the cache."""

    uri: str            # as asked for: models:/ddpm-unet@champion
    store: str          # the tracking URI it was resolved in
    name: str
    version: str
    sha256: str | None  # the version's onnx_sha256 tag (None for versions registered without one)
    path: Path


def is_registry_uri(model: str) -> bool:
    return str(model).startswith("models:/")


def parse_model_uri(uri: str) -> tuple[str, str | None, str | None]:
    """models:/<name>@<alias> -> (name, alias, None); models:/<name>/<version> -> (name, None, version)."""
    match = MODEL_URI.fullmatch(uri)
    if match is None:
        raise RegistryError(f"model {uri!r} is not a registry URI; write models:/<name>@<alias> "
                            f"(e.g. models:/ddpm-unet@champion) or models:/<name>/<version>")
    return match["name"], match["alias"], match["version"]


def default_cache() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "ddpm" / "models"


def store_uri(params_path: str | Path | None = None, profile: str | None = None) -> str:
    """The pipeline's tracking URI for these settings, checked to exist (sqlite) or to answer (a server)."""
    uri = tracking_uri_for(load_settings(params_path, profile))
    if uri.startswith("sqlite:///"):
        db = Path(uri.removeprefix("sqlite:///"))
        if not db.is_file():
            raise RegistryError(f"there is no MLflow store at {db}: run the pipeline (`make pipeline`) to register "
                                f"a model there, or set MLFLOW_TRACKING_URI (or pipeline.tracking_uri in params.yaml) "
                                f"to the store that holds it")
    else:
        try:
            check_tracking_uri(uri)
        except ServiceUnavailable as exc:
            raise RegistryError(str(exc)) from None
    return uri


def fetch_onnx(uri: str, params_path: str | Path | None = None, profile: str | None = None,
               cache: str | Path | None = None) -> RegisteredOnnx:
    """Resolve a registry URI in the pipeline's store and return its ONNX file, downloaded unless cached."""
    from mlflow.tracking import MlflowClient

    name, alias, version = parse_model_uri(uri)
    store = store_uri(params_path, profile)
    client = MlflowClient(tracking_uri=store, registry_uri=store)
    found = _model_version(client, store, name, alias, version)
    version, sha = str(found.version), found.tags.get("onnx_sha256")
    path = Path(cache or default_cache()) / name / version / ONNX_FILE
    if not (sha and path.is_file() and file_sha256(path) == sha):
        _download(store, _artifact_location(client, found), f"version {version} of {name!r}", path, sha)
    return RegisteredOnnx(uri=uri, store=store, name=name, version=version, sha256=sha, path=path)


def _model_version(client: Any, store: str, name: str, alias: str | None, version: str | None) -> Any:
    """The model version an alias or a number names, or a RegistryError that lists what the store has."""
    from mlflow.exceptions import MlflowException

    try:
        return (client.get_model_version_by_alias(name, alias) if alias else client.get_model_version(name, version))
    except MlflowException:
        pass
    try:
        model = client.get_registered_model(name)
    except MlflowException:
        names = sorted(m.name for m in client.search_registered_models(max_results=20))
        raise RegistryError(f"the MLflow store {store} has no registered model {name!r} (it has: "
                            f"{', '.join(names) or 'none'})") from None
    if alias:
        known = ", ".join(f"{a} -> version {v}" for a, v in sorted(model.aliases.items())) or "none"
        raise RegistryError(f"registered model {name!r} has no alias {alias!r} in {store} (its aliases: {known})")
    numbers = sorted(int(v.version) for v in client.search_model_versions(f"name = '{name}'"))
    raise RegistryError(f"registered model {name!r} has no version {version} in {store} (its versions: "
                        f"{', '.join(map(str, numbers)) or 'none'})")


def _artifact_location(client: Any, found: Any) -> str:
    """Where the version's logged model is stored. A version registered from a logged model has the source
    models:/<model id>; MLflow's own resolution of that URI reads the process-wide store, so it is
    resolved here, in the store at hand."""
    source = str(found.source)
    if source.startswith("models:/m-"):
        return client.get_logged_model(source.removeprefix("models:/")).artifact_location
    return source


def _download(store: str, location: str, what: str, path: Path, sha: str | None) -> None:
    """Download the logged model at `location` into a temporary folder beside `path`, check its ONNX file
    against `sha`, then move that file into place (a reader never sees a partial file)."""
    import mlflow.artifacts
    from mlflow.exceptions import MlflowException

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".download-", dir=path.parent))
    try:
        try:
            local = Path(mlflow.artifacts.download_artifacts(artifact_uri=location, dst_path=str(tmp),
                                                             tracking_uri=store))
        except (MlflowException, OSError) as exc:
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
            raise RegistryError(f"could not download {what} from {location}: {first}") from None
        onnx_file = local / _onnx_file_name(local)
        if not onnx_file.is_file():
            raise RegistryError(f"{what} in {store} holds no ONNX file ({onnx_file.name} in {location}); it was "
                                f"not logged by the export stage")
        if sha is not None and file_sha256(onnx_file) != sha:
            raise RegistryError(f"the ONNX file of {what} downloaded from {location} does not match the version's "
                                f"onnx_sha256 tag; the store's artifacts were altered")
        os.replace(onnx_file, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _onnx_file_name(model_dir: Path) -> str:
    """The ONNX file that the logged model's MLmodel names (mlflow.onnx writes model.onnx)."""
    try:
        flavors = (yaml.safe_load((model_dir / "MLmodel").read_text()) or {}).get("flavors") or {}
        return str(flavors["onnx"]["data"])
    except (OSError, yaml.YAMLError, KeyError, TypeError):
        return ONNX_FILE
