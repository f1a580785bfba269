"""Errors a user can act on. Each message says what was wrong and what to do.

This module imports nothing heavy, so the torch-free ONNX sampler and the CLI can use it.
"""


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


class TrainingDivergedError(DDPMError):
    """The loss became NaN or infinite; the last good checkpoint was kept."""


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
