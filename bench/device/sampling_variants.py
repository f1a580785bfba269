"""Which compile settings make the MNIST U-Net's sampling step fastest? (exploration, one device call)

    PYTHONPATH=. python3 bench/device/sampling_variants.py [VARIANT ...]

Each variant compiles the default MNIST U-Net (random weights) for inference under bf16 autocast,
captures one forward pass in a CUDA graph (ddpm.graphed.GraphedDenoiser) and times replays.
Prints one line per variant: ms per step, images/s for 50-step DDIM, TFLOP/s (forward FLOPs).
"""

from __future__ import annotations

import sys

import torch

from bench import harness as H
from bench.models import forward_flops, ours
from ddpm.generate import cast_weights_for_autocast
from ddpm.graphed import GraphedDenoiser
from ddpm.layers import ChannelPaddedConv2d, use_per_channel_group_norm
from ddpm.unet import pad_image_channels

VARIANTS = {
    "default-1024": dict(batch=1024),
    "default-2048": dict(batch=2048),
    "channels-last-1024": dict(batch=1024, channels_last=True),
    "freezing-1024": dict(batch=1024, inductor={"freezing": True}),
    "freezing-2048": dict(batch=2048, inductor={"freezing": True}),
    "coord-1024": dict(batch=1024, inductor={"coordinate_descent_tuning": True}),
    "coord-cl-1024": dict(batch=1024, channels_last=True, inductor={"coordinate_descent_tuning": True}),
    "coord-cl-freezing-1024": dict(batch=1024, channels_last=True,
                                   inductor={"coordinate_descent_tuning": True, "freezing": True}),
    "coord-cl-freezing-2048": dict(batch=2048, channels_last=True,
                                   inductor={"coordinate_descent_tuning": True, "freezing": True}),
    "coord-cl-freezing-512": dict(batch=512, channels_last=True,
                                  inductor={"coordinate_descent_tuning": True, "freezing": True}),
    "autotune-1024": dict(batch=1024, mode="max-autotune-no-cudagraphs"),
    "cl-1000": dict(batch=1000, channels_last=True),
    "cl-padded-1000": dict(batch=1000, channels_last=True, padded=True),
    "cl-padded-in-1000": dict(batch=1000, channels_last=True, padded="in"),
    "cl-padded-bf16w-1000": dict(batch=1000, channels_last=True, padded=True, bf16_weights=True),
    "autotune-freezing-2048": dict(batch=2048, mode="max-autotune-no-cudagraphs", inductor={"freezing": True}),
}


def mnist_inference(batch: int, channels_last: bool, padded: bool | str = False
                    ) -> tuple[torch.nn.Module, float, torch.Tensor, torch.Tensor]:
    """(default MNIST U-Net with random weights in eval mode on CUDA, forward GFLOP per image, x, t = 500) at `batch`.

    Its GroupNorms take their per-channel form when compiled, as in ddpm.generate.sampling_network;
    `padded`: its image-channel convolutions are padded to 8 channels as there too ("in": the first only).
    """
    torch._dynamo.reset()
    spec = ours("mnist")
    model = use_per_channel_group_norm(spec.build().cuda().eval())
    gflop = forward_flops(model, spec.shape, torch.device("cuda"))[0] / 1e9  # of the unpadded network
    if padded == "in":
        model.input_conv = ChannelPaddedConv2d(model.input_conv)
    elif padded:
        pad_image_channels(model)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    x = torch.randn(batch, *spec.shape, device="cuda").to(memory_format=fmt)
    t = torch.full((batch,), 500, device="cuda", dtype=torch.long)
    return model.to(memory_format=fmt), gflop, x, t


def run(name: str, batch: int, channels_last: bool = False, inductor: dict | None = None,
        mode: str = "default", padded: bool | str = False, bf16_weights: bool = False) -> None:
    import torch._inductor.config as inductor_config
    model, gflop, x, t = mnist_inference(batch, channels_last, padded)
    if bf16_weights:
        cast_weights_for_autocast(model, torch.bfloat16)
    sync = torch.cuda.synchronize
    with inductor_config.patch(inductor or {}):  # compiled lazily: at the first call, inside this block
        net = torch.compile(model, dynamic=False, **({} if mode == "default" else {"mode": mode}))
        g = GraphedDenoiser(net)
        with torch.no_grad(), torch.autocast("cuda", torch.bfloat16, cache_enabled=False):
            _, compile_s = H.timed_once(lambda: g(x, t), sync)
            timing = H.time_windows(lambda: g(x, t), sync, iters=50, windows=3)
    if PROFILE:
        from torch.profiler import ProfilerActivity, profile
        with torch.no_grad(), torch.autocast("cuda", torch.bfloat16, cache_enabled=False), \
                profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(10):
                g(x, t)
            sync()
        print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=25, max_name_column_width=70))
    ms = timing.median_s * 1e3
    print(f"{name:28s} batch {batch:5d}  {ms:7.3f} ms/step  {batch / (50 * ms / 1e3):7.0f} img/s DDIM-50  "
          f"{batch * gflop / ms:6.1f} TFLOP/s  10k DDIM-50 at this rate ~ {10000 / batch * 50 * ms / 1e3:5.2f} s  "
          f"compile+capture {compile_s:5.1f} s", flush=True)


PROFILE = "--profile" in sys.argv

if __name__ == "__main__":
    print(torch.__version__, torch.cuda.get_device_name(), flush=True)
    for name in [a for a in sys.argv[1:] if a != "--profile"] or list(VARIANTS):
        try:
            run(name, **VARIANTS[name])
        except Exception as exc:  # one failing variant must not cost the others
            print(f"{name:28s} failed: {type(exc).__name__}: {str(exc)[:300]}", flush=True)
