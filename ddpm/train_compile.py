"""How `ddpm train` compiles its step: torch.compile's inductor options and the model's compiled layer forms.

The step itself (forward, loss, backward, clip, AdamW, EMA) is ddpm.train_step's; ddpm.train compiles the network
it calls with `compile_for_training` when train.compile is on, and keys its compile cache (ddpm.compile_cache) with
`compile_options`; `training_network` is what the loss calls (DDP-wrapped on several ranks, compiled or not,
with its compile cache). The distillation rounds (ddpm.distill) compile their teacher the same way.
"""

from __future__ import annotations

import os
from typing import Any, Callable

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from ddpm.compile_cache import CompileCache, training_cache_key
from ddpm.config import Config
from ddpm.distributed import DistInfo
from ddpm.layers import use_hashed_dropout, use_padded_image_convs, use_per_channel_group_norm
from ddpm.layout import RunLayout


def compile_options(cuda_graphs: bool) -> dict[str, Any]:
    """Inductor settings for the compiled training step (torch.compile's `options`); with `cuda_graphs`
    it also calls keep_multi_kernel_choices_in_memory (below).

    By default inductor writes a computed value to memory when it has several users and more than 4
    reads or 30 operations. In the backward that wrote the float32 gradient of each GroupNorm output
    (GroupNorm, scale-shift, SiLU and dropout recomputed) and read it back in the next kernel;
    recomputing it in each user reads less. With the step in a CUDA graph, each reduction is also
    compiled twice (the whole row in registers, and looped) and the faster one is chosen by timing on
    the first call; outside a graph that choice costs a host-side dispatch per launch, more than it
    saves. Measured on the MNIST step: docs/experiments/2026-11-26-recompute-rather-than-store.md.
    """
    options: dict[str, Any] = {"realize_reads_threshold": 64, "realize_opcount_threshold": 1000,
                               "realize_acc_reads_threshold": 64}
    if cuda_graphs:
        options["triton.multi_kernel"] = 1
        keep_multi_kernel_choices_in_memory()
    return options


def keep_multi_kernel_choices_in_memory() -> None:
    """Turn off inductor's on-disk record of which multi-kernel variant won, for this process and its
    children (TORCHINDUCTOR_DISABLE_MULTI_KERNEL_CACHE=1, unless set); for any compile with
    `triton.multi_kernel`. With torch 2.11 a compile served from a warm cache failed reading that record
    back (TypeError in triton's JITFunction.cache_key), so a second run on the same machine stopped.
    Each process times the variants again at their first call.
    """
    os.environ.setdefault("TORCHINDUCTOR_DISABLE_MULTI_KERNEL_CACHE", "1")


def training_network(model: nn.Module, cfg: Config, rank: DistInfo, device: torch.device,
             graphed: bool) -> tuple[Callable[..., torch.Tensor], CompileCache | None]:
    """What the loss calls: the model, wrapped in DistributedDataParallel on several ranks, compiled with
    train.compile (then GroupNorm statistics from per-channel sums, dropout masks from a hash, and with
    train.channels_last image-channel convolutions in channels-last kernels: ddpm.layers), and its compile cache."""
    tc = cfg.train
    ddp = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None) \
        if rank.world_size > 1 else model
    if not tc.compile:
        return ddp, None
    options = compile_options(graphed)
    cache = CompileCache(RunLayout(tc.out_dir).compile_cache, training_cache_key(cfg, rank.world_size, device,
                                                                                  graphed, options)).loaded()
    return compile_for_training(ddp, model, tc.channels_last, graphed), cache


def compile_for_training(net: Callable[..., torch.Tensor], model: nn.Module, channels_last: bool,
                         graphed: bool) -> Callable[..., torch.Tensor]:
    """torch.compile `net` (the model or its DDP wrapper) as training does, with the model's compiled layer forms."""
    use_hashed_dropout(use_per_channel_group_norm(model))
    use_padded_image_convs(model, channels_last)
    cache_graphs_with_autograd_functions()
    return torch.compile(net, options=compile_options(graphed))


def cache_graphs_with_autograd_functions() -> None:
    """Let AOTAutograd's cache keep graphs that call a torch.autograd.Function (ddpm.layers.channels_last_grad,
    in every channels-last training step). torch bypasses that cache for them by default, so each run, compile
    cache file loaded or not, partitioned the step's joint graph again. Ours is pure: its forward and backward
    are traced into the graph that keys the cache. Process-wide, like torch's own setting."""
    config = torch._functorch.config
    if hasattr(config, "autograd_cache_allow_custom_autograd_functions"):
        config.autograd_cache_allow_custom_autograd_functions = True
