"""The noise-prediction U-Net eps_theta(x_t, t[, y]) (Ho et al. 2020, appendix B; Dhariwal & Nichol 2021).

Level i works at resolution H / 2**i with `base_channels * channel_mult[i]` channels. Each level
has `num_res_blocks` residual blocks (GroupNorm, SiLU, dropout; the time embedding enters as a
scale and shift), self-attention at the levels in `attention_levels`, and a strided-conv
downsample between levels. The up path mirrors it with skip connections. 28x28 images use
levels 28, 14, 7 and 32x32 images 32, 16, 8(, 4): no padding is needed.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ddpm.config import ModelConfig
from ddpm.layers import ChannelPaddedConv2d, Dropout, GroupNorm, ImageConv2d, NearestUpsample2x, channels_last_grad


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding of timesteps t [B] (int or float) -> [B, dim], as in the Transformer."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    args = t.float()[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    return F.pad(emb, (0, dim % 2))


def zero_module(module: nn.Module) -> nn.Module:
    """Zero a layer's parameters so that a residual branch starts as the identity."""
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


class ResBlock(nn.Module):
    def __init__(self, in_ch: int, out_ch: int, emb_dim: int, dropout: float, groups: int):
        super().__init__()
        self.norm1 = GroupNorm(groups, in_ch)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.emb = nn.Linear(emb_dim, 2 * out_ch)
        self.norm2 = GroupNorm(groups, out_ch)
        self.dropout = Dropout(dropout)
        self.conv2 = zero_module(nn.Conv2d(out_ch, out_ch, 3, padding=1))
        self.skip = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else nn.Identity()

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        scale, shift = self.emb(F.silu(emb))[:, :, None, None].chunk(2, dim=1)
        h = self.norm2(h) * (1 + scale) + shift
        h = self.conv2(self.dropout(F.silu(h)))
        return channels_last_grad(self.skip(x) + h)


class AttentionBlock(nn.Module):
    """Multi-head self-attention over the H*W positions, through scaled_dot_product_attention."""

    def __init__(self, ch: int, num_heads: int, groups: int):
        super().__init__()
        self.num_heads = num_heads
        self.norm = GroupNorm(groups, ch)
        self.qkv = nn.Conv2d(ch, 3 * ch, 1)
        self.proj = zero_module(nn.Conv2d(ch, ch, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        qkv = channels_last_grad(self.qkv(self.norm(x))).reshape(
            b, 3, self.num_heads, c // self.num_heads, h * w).transpose(-1, -2)
        if qkv.stride(-1) != 1:  # from NCHW memory; SDPA's fused kernels (flash, memory-efficient, cuDNN)
            qkv = qkv.contiguous()  # need each head's values contiguous, else it takes the math path
        q, k, v = qkv.unbind(dim=1)  # each [B, heads, HW, C/heads]
        out = F.scaled_dot_product_attention(q, k, v)
        return channels_last_grad(x + self.proj(out.transpose(-1, -2).reshape(b, c, h, w)))


class UNet(nn.Module):
    """eps_theta: ([B, C, H, W] float, [B] int64 timesteps in [0, T-1], optional [B] int64 labels) -> [B, C, H, W].

    With `class_conditional`, label `num_classes` is the null class used for classifier-free
    guidance; `labels=None` means unconditional (every sample gets the null class).
    """

    def __init__(self, cfg: ModelConfig, in_channels: int = 1, num_classes: int = 10):
        super().__init__()
        self.cfg, self.in_channels, self.num_classes = cfg, in_channels, num_classes
        ch0, groups = cfg.base_channels, cfg.norm_groups
        emb_dim = 4 * ch0
        self.time_mlp = nn.Sequential(nn.Linear(ch0, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        self.label_emb = nn.Embedding(num_classes + 1, emb_dim) if cfg.class_conditional else None
        self.input_conv = ImageConv2d(in_channels, ch0, 3, padding=1)

        widths = [ch0 * m for m in cfg.channel_mult]
        self.down = nn.ModuleList()
        skips, ch = [ch0], ch0
        for level, width in enumerate(widths):
            for _ in range(cfg.num_res_blocks):
                self.down.append(self._block(ch, width, level, emb_dim))
                ch = width
                skips.append(ch)
            if level < len(widths) - 1:
                self.down.append(nn.Conv2d(ch, ch, 3, stride=2, padding=1))
                skips.append(ch)

        self.mid = nn.ModuleList([ResBlock(ch, ch, emb_dim, cfg.dropout, groups),
                                  AttentionBlock(ch, cfg.num_heads, groups),
                                  ResBlock(ch, ch, emb_dim, cfg.dropout, groups)])

        self.up = nn.ModuleList()
        for level, width in reversed(list(enumerate(widths))):
            for _ in range(cfg.num_res_blocks + 1):
                self.up.append(self._block(ch + skips.pop(), width, level, emb_dim))
                ch = width
            if level > 0:
                self.up.append(nn.Sequential(NearestUpsample2x(), nn.Conv2d(ch, ch, 3, padding=1)))

        self.out = nn.Sequential(GroupNorm(groups, ch), nn.SiLU(),
                                 zero_module(ImageConv2d(ch, in_channels, 3, padding=1)))

    def _block(self, in_ch: int, out_ch: int, level: int, emb_dim: int) -> nn.Module:
        res = ResBlock(in_ch, out_ch, emb_dim, self.cfg.dropout, self.cfg.norm_groups)
        if level in self.cfg.attention_levels:
            return nn.ModuleList([res, AttentionBlock(out_ch, self.cfg.num_heads, self.cfg.norm_groups)])
        return nn.ModuleList([res])

    @staticmethod
    def _run(layer: nn.Module, h: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        if isinstance(layer, nn.ModuleList):  # a residual block, maybe followed by attention
            h = layer[0](h, emb)
            return layer[1](h) if len(layer) > 1 else h
        return layer(h)

    def forward(self, x: torch.Tensor, t: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        emb = self.time_mlp(timestep_embedding(t, self.cfg.base_channels))
        if self.label_emb is not None:
            if labels is None:
                labels = torch.full_like(t, self.num_classes)
            emb = emb + self.label_emb(labels)
        elif labels is not None:
            raise ValueError("labels were given, but this U-Net is not class-conditional "
                             "(model.class_conditional: false)")

        h = self.input_conv(x)
        hs = [h]
        for layer in self.down:
            h = self._run(layer, h, emb)
            hs.append(h)
        h = self.mid[0](h, emb)
        h = self.mid[1](h)
        h = self.mid[2](h, emb)
        for layer in self.up:
            if isinstance(layer, nn.ModuleList):
                h = torch.cat([channels_last_grad(h), hs.pop()], dim=1)
            h = self._run(layer, h, emb)
        return self.out(h)


def build_unet(cfg: ModelConfig, image_shape: tuple[int, int, int], num_classes: int = 10) -> UNet:
    return UNet(cfg, in_channels=image_shape[0], num_classes=num_classes)


def pad_image_channels(model: UNet, multiple: int = 8) -> UNet:
    """Replace a UNet's first and last convolutions (image channels in, image channels out) with ChannelPaddedConv2d.

    For a channels-last copy compiled for sampling (ddpm.generate.sampling_network); the state
    dict's shapes change, so it is not for a model that will be trained or saved.
    """
    model.input_conv = ChannelPaddedConv2d(model.input_conv, multiple)
    model.out[-1] = ChannelPaddedConv2d(model.out[-1], multiple)
    return model
