"""The U-Net's layers that take a faster form when compiled, and the switches that turn those forms on.

Each is a drop-in for a torch layer (GroupNorm, Dropout, Conv2d, Upsample) with the same parameters,
so checkpoints do not change. The faster forms are taken only inside torch.compile (and only where a
switch asked for them); eager mode and ONNX export run the torch layer. Why each form exists is in
its docstring; what it measured is in the page of docs/experiments/ that the docstring names.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn


class GroupNorm(nn.GroupNorm):
    """nn.GroupNorm; where asked, when compiled, its statistics come from per-channel sums.

    A group's statistics are a reduction over its (C/G) x H x W elements, which are strided in
    channels-last memory, and torch.compile turns aten's group_norm into reductions that read them
    poorly. Per-channel sums over H x W are one pass along contiguous memory; the group's mean and
    variance follow from its channels' sums of values and of squares (E[x^2] - E[x]^2, in float32 for
    bf16 and fp16 inputs).
    Per-channel statistics made `sample.compile` and the compiled channels-last training step faster
    than aten's group_norm, and these sums faster than per-channel var_mean, whose Welford updates
    cost more than the memory they read (measured: docs/experiments/2026-11-26-groupnorm-sums.md,
    2026-11-26-groupnorm-per-channel-statistics.md). E[x^2] - E[x]^2 loses digits where a group's mean
    is large against its spread: the variance's relative error grows as float32's 6e-8 times
    (mean / std)^2. At ratios of 10-100 the output was off by 1.6e-3, below the bfloat16 rounding of
    the convolution that reads it, and a trained MNIST model's groups stayed under a ratio of 6
    (bench/groupnorm_conditioning.py).
    The form is opt-in (`per_channel_stats`, set by `use_per_channel_group_norm`, which
    ddpm.generate.sampling_network applies to its compiled copy and ddpm.train to a model it
    compiles) and taken only while compiling. Eager mode and ONNX export (one fused kernel;
    onnxruntime's GroupNorm patterns) keep aten's group_norm; torch.export, which counts as compiling,
    takes this form only if the flag is set. As aten's group_norm, it gives float32 under autocast and
    the input's dtype otherwise.
    """

    per_channel_stats = False  # an attribute, not state: checkpoints are unchanged

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # An explicit flag rather than torch.compiler.is_exporting(), which torch 2.11's dynamo reports
        # True under plain torch.compile too.
        if (not self.per_channel_stats or not self.affine or x.ndim < 3
                or not torch.compiler.is_compiling() or torch.onnx.is_in_onnx_export()):
            return super().forward(x)
        return per_channel_group_norm(x, self.num_groups, self.weight, self.bias, self.eps)


def per_channel_group_norm(x: torch.Tensor, groups: int, weight: torch.Tensor, bias: torch.Tensor,
                           eps: float) -> torch.Tensor:
    """F.group_norm(x, groups, weight, bias, eps) from per-channel statistics (see GroupNorm);
    float32 under autocast."""
    x = channels_last_grad(x)
    b, c, g, dtype = x.shape[0], x.shape[1], groups, x.dtype
    x = x.float() if dtype in (torch.float16, torch.bfloat16) else x
    dims, n = tuple(range(2, x.ndim)), math.prod(x.shape[2:]) * (c // g)
    mean = x.sum(dims).view(b, g, c // g).sum(-1) / n  # [B, G]
    var = (x.square().sum(dims).view(b, g, c // g).sum(-1) / n - mean.square()).clamp_min(0)
    return group_norm_from_stats(x, mean, var, weight, bias, eps, dtype)


def group_norm_from_stats(x: torch.Tensor, mean: torch.Tensor, var: torch.Tensor, weight: torch.Tensor,
                          bias: torch.Tensor, eps: float, dtype: torch.dtype) -> torch.Tensor:
    """x [B, C, ...] normalised by its groups' mean and var [B, G], then weight and bias [C]; float32 under
    autocast, `dtype` otherwise."""
    b, c, g = x.shape[0], x.shape[1], mean.shape[1]
    rstd = torch.rsqrt(var + eps)
    scale = rstd[..., None].expand(b, g, c // g).reshape(b, c) * weight  # [B, C]
    shift = bias - mean[..., None].expand(b, g, c // g).reshape(b, c) * scale
    spatial = (1,) * (x.ndim - 2)
    out = x * scale.view(b, c, *spatial) + shift.view(b, c, *spatial)
    return out if torch.is_autocast_enabled(x.device.type) else out.to(dtype)


def use_per_channel_group_norm(model: nn.Module, enabled: bool = True) -> nn.Module:
    """Let `model`'s GroupNorms take their per-channel form when compiled (see GroupNorm)."""
    return _set_on_modules(model, GroupNorm, "per_channel_stats", enabled)


def _set_on_modules(model: nn.Module, kind: type[nn.Module], flag: str, enabled: bool) -> nn.Module:
    """Set the opt-in `flag` of every `kind` module in `model` (an instance attribute, not state)."""
    for m in model.modules():
        if isinstance(m, kind):
            setattr(m, flag, enabled)
    return model


# The 32-bit integer hash of dropout masks when compiled (Dropout): x ^= x >> 16; x *= K; twice, then
# x ^= x >> 16, all mod 2**32 (T. Mueller's hash, a bijection of 32-bit words). K < 2**27, so each
# product of a 32-bit word fits in int64 exactly.
MASK_HASH_MULTIPLIER = 0x45D9F3B
_WORD = 0xFFFFFFFF


def mask_hash(x: torch.Tensor) -> torch.Tensor:
    """The 32-bit hash of each word of x: int64 of any shape, values in [0, 2**32) -> the same."""
    for _ in range(2):
        x = ((x ^ (x >> 16)) * MASK_HASH_MULTIPLIER) & _WORD
    return x ^ (x >> 16)


class Dropout(nn.Dropout):
    """nn.Dropout; where asked, when compiled for training, its mask comes from a hash of each element's offset.

    Compiled, aten's dropout draws every element with Philox (10 rounds, one of its four outputs used),
    which made the kernels that apply it compute-bound: the forward GroupNorm-SiLU-dropout kernels of a
    compiled MNIST training step ran well below the memory speed that the same kernels without dropout
    reached (docs/experiments/2026-11-26-recompute-rather-than-store.md). Here an element is kept when
    mask_hash((offset + seed) mod 2**32) >= p * 2**32, with `offset` its place in memory and `seed` a
    fresh random 32-bit word per call (drawn on the device, so a captured CUDA graph draws a new one at
    every replay): a few integer operations that fuse into the kernel that applies the mask. With the
    seed uniform, each element is kept with probability 1 - p (to 2**-33); the hash is a bijection, so
    within a call no two elements (up to 2**32 of them) share a hashed word. Masks of different calls
    are the same sequence of hashed words shifted by the difference of their seeds. The form is opt-in
    (`hashed_mask`, set by `use_hashed_dropout`, which ddpm.train applies to a model it compiles) and
    taken only while compiling in training mode; eager mode keeps aten's dropout. Against Philox in the
    compiled training step it was not slower, not clearly faster, and FID after training was unchanged
    (docs/experiments/2026-11-26-hashed-dropout-masks.md).
    """

    hashed_mask = False  # an attribute, not state: checkpoints are unchanged

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.hashed_mask and self.training and 0 < self.p < 1 and torch.compiler.is_compiling()) \
                or torch.onnx.is_in_onnx_export():
            return super().forward(x)
        return hashed_dropout(x, self.p)


