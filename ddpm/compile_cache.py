"""The compiled training step as a file: torch.compile's work saved once and loaded by the next run.

A fresh machine (an empty inductor and triton cache) spends most of a short `ddpm train` compiling.
PyTorch's portable cache (`torch.compiler.save_cache_artifacts` / `load_cache_artifacts`) turns
that work into bytes; this module keeps them in `<train.out_dir>/compile_cache/<key>.bin`, one
file per key. The key holds everything that makes the bytes valid: the torch and triton versions,
the GPU model (the thread count on the CPU), the model settings, the image shape, the batch size, the
number of processes and the compile options (bf16, channels-last, CUDA graphs, inductor's options, whether
Dynamo's trace is in it: see caching_dynamo_work). A run loads the file of its key before the first step and
writes it once, at its first checkpoint, when it compiled anew.

A file is a header line, a JSON line (the key, its digest, the payload's SHA-256 and size) and the
payload. A missing file, another key's file or a corrupt one (wrong header, wrong checksum, bytes
torch cannot read) means compiling as usual, with one log line that says why. What happened is
returned as a record for the run's tracking: {"status" (loaded, missing, mismatch: only other keys' files,
or corrupt), "key", "file", "reason"[, "saved"]}.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import platform
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterator

import torch

from ddpm.config import Config, image_shape
from ddpm.fileio import atomic_write_bytes

log = logging.getLogger(__name__)

MAGIC = b"ddpm-compile-cache 1\n"
SUFFIX = ".bin"


@dataclass(frozen=True)
class CacheKey:
    """What a compiled training step depends on; `digest` names its file."""

    torch: str
    triton: str | None
    device: str  # the GPU's name; on the CPU "cpu (N threads)"
    model: dict[str, Any]
    image_shape: tuple[int, ...]
    batch_size: int
    world_size: int
    options: dict[str, Any]  # bf16, channels_last, cuda_graphs and torch.compile's inductor options

    def to_dict(self) -> dict[str, Any]:
        return json.loads(json.dumps(asdict(self), sort_keys=True))  # tuples as lists: as read back from a file

    @property
    def digest(self) -> str:
        return hashlib.sha256(json.dumps(self.to_dict(), sort_keys=True).encode()).hexdigest()[:20]


def device_name(device: torch.device) -> str:
    """The GPU's model; on the CPU, with the thread count that inductor's CPU kernels are generated for."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{device.type} ({torch.get_num_threads()} threads)"


def triton_version() -> str | None:
    try:
        import triton
    except ImportError:
        return None
    return str(triton.__version__)


def cache_key(model: dict[str, Any], image_shape: tuple[int, ...], batch_size: int, world_size: int,
              device: torch.device, options: dict[str, Any]) -> CacheKey:
    """The key of a training step compiled here (this torch, triton and GPU) for these settings."""
    return CacheKey(torch.__version__, triton_version(), device_name(device), dict(model), tuple(image_shape),
                    int(batch_size), int(world_size), dict(options))


