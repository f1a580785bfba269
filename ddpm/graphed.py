"""CUDA-graph replay of the denoiser for sampling.

A sampler calls the network with the same shapes at every step, and a small U-Net at these image
sizes is limited by kernel launches, not by the GPU. Capturing one forward pass per input shape
and replaying it removes the launch cost while the samplers stay plain free functions.
"""

from __future__ import annotations

import torch
from torch import nn


class GraphedDenoiser:
    """Callable like the model, `(x [B, C, H, W], t int64 [B], labels int64 [B] | None) -> [B, C, H, W]`.

    On CUDA each distinct (shape, labelled) input is captured once into a torch.cuda.CUDAGraph and
    replayed afterwards; elsewhere it calls the model. Capture under autocast needs
    `torch.autocast(..., cache_enabled=False)` around the sampler.
    """

    def __init__(self, model: nn.Module):
        self.model = model
        self.num_classes = getattr(model, "num_classes", None)
        self._graphs: dict[tuple, tuple] = {}

    @torch.no_grad()
    def __call__(self, x: torch.Tensor, t: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        if x.device.type != "cuda":
            return self.model(x, t, labels)
        key = (tuple(x.shape), x.dtype, labels is not None, torch.is_autocast_enabled("cuda"))
        if key not in self._graphs:
            self._graphs[key] = self._capture(x, t, labels)
        graph, static_x, static_t, static_labels, out = self._graphs[key]
        static_x.copy_(x)
        static_t.copy_(t)
        if labels is not None:
            static_labels.copy_(labels)
        graph.replay()
        return out.clone()  # the static output is overwritten by the next replay

    def _capture(self, x: torch.Tensor, t: torch.Tensor, labels: torch.Tensor | None) -> tuple:
        static_x, static_t = x.clone(), t.clone()
        static_labels = labels.clone() if labels is not None else None
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):  # warm-up outside the graph (cuDNN autotuning, lazy allocations)
            for _ in range(2):
                self.model(static_x, static_t, static_labels)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = self.model(static_x, static_t, static_labels)
        return graph, static_x, static_t, static_labels, out