def hashed_dropout(x: torch.Tensor, p: float, seed: torch.Tensor | None = None) -> torch.Tensor:
    """x [any shape] with each element zeroed with probability p, the rest scaled by 1 / (1 - p) (see
    Dropout); the result has x's shape, dtype and layout.

    The mask follows each element's memory offset, so x is made contiguous unless it is already
    contiguous or channels-last (each element at its own offset). `seed`: a 0-d int64 tensor in
    [0, 2**32); by default drawn from torch's generator on x's device.
    """
    if not (x.is_contiguous() or (x.ndim == 4 and x.is_contiguous(memory_format=torch.channels_last))):
        x = x.contiguous()
    if seed is None:
        seed = torch.randint(0, 2**32, (), device=x.device, dtype=torch.int64)
    # each element's memory offset, laid out as x: the mask is then written in x's layout
    offset = torch.arange(x.numel(), device=x.device, dtype=torch.int64).as_strided(x.shape, x.stride())
    keep = mask_hash((offset + seed) & _WORD) >= round(p * 2**32)
    return x * keep.to(x.dtype) * (1 / (1 - p))


def use_hashed_dropout(model: nn.Module, enabled: bool = True) -> nn.Module:
    """Let `model`'s Dropouts take their hashed-mask form when compiled for training (see Dropout)."""
    return _set_on_modules(model, Dropout, "hashed_mask", enabled)


class ChannelPaddedConv2d(nn.Conv2d):
    """A copy of `conv` whose input and output channels are zero-padded to multiples of `multiple`.

    [B, C_in, H, W] -> [B, C_out, H, W], as `conv`. For inference on CUDA in channels-last memory.
    With one image channel (MNIST; docs/experiments/2026-11-26-padded-image-convolutions-sampling.md)
    cuDNN ran the U-Net's first convolution with a generic kernel and, unable to tell channels-last from
    NCHW for one channel, returned its output NCHW, so every kernel that later read it beside
    channels-last tensors (the first residual add, the last skip connection) read memory out of order;
    the last convolution (64 -> 1) took a slow sm80 kernel. Three-channel images are padded the same way
    (not measured). The padded channels carry zero weights and zero inputs, so they add exact zeros: the
    result is `conv`'s.
    """

    def __init__(self, conv: nn.Conv2d, multiple: int = 8):
        if conv.groups != 1 or conv.padding_mode != "zeros":
            raise ValueError("ChannelPaddedConv2d takes a plain convolution (groups=1, zero padding)")
        pad_in, pad_out = -conv.in_channels % multiple, -conv.out_channels % multiple
        super().__init__(conv.in_channels + pad_in, conv.out_channels + pad_out, conv.kernel_size, conv.stride,
                         conv.padding, conv.dilation, bias=conv.bias is not None,
                         device=conv.weight.device, dtype=conv.weight.dtype)
        self.unpadded_out_channels = conv.out_channels
        with torch.no_grad():
            self.weight.copy_(F.pad(conv.weight, (0, 0, 0, 0, 0, pad_in, 0, pad_out)))
            if conv.bias is not None:
                self.bias.copy_(F.pad(conv.bias, (0, pad_out)))
        self.requires_grad_(conv.weight.requires_grad)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.pad(x, (0, 0, 0, 0, 0, self.in_channels - x.shape[1]))
        return super().forward(x.contiguous(memory_format=torch.channels_last))[:, :self.unpadded_out_channels]