class CompileCache:
    """The cache file of one key in `folder`: `load()` before the first compile, `save()` after it (once)."""

    def __init__(self, folder: Path, key: CacheKey):
        self.folder, self.key = Path(folder), key
        self.path = self.folder / f"{key.digest}{SUFFIX}"
        self.record: dict[str, Any] = {"status": "not loaded", "key": key.digest, "file": None, "reason": ""}
        self._save_tried = False

    def load(self) -> dict[str, Any]:
        """Fill torch's compile caches from the file of this key, if it is there and sound; returns the record."""
        reason = self._load()
        if reason is None:
            self.record.update(status="loaded", file=str(self.path), reason="")
            log.info("compile cache: loaded %s; the training step compiles from it", self.path)
        else:
            status, why = reason
            self.record.update(status=status, reason=why)
            (log.info if status == "missing" else log.warning)("compile cache: %s; compiling", why)
        return self.record

    def loaded(self) -> "CompileCache":
        self.load()
        return self

    def _load(self) -> tuple[str, str] | None:
        if not self.path.is_file():
            return self._why_missing()
        try:
            header, payload = read_cache_file(self.path)
        except (OSError, ValueError) as exc:
            return "corrupt", f"{self.path} is unusable ({exc})"
        if header["key"] != self.key.to_dict():
            fields = ", ".join(differing_fields(header["key"], self.key.to_dict()))
            return "mismatch", f"{self.path} was saved for another key (differs in {fields})"
        if not _load_artifacts(payload):
            return "corrupt", f"{self.path} passed its checksum but torch could not read it (torch {torch.__version__})"
        return None

    def _why_missing(self) -> tuple[str, str]:
        """("mismatch", naming what differs) when the folder holds another key's file, else ("missing", ...)."""
        here = self.key.to_dict()
        for other in sorted(self.folder.glob(f"*{SUFFIX}")) if self.folder.is_dir() else []:
            try:
                theirs = read_cache_file(other)[0]["key"]
            except (OSError, ValueError):
                continue
            fields = differing_fields(theirs, here)
            shown = "; ".join(f"{f}: {_short(theirs.get(f))} there, {_short(here.get(f))} here" for f in fields)
            return "mismatch", (f"no artifact for key {self.key.digest} in {self.folder} ({other.name} differs in "
                                f"{shown})")
        return "missing", f"no artifact for key {self.key.digest} in {self.folder}"

    def save(self) -> dict[str, Any]:
        """Write what this process compiled to the file of its key, once, unless it was loaded from there; the
        first call also records (and logs) how torch's caches served the compile: lookup_counts()."""
        if "lookups" not in self.record:
            self.record["lookups"] = lookup_counts()
            log.info("compile cache lookups: %s", ", ".join(f"{k} {v}" for k, v in self.record["lookups"].items()))
        if self.record["status"] == "loaded" or self._save_tried:
            return self.record
        self._save_tried = True  # once: a failed or empty save is not tried again at every checkpoint
        try:
            saved = torch.compiler.save_cache_artifacts()
        except Exception as exc:  # noqa: BLE001 - a cache torch cannot write must not stop training
            self.record["reason"] = f"torch could not save its compile artifacts ({type(exc).__name__}: {exc})"
            log.warning("compile cache: %s; the next run compiles again", self.record["reason"])
            return self.record
        if saved is None or not saved[0]:
            log.info("compile cache: torch returned no artifacts to save")
            return self.record
        write_cache_file(self.path, self.key, saved[0])
        self.record["saved"] = str(self.path)
        log.info("compile cache: saved %s (%d bytes) for the next run of key %s", self.path, len(saved[0]),
                 self.key.digest)
        return self.record


DYNAMO_CACHE_MIN_TORCH = (2, 14)  # 2.11: bench/results/compile_once_h100_dynamo_trace.json (the warm run)


def dynamo_cache_available(world_size: int, version: str | None = None) -> bool:
    """Whether Dynamo's own work can go into the cache file too (train.cache_dynamo_trace): torch (`version`,
    default this one's) is at least DYNAMO_CACHE_MIN_TORCH, whose loaded trace the tests run, it has
    `caching_precompile`, and the step runs in one process (not tried with DistributedDataParallel's split
    graphs). On torch 2.11 a warm CUDA run that loaded such a file crashed when Dynamo traced the step again
    (an AssertionError on `__builtins_dict__`), so older versions never record it."""
    release = tuple(int(n) for n in (version or torch.__version__).split(".")[:2])  # 2.14.0a0+git...: (2, 14)
    return world_size == 1 and release >= DYNAMO_CACHE_MIN_TORCH and hasattr(torch._dynamo.config,
                                                                             "caching_precompile")


@contextlib.contextmanager
def caching_dynamo_work(enabled: bool) -> Iterator[None]:
    """While open, torch.compile also records Dynamo's trace of what it compiles (the transformed bytecode and
    its guards: torch._dynamo.config.caching_precompile), which `save_cache_artifacts` then carries; a run that
    loaded such a file skips tracing the training step. Open around torch.compile, the first call and the save.

    Guards on object identity (the functions and modules the step calls) are dropped while it is open, from the
    saved entry and from this process's own guards (so replacing such a function after the compile does not
    recompile); torch logs one line per dropped guard, kept out of the log here. The key fixes the model settings,
    compile options and Python/CUDA versions; torch rejects an entry whose traced source lines changed and then
    traces again (a warning with its traceback; the lookups' `dynamo_traced` counts it). Torch keys entries by
    function name and first line, so only the training step should compile while it is open."""
    if not enabled:
        yield
        return
    guards_log = logging.getLogger("torch._dynamo.guards")
    quiet = _DroppedGuardFilter()
    guards_log.addFilter(quiet)
    try:
        with torch._dynamo.config.patch(caching_precompile=True):
            yield
    finally:
        guards_log.removeFilter(quiet)


class _DroppedGuardFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "is dropped with caching_precompile" not in str(record.msg)


