"""Do q/k/v contiguous per head, which let SDPA use its fused kernels in NCHW models, pay off? (one device call)

    PYTHONPATH=. python3 bench/device/attention_layout.py [--kinds strided,contiguous] [--train-modes eager,compile-graph]

AttentionBlock's forward in two forms, patched in turn:
  strided        the qkv projection's NCHW output reshaped: each head's values are strided by H x W,
                 so scaled_dot_product_attention falls back to its math path (the form before);
  contiguous     the module's own: q/k/v copied contiguous per head after the projection, so SDPA
                 picks a fused kernel.
On the default MNIST U-Net (random weights), NCHW, bf16 autocast, in one process:
  the eager forward at batch 1024 replayed as a CUDA graph (what uncompiled sampling runs),
  and bench_train's training step at batch 512 in each of --train-modes.
"""

from __future__ import annotations

import argparse
from typing import ContextManager
from unittest import mock

import torch
import torch.nn.functional as F

from bench import harness as H
from bench.device.groupnorm_variants import train
from bench.device.sampling_variants import mnist_inference
import ddpm.unet
from ddpm.graphed import GraphedDenoiser

OURS_FORWARD = ddpm.unet.AttentionBlock.forward


def strided_forward(self: ddpm.unet.AttentionBlock, x: torch.Tensor) -> torch.Tensor:
    b, c, h, w = x.shape
    qkv = self.qkv(self.norm(x)).reshape(b, 3, self.num_heads, c // self.num_heads, h * w)
    q, k, v = qkv.transpose(-1, -2).unbind(dim=1)
    out = F.scaled_dot_product_attention(q, k, v)
    return x + self.proj(out.transpose(-1, -2).reshape(b, c, h, w))


KINDS = {"strided": strided_forward, "contiguous": OURS_FORWARD}


def attention(kind: str) -> ContextManager:
    """ddpm.unet.AttentionBlock computed in the `kind` form while the context lasts."""
    return mock.patch.object(ddpm.unet.AttentionBlock, "forward", KINDS[kind])


def infer(kind: str, batch: int) -> float:
    model, gflop, x, t = mnist_inference(batch, channels_last=False)
    sync = torch.cuda.synchronize
    with attention(kind), torch.no_grad(), torch.autocast("cuda", torch.bfloat16, cache_enabled=False):
        g = GraphedDenoiser(model)
        g(x, t)
        ms = H.time_windows(lambda: g(x, t), sync, iters=50, windows=3).median_s * 1e3
    print(f"infer {kind:14s} NCHW eager CUDA graph batch {batch}: {ms:7.3f} ms/step  "
          f"{batch * gflop / ms:6.1f} TFLOP/s", flush=True)
    return ms


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--kinds", default="strided,contiguous")
    p.add_argument("--train-modes", default="eager,compile-graph")
    a = p.parse_args()
    print(torch.__version__, torch.cuda.get_device_name(), flush=True)
    peak = H.matmul_peak(torch.device("cuda"), 8192)["tflops"]
    print(f"bf16 matmul peak {peak:.1f} TFLOP/s", flush=True)
    kinds = a.kinds.split(",")
    for kind in kinds:
        infer(kind, 1024)
    for mode in a.train_modes.split(","):
        for kind in kinds:
            train(kind, 512, peak, attention, mode)


if __name__ == "__main__":
    main()