class ImageConv2d(nn.Conv2d):
    """nn.Conv2d for image channels (the U-Net's first and last convolutions); where asked, when compiled,
    it runs as a convolution zero-padded to a multiple of 8 channels each way, as ChannelPaddedConv2d.

    [B, C_in, H, W] -> [B, C_out, H, W], as nn.Conv2d. In a compiled channels-last training step the one-channel
    convolutions ran NCHW: their operands were copied between layouts (a [B, 64, 28, 28] gradient and
    activation), cuDNN converted NCHW to NHWC, and the last convolution took a generic kernel. Padded, the
    weight and input are padded inside the compiled graph (the parameters keep their shapes, so checkpoints are
    unchanged) and the result is sliced back; the padding adds exact zeros, and the padded weights' gradients
    flow back through the pad to the real ones. The form is opt-in (`padded_channels`, set by
    `use_padded_image_convs`, which ddpm.train applies to a channels-last model it compiles) and taken only
    while compiling; eager mode and ONNX export keep the plain convolution.
    """

    padded_channels = False  # an attribute, not state
    multiple = 8

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        if self.groups != 1 or self.padding_mode != "zeros":
            raise ValueError("ImageConv2d pads channels, so it takes a plain convolution (groups=1, zero padding)")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.padded_channels and torch.compiler.is_compiling()) or torch.onnx.is_in_onnx_export():
            return super().forward(x)
        pad_in, pad_out = -self.in_channels % self.multiple, -self.out_channels % self.multiple
        weight = F.pad(self.weight, (0, 0, 0, 0, 0, pad_in, 0, pad_out)).contiguous(memory_format=torch.channels_last)
        bias = F.pad(self.bias, (0, pad_out)) if self.bias is not None else None
        x = F.pad(x, (0, 0, 0, 0, 0, pad_in)).contiguous(memory_format=torch.channels_last)
        return self._conv_forward(x, weight, bias)[:, :self.out_channels]


def use_padded_image_convs(model: nn.Module, enabled: bool = True) -> nn.Module:
    """Turn the padded form of every ImageConv2d in `model` on (or off); see ImageConv2d."""
    return _set_on_modules(model, ImageConv2d, "padded_channels", enabled)


class NearestUpsample2x(nn.Module):
    """nn.Upsample(scale_factor=2, mode="nearest"); compiled, a broadcast instead of aten's upsample.

    Each output pixel copies one input pixel, so the gradient of an input pixel is the sum of its four
    copies' gradients. aten's upsample_nearest2d backward, compiled, scatters them with atomic adds
    (docs/experiments/2026-11-26-training-channels-last.md); the broadcast's backward is a
    plain sum. Eager mode and ONNX export keep aten's kernel (one Resize node for onnxruntime).
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not torch.compiler.is_compiling() or torch.onnx.is_in_onnx_export():
            return F.interpolate(x, scale_factor=2, mode="nearest")
        b, c, h, w = x.shape
        y = x[:, :, :, None, :, None].expand(b, c, h, 2, w, 2).reshape(b, c, 2 * h, 2 * w)
        return y.contiguous(memory_format=torch.channels_last) if _is_channels_last(x) else y


def _is_channels_last(x: torch.Tensor) -> bool:
    return x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()


class _ChannelsLastGrad(torch.autograd.Function):
    """Identity whose backward gives its gradient in channels-last memory."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        return grad.contiguous(memory_format=torch.channels_last)


def channels_last_grad(x: torch.Tensor) -> torch.Tensor:
    """x; compiled for training in channels-last memory, its gradient is made channels-last where it is computed.

    Left to itself, inductor may write the gradient of a convolution's output in NCHW order, and cuDNN's
    backward then copies it to channels-last (docs/experiments/2026-11-26-training-channels-last.md).
    Asked for here, the layout is written by the fused kernel that computes the gradient. (Under
    torch.export, which counts as compiling, it is the same identity.)
    """
    if torch.compiler.is_compiling() and x.requires_grad and _is_channels_last(x):
        return _ChannelsLastGrad.apply(x)
    return x
