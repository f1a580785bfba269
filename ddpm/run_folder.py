"""A run folder and its files: one owner at a time, no run replaced by accident, loss.csv safe under a crash.

Ownership. `owned(folder, command)` holds `<folder>/.ddpm.lock` for `ddpm train` (train.out_dir),
`ddpm evaluate` (its --out folder) and `ddpm export` (the folder of its --out file). The lock is an
flock on that file, which the kernel drops when its holder dies; the file names the holder (command,
PID, host, start time) for the one-line error that a second process gets at once (RunFolderLocked).
A lock file that nobody holds was left by a killed process: it is taken over with a warning.

Replacing a run. A folder with a checkpoint is continued with --resume, whose settings may not change
the model, the diffusion or the data (`resume_changes`), or started over with --overwrite, which moves
the previous run's files (RunLayout.training_files) and what was made from its checkpoint (its evaluation,
exports, students: RunLayout.checkpoint_products) to the sibling folder `<folder>.replaced-<UTC time>/`
(`set_aside`), so that no old model.onnx or metrics.json stands beside the new checkpoint. `RunFiles` writes
nothing until the first training step has finished, so a run that fails at start-up leaves the folder as it was.

Files. config.yaml is written atomically (ddpm.fileio) and loss.csv is rewritten atomically when it
is opened, then appended to one fsynced row at a time, never through a symbolic link.
This module imports no torch.
"""

from __future__ import annotations

import csv
import datetime
import errno
import fcntl
import io
import json
import logging
import os
import shutil
import socket
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Sequence

from ddpm.errors import RunFolderError, RunFolderLocked
from ddpm.fileio import atomic_write_bytes, fsync_dir
from ddpm.layout import RunLayout

log = logging.getLogger(__name__)

LOCK_NAME = ".ddpm.lock"  # in any folder a command holds, not only run folders
# Settings a resumed run must share with its checkpoint: they decide what the weights mean.
FIXED_SECTIONS = ("data", "diffusion", "model")
FREE_KEYS = frozenset({"data.root"})  # where the dataset's files are, not which files


# --- the lock ------------------------------------------------------------------------------------

@contextmanager
def owned(folder: str | Path, command: str) -> Iterator[Path]:
    """Hold `folder` (created if missing) for this process; raises RunFolderLocked naming the holder."""
    folder = Path(folder)
    fd = _acquire(folder, command)
    try:
        yield folder
    finally:
        path = folder / LOCK_NAME
        try:
            if _is_current(fd, path):  # removed while still held, so no one locks a file about to vanish
                path.unlink()
        finally:
            os.close(fd)


