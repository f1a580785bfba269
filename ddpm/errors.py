"""Errors a user can act on. Each message says what was wrong and what to do.

This module imports nothing heavy, so the torch-free ONNX sampler and the CLI can use it.
`user_error` is the one place that decides which failures are expected (one line, exit status 2,
for the CLI and the flows alike) and which are bugs (a traceback).
"""

import errno


class DDPMError(RuntimeError):
    """Base class: the CLI prints these as one line and exits with status 2."""


class ConfigError(DDPMError, ValueError):
    """An invalid setting: the message names the key, the value and what is allowed."""


class DataError(DDPMError):
    """A dataset file that is missing, corrupt, or could not be fetched."""


class CheckpointError(DDPMError):
    """A checkpoint that cannot be used: missing, truncated, foreign or unsafe."""


class FeatureNetHashMismatch(CheckpointError):
    """A shipped FID feature net whose SHA-256 is not its pin (ddpm.feature_pins): refused, never retrained over."""


class RunFolderError(DDPMError):
    """A run folder that cannot be used as asked: not writable, holding a run that would be replaced
    without --overwrite, or a checkpoint whose settings --resume would change (ddpm.run_folder)."""


class RunFolderLocked(RunFolderError):
    """Another running process holds the folder's lock; the message names it (command, PID, host)."""


class ResourceError(DDPMError):
    """Settings that cannot fit the device's memory, refused before anything is allocated (ddpm.resources)."""


class TrainingDivergedError(DDPMError):
    """The loss became NaN or infinite; the message says whether a checkpoint of an earlier step exists."""


class TrainingInterrupted(DDPMError):
    """SIGINT or SIGTERM arrived; a checkpoint of the last finished step was saved.

    `what` says what happened (signal, step, checkpoint), `hint` how to continue; a caller that
    resumes another way swaps the hint (`with_hint`).
    """

    def __init__(self, what: str, hint: str = "rerun with --resume to continue"):
        super().__init__(f"{what}; {hint}")
        self.what, self.hint = what, hint

    def __reduce__(self):  # pickles (Prefect, multiprocessing) rebuild it from both parts
        return type(self), (self.what, self.hint)

    def with_hint(self, hint: str) -> "TrainingInterrupted":
        return type(self)(self.what, hint)


class OnnxModelError(DDPMError):
    """An ONNX model file that is missing, corrupt, or does not have the expected inputs."""


class ExportRejected(DDPMError):
    """An ONNX export whose samples did not match PyTorch's; the message gives the measured differences."""


# Limits of the machine rather than bugs: the file the OSError names is what to look at.
RESOURCE_ERRNOS = {
    errno.ENOSPC: "free some space on its disk",
    errno.EDQUOT: "free some space or raise the disk quota",
    errno.EFBIG: "the file size limit (ulimit -f) or the file system's maximum was reached; raise it or write "
                 "elsewhere",
    errno.EROFS: "the file system is read-only; write elsewhere",
    errno.EACCES: "check its permissions or write elsewhere",
    errno.EPERM: "check its permissions or write elsewhere",
}


def user_error(exc: BaseException) -> str | None:
    """The one-line message of an expected failure, or None for a bug (which keeps its traceback).

    Expected: every DDPMError; running out of memory (MemoryError, PyTorch's OutOfMemoryError and its
    CPU allocator's failure); an OSError of a full disk, a file-size limit, a read-only file system or
    missing permissions (RESOURCE_ERRNOS), which names the file.
    """
    if isinstance(exc, DDPMError):
        return str(exc)
    if isinstance(exc, MemoryError) or type(exc).__name__ == "OutOfMemoryError" or (
            isinstance(exc, RuntimeError) and "can't allocate memory" in str(exc)):
        detail = " ".join(str(exc).split()) or type(exc).__name__
        return (f"out of memory ({detail}); lower the batch size (train.batch_size, sample.batch_size or "
                f"evaluate.batch_size) or model.base_channels, or free memory")
    if isinstance(exc, OSError) and exc.errno in RESOURCE_ERRNOS:
        return f"{' '.join(str(exc).split())}; {RESOURCE_ERRNOS[exc.errno]}"  # str(exc) names the file, if any
    return None
