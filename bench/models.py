"""The networks under test: our U-Net for each profile, and a diffusers UNet2DModel twin of each.

A twin copies the layout: the same widths per level, residual blocks per level, attention levels,
heads, GroupNorm groups, scale-shift time conditioning, strided-conv down and nearest+conv up
sampling. For the default MNIST model (28 -> 14 -> 7, three levels) and the CIFAR-10 model
(32 -> 16 -> 8 -> 4) it matches our parameter count to 0.01 % and our forward FLOPs exactly.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch
import yaml
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from bench.harness import REPO_ROOT
from ddpm.config import Config, ModelConfig, config_from_dict, image_shape
from ddpm.unet import UNet

MODEL_NAMES = ("mnist", "cifar10")
# params.yaml profile per model; None is the file's base values (the default MNIST model).
_PROFILES: dict[str, str | None] = {"mnist": None, "cifar10": "cifar10"}


@dataclass
class Spec:
    """One network to benchmark: `build()` gives a fresh eps(x [B, C, H, W], t [B] int64) module."""

    name: str  # "mnist", "cifar10", "mnist-ref", "cifar10-ref"
    cfg: Config
    shape: tuple[int, int, int]  # (C, H, W)
    build: Callable[[], nn.Module]
    is_reference: bool
    arch: dict[str, Any]


def load_profile_config(name: str, params: str = "params.yaml", overrides: tuple[str, ...] = ()) -> Config:
    """The Config of model `name`: params.yaml's base values (mnist) or its `cifar10` profile.

    The file's own `profile:` default (a small CPU model) is ignored on purpose.
    """
    if name not in _PROFILES:
        raise SystemExit(f"--models: unknown model {name!r}; choose from {', '.join(MODEL_NAMES)}")
    path = REPO_ROOT / params
    raw = yaml.safe_load(path.read_text()) or {}
    raw.pop("profile", None)
    return config_from_dict(raw, _PROFILES[name], overrides)


def ours(name: str, overrides: tuple[str, ...] = ()) -> Spec:
    cfg = load_profile_config(name, overrides=overrides)
    shape = image_shape(cfg)

    def build() -> nn.Module:
        return randomize_zero_layers(UNet(cfg.model, in_channels=shape[0]))
    return Spec(name, cfg, shape, build, False, {"class": "ddpm.unet.UNet", **_asdict(cfg.model)})


def reference(name: str, overrides: tuple[str, ...] = ()) -> Spec:
    """The diffusers twin of model `name`; raises (ImportError, ...) where diffusers is not usable."""
    from diffusers import UNet2DModel  # fails here, before any timing, where diffusers is missing

    cfg = load_profile_config(name, overrides=overrides)
    shape = image_shape(cfg)
    kwargs = twin_kwargs(cfg.model, shape)

    def build() -> nn.Module:
        return DiffusersEps(UNet2DModel(**kwargs))
    return Spec(f"{name}-ref", cfg, shape, build, True, {"class": "diffusers.UNet2DModel", **kwargs})


def twin_kwargs(m: ModelConfig, shape: tuple[int, int, int]) -> dict[str, Any]:
    """UNet2DModel arguments that reproduce our U-Net's layout for `m` and images of `shape`."""
    widths = [m.base_channels * k for k in m.channel_mult]
    levels = range(len(widths))
    # One head size for every attention layer (diffusers' attention_head_dim): ours has num_heads
    # heads at each attention level and in the middle block; take the middle block's size.
    head_dim = widths[-1] // m.num_heads
    if any(widths[lv] // m.num_heads != head_dim for lv in m.attention_levels):
        raise ValueError("the twin needs one attention head size at every attention level")
    return dict(
        sample_size=shape[1], in_channels=shape[0], out_channels=shape[0],
        block_out_channels=tuple(widths), layers_per_block=m.num_res_blocks,
        down_block_types=tuple("AttnDownBlock2D" if lv in m.attention_levels else "DownBlock2D" for lv in levels),
        up_block_types=tuple("AttnUpBlock2D" if lv in m.attention_levels else "UpBlock2D" for lv in reversed(levels)),
        attention_head_dim=head_dim, norm_num_groups=m.norm_groups, resnet_time_scale_shift="scale_shift",
        dropout=m.dropout, downsample_type="conv", upsample_type="conv",
    )


class DiffusersEps(nn.Module):
    """A UNet2DModel called like our U-Net: eps = net(x [B, C, H, W], t [B])."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor, t: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        if labels is not None:
            raise ValueError("the diffusers twin is unconditional: it takes no labels")
        return self.net(x, t, return_dict=False)[0]


def specs(names: list[str], with_reference: bool, overrides: tuple[str, ...] = ()
          ) -> tuple[list[Spec], dict[str, str]]:
    """Our models, each followed by its twin when asked; also {twin: why it was left out}."""
    out, missing = [], {}
    for name in names:
        out.append(ours(name, overrides))
        if with_reference:
            try:
                out.append(reference(name, overrides))
            except Exception as exc:  # ImportError, or a broken dependency behind diffusers' lazy imports
                missing[f"{name}-ref"] = (f"diffusers is not usable ({type(exc).__name__}: {exc}); "
                                          "carry .whl (bench/README.md)")
    return out, missing


def randomize_zero_layers(model: nn.Module) -> nn.Module:
    """Re-initialise the layers our U-Net zeroes at init (residual branch outputs, the last conv).

    A zero-initialised output conv makes eps identically 0, which would let a correctness check
    pass vacuously, and all-zero operands can run faster than real ones.
    """
    for mod in model.modules():
        if isinstance(mod, (nn.Conv2d, nn.Linear)) and not mod.weight.any():
            mod.reset_parameters()
    return model


def num_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def forward_flops(model: nn.Module, shape: tuple[int, int, int], device: torch.device, batch: int = 2
                  ) -> tuple[float, dict[str, float]]:
    """Forward FLOPs per image and their split by aten op, counted by FlopCounterMode.

    Attention runs on the math backend while counting, so it is counted as the matmuls it is on any
    device (the fused kernels' FLOP formulas are registered only for some backends).
    """
    from torch.nn.attention import SDPBackend, sdpa_kernel

    x = torch.randn(batch, *shape, device=device)
    t = torch.randint(0, 1000, (batch,), device=device)
    was_training = model.training
    model.eval()
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        model(x, t)
    model.train(was_training)
    by_op = {str(op): n / batch for op, n in counter.get_flop_counts().get("Global", {}).items()}
    return counter.get_total_flops() / batch, by_op


def _asdict(m: ModelConfig) -> dict[str, Any]:
    import dataclasses
    return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(m).items()}