def _acquire(folder: Path, command: str) -> int:
    path = folder / LOCK_NAME
    while True:
        fd = _open_lock(folder, path)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            holder = _holder(fd)
            no_flock = exc.errno in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS)
            if not no_flock or _running(holder):  # without flock, the PID in the file decides
                os.close(fd)
                raise RunFolderLocked(f"{folder} is in use by {_describe(holder)}; wait for it to finish, "
                                      f"or use another folder") from None
        if _is_current(fd, path):
            break
        os.close(fd)  # its holder removed the file while we waited for the lock: lock the new one
    stale = _holder(fd)
    if stale:
        log.warning("%s: took over a stale lock of %s, which %s", folder, _describe(stale),
                    "is no longer running" if not _running(stale) else "no longer holds it")
    me = {"command": command, "pid": os.getpid(), "host": socket.gethostname(),
          "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
    os.ftruncate(fd, 0)
    os.pwrite(fd, (json.dumps(me) + "\n").encode(), 0)
    os.fsync(fd)
    return fd


def check_writable(folder: str | Path) -> Path:
    """Prove, before any work is done for it, that `folder` (or, while it is missing, its nearest existing parent,
    where it would be created) takes a new file; creates nothing."""
    folder = Path(folder)
    existing = folder.absolute()
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise RunFolderError(f"{existing} exists and is not a folder; choose another output folder")
    try:
        fd, probe = tempfile.mkstemp(dir=existing, prefix=".ddpm-write-check-")
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise RunFolderError(f"cannot write into {folder} ({exc.strerror or exc}); choose a writable output "
                             f"folder") from None
    return folder


def _open_lock(folder: Path, path: Path) -> int:
    if folder.exists() and not folder.is_dir():
        raise RunFolderError(f"{folder} exists and is not a folder; choose another output folder")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        return os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
    except OSError as exc:
        raise RunFolderError(f"cannot write into {folder} ({exc.strerror or exc}); choose a writable output "
                             f"folder") from None


def _holder(fd: int) -> dict[str, Any]:
    try:
        holder = json.loads(os.pread(fd, 4096, 0) or b"{}")
    except ValueError:
        return {"command": "an unknown process (unreadable lock file)"}
    return holder if isinstance(holder, dict) else {}


def _describe(holder: dict[str, Any]) -> str:
    if "pid" not in holder:
        return holder.get("command", "another process")
    return (f"{holder.get('command', 'a process')} (pid {holder['pid']} on host {holder.get('host', '?')}, "
            f"since {holder.get('started', '?')})")


def _running(holder: dict[str, Any]) -> bool:
    """Whether the holder's process may still run: its PID exists on this host, or it ran on another host."""
    if holder.get("host") != socket.gethostname():
        return bool(holder)
    try:
        os.kill(int(holder["pid"]), 0)
    except ProcessLookupError:
        return False
    except (PermissionError, KeyError, ValueError, TypeError, OverflowError):
        return isinstance(holder.get("pid"), int)
    return True


def _is_current(fd: int, path: Path) -> bool:
    try:
        return os.path.samestat(os.fstat(fd), os.stat(path, follow_symlinks=False))
    except FileNotFoundError:
        return False


# --- replacing a run ------------------------------------------------------------------------------

def setting_changes(saved: dict[str, Any], wanted: dict[str, Any]) -> list[tuple[str, Any, Any]]:
    """(section.key, saved value, wanted value) for each setting of `wanted` (Config.to_dict()) that differs."""
    return [(f"{section}.{key}", saved.get(section, {}).get(key), value)
            for section, values in wanted.items() for key, value in values.items()
            if saved.get(section, {}).get(key) != value]


def resume_changes(saved: dict[str, Any], wanted: dict[str, Any], step: int, folder: Path) -> list[str]:
    """The settings a resumed run changes from its checkpoint's ("key: old -> new"), all of them allowed.

    Raises RunFolderError naming every setting that would change the model, the diffusion or the data,
    and when train.steps is below the checkpoint's step.
    """
    changes = setting_changes(saved, wanted)
    fixed = [c for c in changes if c[0].split(".")[0] in FIXED_SECTIONS and c[0] not in FREE_KEYS]
    if fixed:
        raise RunFolderError(
            f"cannot resume {folder}: {_show(fixed)} would change the model, the diffusion or the data of its "
            f"checkpoint; use the checkpoint's values, another train.out_dir, or --overwrite to start over")
    if wanted["train"]["steps"] < step:
        raise RunFolderError(f"cannot resume {folder}: train.steps={wanted['train']['steps']} is below its "
                             f"checkpoint's step {step}; ask for at least {step} steps")
    return [_show([c]) for c in changes]


def _show(changes: list[tuple[str, Any, Any]]) -> str:
    return ", ".join(f"{key} {old!r} -> {new!r}" for key, old, new in changes)


def set_aside(folder: Path) -> Path:
    """Move the run's files (RunLayout.training_files, checkpoint_products) to a new sibling
    `<folder>.replaced-<UTC time>/`; returns it. RunFolderLocked, before anything moves, while another command
    holds a folder among them (an evaluation writing into eval/)."""
    run = RunLayout(folder)
    moving = run.training_files() + run.checkpoint_products()
    for lock in [lock for path in moving if path.is_dir() for lock in path.rglob(LOCK_NAME)]:
        with owned(lock.parent, "ddpm train --overwrite"):
            pass
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    for n in range(1, 1000):
        dest = folder.with_name(f"{folder.name}.replaced-{stamp}" + (f"-{n}" if n > 1 else ""))
        try:
            dest.mkdir()
            break
        except FileExistsError:
            continue
    for path in moving:
        shutil.move(path, dest / path.name)  # a rename on one file system
    fsync_dir(folder)
    fsync_dir(dest)
    return dest


class RunFiles:
    """A training run's config.yaml and loss.csv (in the run folder of `layout`), created at the first write
    (`start`).

    Until `start` the folder is as it was, so settings that fail at start-up (an allocation, a device)
    cost nothing. `start` moves the previous run aside when asked (set_aside), writes config.yaml,
    and opens loss.csv keeping its rows up to `resume_step`.
    """

    def __init__(self, layout: RunLayout, config_yaml: bytes, fields: Sequence[str], resume_step: int,
                 replace: bool):
        self.layout, self.config_yaml, self.fields = layout, config_yaml, tuple(fields)
        self.resume_step, self.replace = resume_step, replace
        self.loss_log: LossLog | None = None

    def start(self) -> "LossLog":
        if self.loss_log is None:
            if self.replace:
                folder = self.layout.out_dir
                log.warning("%s held a run; --overwrite moved its files to %s", folder, set_aside(folder))
            for path in (self.layout.config_yaml, self.layout.loss_csv):
                if path.is_symlink():
                    log.warning("%s was a symbolic link to %s, which is left as it was; a file replaces the link",
                                path, os.readlink(path))
            atomic_write_bytes(self.layout.config_yaml, self.config_yaml)
            self.loss_log = LossLog(self.layout.loss_csv, self.fields, self.resume_step)
        return self.loss_log

    def close(self) -> None:
        if self.loss_log is not None:
            self.loss_log.close()


class LossLog:
    """loss.csv, appended one row per write and fsynced, so a crash loses at most the row being written.

    Opening it rewrites the file atomically with its complete rows up to step `keep_until` (rows a
    killed run wrote past its last checkpoint, and a torn last line, are dropped).
    """

    def __init__(self, path: Path, fields: Sequence[str], keep_until: int):
        self.fields = tuple(fields)
        header = ",".join(self.fields) + "\r\n"
        atomic_write_bytes(path, (header + "".join(self._kept_rows(path, keep_until))).encode())
        self._fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_NOFOLLOW | os.O_CLOEXEC)

    def _kept_rows(self, path: Path, keep_until: int) -> list[str]:
        if keep_until <= 0 or path.is_symlink() or not path.is_file():
            return []
        lines = path.read_bytes().decode(errors="replace").splitlines(keepends=True)  # as written: \r\n kept
        if not lines or next(csv.reader(lines[:1]), []) != list(self.fields):
            return []
        kept = []
        for line in lines[1:]:
            values = next(csv.reader([line]), [])
            if not line.endswith("\n") or len(values) != len(self.fields) or not _numbers(values):
                continue
            if int(float(values[0])) <= keep_until:
                kept.append(line)
        return kept

    def write(self, row: dict[str, Any]) -> None:
        buf = io.StringIO()
        csv.DictWriter(buf, fieldnames=self.fields).writerow(row)
        os.write(self._fd, buf.getvalue().encode())
        os.fsync(self._fd)

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


def _numbers(values: list[str]) -> bool:
    try:
        [float(v) for v in values]
    except ValueError:
        return False
    return True