def dynamo_work_cached() -> bool:
    """Whether torch.compile records Dynamo's work here and now (caching_dynamo_work, or TORCH_CACHING_PRECOMPILE)."""
    return bool(getattr(torch._dynamo.config, "caching_precompile", False))


def dynamo_key() -> dict[str, Any]:
    """What a file holding Dynamo's work adds to its key: torch accepts Dynamo's entry only under the same Python
    and CUDA versions. Empty when Dynamo's work is not recorded, so that such files keep their earlier names."""
    if not dynamo_work_cached():
        return {}
    return {"dynamo": True, "python": platform.python_version(), "cuda": torch.version.cuda}


def lookup_counts() -> dict[str, int]:
    """This process's lookups in torch's compile caches so far: inductor's FX graph cache and AOTAutograd's
    (hit, miss, bypass each), and Dynamo's (hit, miss, error) where it is on (torch._dynamo.config.
    caching_precompile). A loaded file serves a compile fully when every lookup hits; a bypass means torch
    kept that graph out of the cache and compiles it every time."""
    from torch._dynamo.utils import counters

    counts = {f"{name}_{outcome}": int(counters[group][f"{key}_{outcome}"])
              for name, group, key in (("fx_graph", "inductor", "fxgraph_cache"),
                                       ("aot_autograd", "aot_autograd", "autograd_cache"))
              for outcome in ("hit", "miss", "bypass")}
    if dynamo_work_cached():  # and the frames Dynamo traced here: 0 when a loaded entry served them all
        counts.update({f"dynamo_{outcome}": int(counters["dynamo_cache"][f"dynamo_cache_{outcome}"])
                       for outcome in ("hit", "miss", "error")}, dynamo_traced=int(counters["frames"]["ok"]))
    return counts


def differing_fields(a: dict[str, Any], b: dict[str, Any]) -> list[str]:
    return sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))


def _short(value: Any) -> str:
    text = json.dumps(value, sort_keys=True)
    return text if len(text) <= 60 else text[:57] + "..."


def write_cache_file(path: Path, key: CacheKey, payload: bytes) -> Path:
    """The header, the key line and `payload`, written atomically (a crash leaves the previous file)."""
    meta = {"key": key.to_dict(), "digest": key.digest, "sha256": hashlib.sha256(payload).hexdigest(),
            "bytes": len(payload)}
    atomic_write_bytes(path, MAGIC + json.dumps(meta, sort_keys=True).encode() + b"\n" + payload)
    return path


def read_cache_file(path: Path) -> tuple[dict[str, Any], bytes]:
    """(the header, the payload) of a cache file; ValueError naming what is wrong with it."""
    data = Path(path).read_bytes()
    if not data.startswith(MAGIC):
        raise ValueError("not a ddpm compile-cache file")
    line, sep, payload = data[len(MAGIC):].partition(b"\n")
    try:
        meta = json.loads(line) if sep else None
    except (json.JSONDecodeError, UnicodeDecodeError):
        meta = None
    if not isinstance(meta, dict) or not isinstance(meta.get("key"), dict):
        raise ValueError("its header line is not the JSON of a key")
    if len(payload) != meta.get("bytes") or hashlib.sha256(payload).hexdigest() != meta.get("sha256"):
        raise ValueError(f"its payload ({len(payload)} bytes) does not match its checksum: truncated or altered")
    return meta, payload


def _load_artifacts(payload: bytes) -> bool:
    """torch.compiler.load_cache_artifacts, quietly: False when torch cannot read the bytes."""
    quiet = logging.getLogger("torch.compiler._cache")
    level = quiet.level
    quiet.setLevel(logging.CRITICAL)  # torch logs its own traceback for bytes it cannot read; ours is one line
    try:
        return torch.compiler.load_cache_artifacts(payload) is not None
    except Exception:  # noqa: BLE001 - any failure to read the artifacts means compiling as usual
        return False
    finally:
        quiet.setLevel(level)


def training_cache_key(cfg: Config, world_size: int, device: torch.device, graphed: bool,
                       options: dict[str, Any]) -> CacheKey:
    """The key of `ddpm train`'s compiled step: `options` are torch.compile's, `graphed` whether it is captured,
    and whether Dynamo's work is recorded as well (caching_dynamo_work, open when the key is made)."""
    tc = cfg.train
    return cache_key(cfg.to_dict()["model"], image_shape(cfg), tc.batch_size, world_size, device,
                     {"bf16": cfg.runtime.bf16, "channels_last": tc.channels_last, "cuda_graphs": graphed,
                      "inductor": options, **dynamo_key()})
