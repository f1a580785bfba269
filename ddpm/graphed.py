"""CUDA-graph capture: the one helper that training, sampling and the benchmarks use.

A small U-Net at these image sizes is limited by kernel launches, not by the GPU. Capturing a
call once into a torch.cuda.CUDAGraph and replaying it removes the launch cost; a replay re-runs
the same kernels on the same memory, so the captured function must read its inputs from static
buffers and leave its results in tensors that outlive it. Capture needs a few eager calls first,
on a side stream (`on_side_stream`): cuDNN autotuning, lazy allocations, optimizer state.
`GraphedDenoiser` applies this to the denoiser for the samplers, which stay plain free functions.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import nn


def on_side_stream(fn: Callable[..., Any], *args: Any, calls: int = 1,
                   device: torch.device | None = None) -> Any:
    """fn(*args) `calls` times on a side stream, as the eager calls before a capture must run; returns the last
    result (None when calls is 0)."""
    out = None
    stream = torch.cuda.Stream(device=device)
    stream.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(stream):
        for _ in range(calls):
            out = fn(*args)
    torch.cuda.current_stream(device).wait_stream(stream)
    return out


@dataclass
class Captured:
    """A captured call: `replay(*values)` copies values into `inputs` (None stays None) and returns `output`,
    a static tensor that the next replay overwrites."""

    graph: torch.cuda.CUDAGraph
    inputs: tuple[torch.Tensor | None, ...]
    output: Any

    def replay(self, *values: torch.Tensor | None) -> Any:
        for buf, value in zip(self.inputs, values):
            if buf is not None:
                buf.copy_(value)
        self.graph.replay()
        return self.output


def capture(fn: Callable[..., Any], *inputs: torch.Tensor | None, device: torch.device | None = None) -> Captured:
    """Capture fn(*static) in a CUDA graph, `static` being clones of `inputs` (None stays None).

    Run the eager warm-up calls (`on_side_stream`) before this; the device is synchronized first.
    """
    static = tuple(x.clone() if x is not None else None for x in inputs)
    torch.cuda.synchronize(device)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fn(*static)
    return Captured(graph, static, out)


class GraphedDenoiser:
    """Callable like the model, `(x [B, C, H, W], t int64 [B], labels int64 [B] | None) -> [B, C, H, W]`.

    On CUDA each distinct (shape, labelled) input is captured once into a torch.cuda.CUDAGraph and
    replayed afterwards; elsewhere it calls the model. Capture under autocast needs
    `torch.autocast(..., cache_enabled=False)` around the sampler.
    """

    def __init__(self, model: nn.Module):
        self.model = model
        self.num_classes = getattr(model, "num_classes", None)
        self._graphs: dict[tuple, Captured] = {}

    @torch.no_grad()
    def __call__(self, x: torch.Tensor, t: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        if x.device.type != "cuda":
            return self.model(x, t, labels)
        key = (tuple(x.shape), x.dtype, labels is not None, torch.is_autocast_enabled("cuda"))
        if key not in self._graphs:
            on_side_stream(self.model, x, t, labels, calls=2)  # warm-up outside the graph
            self._graphs[key] = capture(self.model, x, t, labels)
        return self._graphs[key].replay(x, t, labels).clone()  # the static output is overwritten by the next replay
