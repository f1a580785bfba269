"""Where a run's files are: every path under a run folder (train.out_dir), named once.

`ddpm train` writes the checkpoint, loss.csv, config.yaml and the preview grids; the pipeline's stages
(flows/) add their records and results beside them; dvc.yaml names the same files under
`${train.out_dir}` (tests/test_layout.py checks that they agree). The folders that `ddpm evaluate` and
`ddpm sample`/`ddpm onnx-sample` write into can be anywhere (--out), so their files are named by
EvalFiles and SampleFiles, which RunLayout uses for its own `eval/` and `samples_onnx/`.

    run folder (train.out_dir)
      checkpoint.pt  loss.csv  config.yaml  samples_<step>.png  samples_final.png     ddpm train
      trajectory.png  resolved_params.yaml  dataset.json  feature_net.json            pipeline stages
      eval/{metrics.json, timings.json, samples.png, nearest.png}                     evaluation
      model.onnx  export.json  export_int8.json  samples_onnx/samples.png             export
      .stamps/<stage>.json  .mlflow-unended.json                                      pipeline records

This module imports nothing but the standard library.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


def _as_path(obj: object, field: str) -> None:
    """Store a str given for a path field of a frozen dataclass as a Path."""
    object.__setattr__(obj, field, Path(getattr(obj, field)))


@dataclass(frozen=True)
class EvalFiles:
    """The files of an evaluation folder (`ddpm evaluate --out`, by default <run>/eval): one set, whose
    metrics.json is written last (ddpm.evaluate). metrics.json holds what was measured of the samples, unchanged
    by a rerun with the same results; timings.json how long the sampling took, which differs every time."""

    folder: Path

    def __post_init__(self) -> None:
        _as_path(self, "folder")

    @property
    def metrics(self) -> Path:
        return self.folder / "metrics.json"

    @property
    def timings(self) -> Path:
        return self.folder / "timings.json"

    @property
    def samples(self) -> Path:
        return self.folder / "samples.png"

    @property
    def nearest(self) -> Path:
        return self.folder / "nearest.png"


@dataclass(frozen=True)
class SampleFiles:
    """The files of a sampling folder (`ddpm sample --out`, `ddpm onnx-sample --out`, <run>/samples_onnx):
    a PNG grid and the images as an array (images, labels)."""

    folder: Path

    def __post_init__(self) -> None:
        _as_path(self, "folder")

    @property
    def grid(self) -> Path:
        return self.folder / "samples.png"

    @property
    def array(self) -> Path:
        return self.folder / "samples.npz"


@dataclass(frozen=True)
class RunLayout:
    """Every path of the run in `out_dir` (train.out_dir); relative when out_dir is."""

    out_dir: Path

    def __post_init__(self) -> None:
        _as_path(self, "out_dir")

    # --- what `ddpm train` writes (moved aside by --overwrite with the checkpoint's products) --------
    @property
    def checkpoint(self) -> Path:
        return self.out_dir / "checkpoint.pt"

    @property
    def loss_csv(self) -> Path:
        return self.out_dir / "loss.csv"

    @property
    def config_yaml(self) -> Path:
        """The resolved settings of the training run, readable without loading the checkpoint."""
        return self.out_dir / "config.yaml"

    def preview(self, step: int) -> Path:
        """The sample grid saved at `step` during training (train.sample_every)."""
        return self.out_dir / f"samples_{step:07d}.png"

    @property
    def samples_final(self) -> Path:
        """The sample grid of the finished run."""
        return self.out_dir / "samples_final.png"

    def training_files(self) -> list[Path]:
        """The files of a training run that exist now: checkpoint, loss.csv, config.yaml and every grid."""
        fixed = [p for p in (self.checkpoint, self.loss_csv, self.config_yaml) if p.exists()]
        return fixed + sorted(self.out_dir.glob("samples_*.png"))

    def checkpoint_products(self) -> list[Path]:
        """What exists now that later commands and stages made from the checkpoint: the trajectory grid, the
        evaluation, the exports (model.onnx, its fp16 and int8 twins, their external weights) and their records,
        the AOT package, the distilled students. Not the pipeline's records of settings, data and feature net,
        nor the compile cache: they stay valid for any checkpoint."""
        onnx = sorted({*self.out_dir.glob(f"{self.onnx_model.name}*"), *self.out_dir.glob("model.*.onnx*")})
        made = [self.trajectory, self.eval.folder, *onnx, self.export_report, self.export_int8_report,
                self.onnx_samples.folder, self.aot_package, self.aot_report, self.distill_dir, self.distill_record]
        return [p for p in made if p.exists() or p.is_symlink()]

    # --- what the pipeline's stages add ------------------------------------------------------------
    @property
    def trajectory(self) -> Path:
        return self.out_dir / "trajectory.png"

    @property
    def resolved_params(self) -> Path:
        """params.yaml with the active profile applied (dvc.yaml's settings stage)."""
        return self.out_dir / "resolved_params.yaml"

    @property
    def dataset_manifest(self) -> Path:
        return self.out_dir / "dataset.json"

    @property
    def feature_net_record(self) -> Path:
        return self.out_dir / "feature_net.json"

    @property
    def eval(self) -> EvalFiles:
        return EvalFiles(self.out_dir / "eval")

    @property
    def onnx_model(self) -> Path:
        return self.out_dir / "model.onnx"

    @property
    def aot_package(self) -> Path:
        """The sampling network compiled ahead of time for one GPU (ddpm.aot_package; `--aot auto` looks here)."""
        return self.out_dir / "model.pt2"

    @property
    def aot_report(self) -> Path:
        """What the AOT package is (GPU, torch, parity), or why there is none."""
        return self.out_dir / "aot_package.json"

    # --- what `ddpm distill` and the distill stage write (ddpm.distill) ------------------------------
    @property
    def distill_dir(self) -> Path:
        return self.out_dir / "distill"

    def distill_round(self, steps: int) -> Path:
        """The run folder of the round whose student takes `steps` DDIM steps."""
        return self.distill_dir / f"steps_{steps}"

    @property
    def student(self) -> Path:
        """The last round's checkpoint: the distilled student."""
        return self.distill_dir / "student.pt"

    @property
    def student_onnx(self) -> Path:
        return self.distill_dir / "student.onnx"

    @property
    def student_export_report(self) -> Path:
        return self.distill_dir / "export.json"

    @property
    def student_onnx_samples(self) -> SampleFiles:
        return SampleFiles(self.distill_dir / "samples_onnx")

    @property
    def distill_record(self) -> Path:
        """What the distill stage did (or that it is off): dvc.yaml orders export after it."""
        return self.out_dir / "distill.json"

    @property
    def compile_cache(self) -> Path:
        """torch.compile's work for the training step, one file per key (ddpm.compile_cache); an --overwrite
        leaves it: it stays valid."""
        return self.out_dir / "compile_cache"

    @property
    def export_report(self) -> Path:
        return self.out_dir / "export.json"

    @property
    def export_int8_report(self) -> Path:
        return self.out_dir / "export_int8.json"

    @property
    def onnx_samples(self) -> SampleFiles:
        return SampleFiles(self.out_dir / "samples_onnx")

    # --- the pipeline's own records --------------------------------------------------------------------
    def stamp(self, stage: str) -> Path:
        """The record of the inputs and outputs of a stage's last run (flows.runtime.Stamp)."""
        return self.out_dir / ".stamps" / f"{stage}.json"

    @property
    def unended_runs(self) -> Path:
        """MLflow runs a pipeline run could not end (its tracking server was down), for the next run."""
        return self.out_dir / ".mlflow-unended.json"
