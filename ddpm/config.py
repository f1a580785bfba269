"""Typed, frozen configuration, read once from `params.yaml` plus overrides.

`params.yaml` is keyed by stage (data, diffusion, model, train, sample, evaluate, export, distill) as DVC
expects, plus two blocks that several stages read: `sampler` (how images are drawn, for `ddpm sample`,
evaluation, the export check and int8 calibration) and `runtime` (device and precision, for every
stage). Settings that moved to them are refused with their new home (ddpm.config_moves).
A profile (`profiles.<name>` in the same file) overlays the base values; command-line overrides
(`train.steps=200`) come last. Every value is checked against the dataclass field's type and range
here, so that the rest of the code can trust its config.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from ddpm.config_moves import refuse_moved
from ddpm.config_values import build_section, deep_merge, parse_override
from ddpm.errors import ConfigError  # re-exported


# Each field may carry `metadata={"check": (predicate, "what is allowed")}`.
def _f(default: Any, check: typing.Callable[[Any], bool] | None = None, allowed: str = "", **kw: Any) -> Any:
    meta = {"check": (check, allowed)} if check else {}
    if isinstance(default, (list, tuple)):
        return field(default_factory=lambda: tuple(default), metadata=meta, **kw)
    return field(default=default, metadata=meta, **kw)


def _positive(v: Any) -> bool:
    return v > 0


def _non_negative(v: Any) -> bool:
    return v >= 0


def _unit_open(v: Any) -> bool:
    return 0 < v < 1


def _unit_closed(v: Any) -> bool:
    return 0 <= v <= 1


MAX_SEED = 2**32 - 1  # the generators get seed + offsets per rank and step, which must stay below 2**63
MAX_TIMESTEPS = 100_000  # every schedule array is [T] float64: T bounds what a config can make the samplers allocate


def _seed(v: Any) -> bool:
    return 0 <= v <= MAX_SEED


SEED_ALLOWED = f"an integer in [0, {MAX_SEED}]"


@dataclass(frozen=True)
class DataConfig:
    dataset: Literal["mnist", "fashion_mnist", "cifar10"] = "mnist"
    root: str = "data"


@dataclass(frozen=True)
class DiffusionConfig:
    """The forward process. Timesteps are indexed t in [0, T-1] everywhere (index 0 is the paper's t=1)."""

    timesteps: int = _f(1000, lambda v: 0 < v <= MAX_TIMESTEPS, f"an integer in [1, {MAX_TIMESTEPS}]")
    schedule: Literal["linear", "cosine"] = "linear"
    beta_start: float = _f(1e-4, _unit_open, "a float in (0, 1)")
    beta_end: float = _f(0.02, _unit_open, "a float in (0, 1)")
    cosine_s: float = _f(0.008, _non_negative, "a float >= 0")
    prediction: Literal["eps", "v", "x0"] = "eps"
    loss_weighting: Literal["none", "min_snr"] = "none"
    min_snr_gamma: float = _f(5.0, _positive, "a float > 0")
    # 0: a trained model, sampled with any step count. N: a student of ddpm.distill, which samples with N
    # deterministic DDIM steps on the trailing grid (schedule_math.trailing_timesteps) and no other count.
    distilled_steps: int = _f(0, _non_negative, "an integer >= 0 (0: not distilled)")


@dataclass(frozen=True)
class ModelConfig:
    """The U-Net. Level i works at resolution H / 2**i; `attention_levels` index those levels."""

    base_channels: int = _f(64, _positive, "an integer > 0")
    channel_mult: tuple[int, ...] = _f((1, 2, 2), lambda v: len(v) > 0 and all(m > 0 for m in v),
                                       "a non-empty list of integers > 0")
    num_res_blocks: int = _f(2, _positive, "an integer > 0")
    attention_levels: tuple[int, ...] = _f((2,), lambda v: all(a >= 0 for a in v), "a list of level indices >= 0")
    num_heads: int = _f(4, _positive, "an integer > 0")
    dropout: float = _f(0.1, lambda v: 0 <= v < 1, "a float in [0, 1)")
    norm_groups: int = _f(32, _positive, "an integer > 0")
    class_conditional: bool = False


@dataclass(frozen=True)
class TrainConfig:
    steps: int = _f(20000, _positive, "an integer > 0")
    batch_size: int = _f(128, _positive, "an integer > 0")
    lr: float = _f(2e-4, _positive, "a float > 0")
    weight_decay: float = _f(0.0, _non_negative, "a float >= 0")
    warmup_steps: int = _f(500, _non_negative, "an integer >= 0")
    lr_decay: Literal["none", "cosine"] = "none"  # cosine: from lr after warm-up down to 0 at train.steps
    grad_clip: float = _f(1.0, _non_negative, "a float >= 0 (0 turns clipping off)")
    ema_decay: float = _f(0.9999, _unit_closed, "a float in [0, 1]")
    ema_warmup: bool = True
    label_dropout: float = _f(0.1, _unit_closed, "a float in [0, 1]")
    seed: int = _f(0, _seed, SEED_ALLOWED)
    nproc: int = _f(1, _positive, "an integer > 0 (processes on this node; > 1 launches torchrun)")
    compile: bool = False
    cache_dynamo_trace: bool = False  # with compile, one process: the compile cache holds Dynamo's trace too
    cuda_graphs: bool = False  # capture the whole step (forward, backward, clip, AdamW, EMA) as one CUDA graph
    channels_last: bool = False
    log_every: int = _f(50, _positive, "an integer > 0")
    sample_every: int = _f(5000, _non_negative, "an integer >= 0 (0: only at the end)")
    checkpoint_every: int = _f(1000, _positive, "an integer > 0")
    out_dir: str = "runs/default"


@dataclass(frozen=True)
class SamplerConfig:
    """How images are drawn: by `ddpm sample`, evaluation, the export check and int8 calibration.

    `steps` and `eta` are DDIM's; `variance` is DDPM's. The export check and int8 calibration always
    run DDIM (ddpm.export_check) with these steps, eta, clip_denoised and guidance_scale.
    """

    name: Literal["ddim", "ddpm"] = "ddim"
    steps: int = _f(50, _positive, "an integer > 0")
    eta: float = _f(0.0, _non_negative, "a float >= 0")
    variance: Literal["beta_tilde", "beta"] = "beta_tilde"
    clip_denoised: bool = True
    guidance_scale: float = _f(1.0, _non_negative, "a float >= 0")


@dataclass(frozen=True)
class RuntimeConfig:
    """Where and in what precision every stage runs: training, sampling, evaluation and the export check.

    `bf16`: autocast to bfloat16 on CUDA (training and sampling); ignored on the CPU.
    """

    device: Literal["auto", "cpu", "cuda"] = "auto"
    bf16: bool = True


@dataclass(frozen=True)
class SampleConfig:
    """What `ddpm sample` and the preview grids draw; how they draw it is `sampler`."""

    num_images: int = _f(64, _positive, "an integer > 0")
    batch_size: int = _f(256, _positive, "an integer > 0")
    label: int | None = None
    seed: int = _f(0, _seed, SEED_ALLOWED)
    compile: bool = False  # CUDA: torch.compile the network for sampling (ddpm.generate.sampling_network)


@dataclass(frozen=True)
class EvaluateConfig:
    """Scoring samples (ddpm.evaluate), drawn as `sampler` says. `seed` seeds the samples' noise.

    `feature_*` train an FID feature net that does not ship (ddpm.features.train_feature_net), from
    `feature_seed`: asked for with pipeline.feature_net=retrain, a missing path, or a dataset without a
    pinned net (ddpm.feature_pins).
    """

    num_samples: int = _f(10000, _positive, "an integer > 0")
    batch_size: int = _f(500, _positive, "an integer > 0")
    backend: Literal["torch", "onnx"] = "torch"
    nearest_k: int = _f(3, _positive, "an integer > 0 (k of the k-NN radii in precision/recall)")
    memorisation_quantile: float = _f(0.01, _unit_open, "a float in (0, 1) (quantile of test-to-train distances)")
    seed: int = _f(0, _seed, SEED_ALLOWED)
    feature_seed: int = _f(0, _seed, SEED_ALLOWED)
    feature_epochs: int = _f(3, _positive, "an integer > 0")
    feature_batch_size: int = _f(128, _positive, "an integer > 0")
    feature_lr: float = _f(2e-3, _positive, "a float > 0")


@dataclass(frozen=True)
class ExportConfig:
    opset: int = _f(18, lambda v: 17 <= v <= 23, "an integer in [17, 23]")
    fp16: bool = False
    parity_atol: float = _f(1e-4, _positive, "a float > 0")
    fp16_atol: float = _f(0.05, _positive, "a float > 0 (float16 model vs PyTorch float32, network output)")
    int8: bool = False
    int8_scheme: Literal["portable", "vnni"] = "portable"
    int8_calibration_images: int = _f(32, _positive, "an integer > 0")
    int8_mean_atol: float = _f(0.02, _positive, "a float > 0 (mean pixel difference in [-1, 1])")
    int8_fid_margin: float = _f(0.15, _non_negative, "a float >= 0 (relative)")
    aot: bool = True  # on CUDA, also write <name>.pt2: the sampling network compiled for this GPU (ddpm.aot_package)
    aot_mean_atol: float = _f(0.02, _positive, "a float > 0 (mean pixel difference in [-1, 1])")
    check_samples: int = _f(256, _positive, "an integer > 0")
    check_atol: float = _f(0.02, _positive, "a float > 0 (max pixel difference in [-1, 1])")
    fid_margin: float = _f(0.05, _non_negative, "a float >= 0 (relative)")
    fid_abs_floor: float = _f(0.5, _non_negative, "a float >= 0 (absolute, added to fid_margin * FID)")
    model_name: str = "ddpm-unet"


@dataclass(frozen=True)
class DistillConfig:
    """Progressive distillation (ddpm.distill) of the checkpoint's EMA network at `teacher_steps` DDIM steps into
    students of 1 / `round_factor` as many steps (2: the paper's halving), round after round, down to `steps`;
    the first round `first_round_steps` steps (it also turns the teacher's eps or x0 network into a v-predicting
    one), each later round `round_steps`, all at `lr` (cosine-decayed), the other training settings train's.
    `enabled` turns the pipeline's distill stage on."""

    enabled: bool = False
    steps: int = _f(4, _positive, "an integer > 0 (the final student's DDIM steps)")
    teacher_steps: int = _f(32, lambda v: v >= 2, "an integer >= 2 (steps times a power of round_factor)")
    round_factor: int = _f(2, lambda v: v >= 2, "an integer >= 2 (teacher steps per student step in each round)")
    first_round_steps: int = _f(1500, _positive, "an integer > 0")
    round_steps: int = _f(500, _positive, "an integer > 0")
    lr: float = _f(2e-4, _positive, "a float > 0")
    ema_decay: float = _f(0.999, _unit_closed, "a float in [0, 1]")
    compile: bool = False  # torch.compile student and teacher; each round compiles anew, which short rounds repay badly


@dataclass(frozen=True)
class PipelineConfig:
    """Tracking and orchestration (flows/): read by the Prefect flows, never by the ddpm functions.

    `tracking_uri` "" means $MLFLOW_TRACKING_URI if set, else sqlite:///<project>/mlflow/mlflow.db.
    `feature_net`: pinned (the shipped net, checked against its SHA-256), retrain (runs/features/<dataset>.pt,
    trained here) or a path, which may contain "{dataset}" (ddpm.feature_pins); relative paths are relative
    to the project root.
    """

    experiment: str = _f("ddpm", lambda v: bool(v.strip()), "a non-empty string")
    tracking_uri: str = ""
    registered_model: str = _f("ddpm-unet", lambda v: bool(v.strip()), "a non-empty string")
    model_alias: str = _f("challenger", lambda v: bool(v.strip()) and not (v[0] == "v" and v[1:].isdigit()),
                          "a non-empty string other than v<number> (reserved by MLflow)")
    champion_alias: str = _f("champion", lambda v: bool(v.strip()) and not (v[0] == "v" and v[1:].isdigit()),
                             "a non-empty string other than v<number> (reserved by MLflow)")
    promotion_margin: float = _f(0.0, lambda v: 0.0 <= v < 1.0, "a float in [0, 1) (relative FID improvement)")
    student_alias: str = _f("student", lambda v: bool(v.strip()) and not (v[0] == "v" and v[1:].isdigit()),
                            "a non-empty string other than v<number> (reserved by MLflow)")
    feature_net: str = _f("pinned", lambda v: bool(v.strip()), "pinned, retrain or a non-empty path")
    trajectory_images: int = _f(8, _positive, "an integer > 0")
    log_checkpoint: bool = True


@dataclass(frozen=True)
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    sampler: SamplerConfig = field(default_factory=SamplerConfig)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)
    export: ExportConfig = field(default_factory=ExportConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    pipeline: PipelineConfig = field(default_factory=PipelineConfig)

    def to_dict(self) -> dict[str, Any]:
        return _plain(dataclasses.asdict(self))


_SECTION_CLASSES = {
    "data": DataConfig, "diffusion": DiffusionConfig, "model": ModelConfig, "train": TrainConfig,
    "sampler": SamplerConfig, "runtime": RuntimeConfig, "sample": SampleConfig, "evaluate": EvaluateConfig,
    "export": ExportConfig, "distill": DistillConfig, "pipeline": PipelineConfig,
}
IMAGE_SHAPES = {"mnist": (1, 28, 28), "fashion_mnist": (1, 28, 28), "cifar10": (3, 32, 32)}


def _plain(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    return obj


def section_from_dict(name: str, values: dict[str, Any]) -> Any:
    """One section's settings (e.g. an exported model's "diffusion"), each value checked; no cross-section checks."""
    return build_section(name, _SECTION_CLASSES[name], values)


def _validate(cfg: Config) -> None:
    """Checks that span several settings."""
    d, m = cfg.diffusion, cfg.model
    if d.schedule == "linear" and d.beta_start >= d.beta_end:
        raise ConfigError(f"diffusion.beta_start: {d.beta_start} must be below diffusion.beta_end ({d.beta_end})")
    _, h, w = IMAGE_SHAPES[cfg.data.dataset]
    levels = len(m.channel_mult)
    if h % 2 ** (levels - 1) or w % 2 ** (levels - 1):
        raise ConfigError(
            f"model.channel_mult: {list(m.channel_mult)} gives {levels} levels, so the image size must be divisible by "
            f"{2 ** (levels - 1)}, but {cfg.data.dataset} images are {h}x{w}; use at most "
            f"{_max_levels(h)} levels for this dataset")
    bad = [a for a in m.attention_levels if a >= levels]
    if bad:
        raise ConfigError(f"model.attention_levels: level {bad[0]} does not exist; "
                          f"the U-Net has levels 0..{levels - 1}")
    for mult in m.channel_mult:
        ch = m.base_channels * mult
        if ch % m.norm_groups:
            raise ConfigError(f"model.norm_groups: {m.norm_groups} does not divide {ch} channels "
                              f"(base_channels * {mult}); choose a divisor of every level's width")
        if ch % m.num_heads:
            raise ConfigError(f"model.num_heads: {m.num_heads} does not divide {ch} channels")
    if cfg.sampler.steps > d.timesteps:
        raise ConfigError(f"sampler.steps: {cfg.sampler.steps} exceeds diffusion.timesteps ({d.timesteps})")
    _validate_distill(cfg)
    if cfg.sample.label is not None:
        if not m.class_conditional:
            raise ConfigError("sample.label: the model is not class-conditional; set model.class_conditional: true "
                              "to train a model that can be asked for a class")
        if not 0 <= cfg.sample.label < 10:
            raise ConfigError(f"sample.label: {cfg.sample.label} is out of range; allowed: 0..9")


def _validate_distill(cfg: Config) -> None:
    """distill.teacher_steps must be distill.steps times a power (>= 1) of distill.round_factor (ddpm.distill
    checks it against the teacher's T)."""
    ds, T = cfg.distill, cfg.diffusion.timesteps
    n = ds.teacher_steps
    while n > ds.steps and n % ds.round_factor == 0:
        n //= ds.round_factor
    if n != ds.steps or ds.teacher_steps == ds.steps:
        ratio = ds.teacher_steps // ds.steps
        other = (f" or distill.round_factor={ratio} (one round)"
                 if ds.teacher_steps % ds.steps == 0 and ratio >= 2 else "")
        raise ConfigError(f"distill.teacher_steps: {ds.teacher_steps} must be distill.steps ({ds.steps}) multiplied "
                          f"by distill.round_factor ({ds.round_factor}) one or more times (each round divides the "
                          f"steps by it); set distill.teacher_steps={ds.steps * ds.round_factor}{other}")
    if cfg.diffusion.distilled_steps > T:
        raise ConfigError(f"diffusion.distilled_steps: {cfg.diffusion.distilled_steps} exceeds diffusion.timesteps "
                          f"({T})")


def _max_levels(size: int) -> int:
    n = 1
    while size % 2 ** n == 0:
        n += 1
    return n


def _profile(profiles: Any, name: Any) -> dict[str, Any]:
    """The settings of profile `name`: a mapping of sections, or ConfigError saying what the file holds instead."""
    if not isinstance(profiles, dict):
        raise ConfigError(f"profiles: expected a mapping of profile names to settings, got {type(profiles).__name__}")
    if not isinstance(name, str):
        raise ConfigError(f"profile: {name!r} is not a profile name; use one of {', '.join(profiles) or 'none'}")
    if name not in profiles:
        raise ConfigError(f"profile: {name!r} is not defined; defined profiles are {', '.join(profiles) or 'none'}")
    settings = profiles[name]
    if not isinstance(settings, dict):
        raise ConfigError(f"profiles.{name}: expected a mapping of sections (e.g. train: {{steps: 200}}), got "
                          f"{'nothing' if settings is None else type(settings).__name__}")
    return settings


def config_from_dict(raw: dict[str, Any], profile: str | None = None, overrides: typing.Sequence[str] = ()) -> Config:
    """Build and validate a Config from a params mapping, a profile name and `section.key=value` overrides."""
    if not isinstance(raw, dict):
        raise ConfigError(f"params: expected a mapping of sections, got {type(raw).__name__}")
    raw = dict(raw)
    profiles = raw.pop("profiles", {}) or {}
    default_profile = raw.pop("profile", None)
    profile = profile if profile is not None else default_profile
    refuse_moved(raw)
    if profile is not None:
        settings = _profile(profiles, profile)
        refuse_moved(settings, f"profiles.{profile}.")
        raw = deep_merge(raw, settings)
    for text in overrides:
        (section, key), value = parse_override(text)
        refuse_moved({section: {key: value}})
        raw.setdefault(section, {})
        if not isinstance(raw[section], dict):
            raise ConfigError(f"{section}: expected a mapping of settings")
        raw[section] = {**raw[section], key: value}
    unknown = sorted(set(raw) - set(_SECTION_CLASSES))
    if unknown:
        raise ConfigError(f"{unknown[0]}: unknown section; known sections are {', '.join(_SECTION_CLASSES)}")
    cfg = Config(**{name: build_section(name, cls, raw.get(name) or {}) for name, cls in _SECTION_CLASSES.items()})
    _validate(cfg)
    return cfg


def check_section_values(section: str, values: dict[str, Any]) -> None:
    """ConfigError for a value of `section` out of its own range (e.g. from the command line), before any work;
    the checks across sections (config_from_dict's) need the whole config, e.g. a checkpoint's model."""
    build_section(section, _SECTION_CLASSES[section], values)


def load_config(path: str | Path | None = "params.yaml", profile: str | None = None,
                overrides: typing.Sequence[str] = ()) -> Config:
    """Read `path` (None: built-in defaults), apply `profile` and `overrides`, validate."""
    raw: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"params file {p} does not exist; pass --params PATH or run from the project root")
        try:
            raw = yaml.safe_load(p.read_bytes().decode("utf-8")) or {}
        except UnicodeDecodeError as exc:
            raise ConfigError(f"params file {p} is not UTF-8 text (byte {exc.start}: {exc.reason}); save it as "
                              f"UTF-8") from None
        except yaml.YAMLError as exc:
            raise ConfigError(f"params file {p} is not valid YAML: {' '.join(str(exc).split())}") from None
        except OSError as exc:
            raise ConfigError(f"params file {p} cannot be read ({exc.strerror or exc})") from None
    return config_from_dict(raw, profile, overrides)


def image_shape(cfg: Config) -> tuple[int, int, int]:
    """(C, H, W) of the configured dataset."""
    return IMAGE_SHAPES[cfg.data.dataset]
