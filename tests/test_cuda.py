"""CUDA paths: run on the GPU machine (`pytest -m cuda`); skipped where there is no CUDA device."""

import pytest
import torch

from ddpm.config import DiffusionConfig, ModelConfig
from ddpm.graphed import GraphedDenoiser
from ddpm.samplers import ddim_sample_loop
from ddpm.schedule import Schedule
from ddpm.unet import UNet

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


def test_graph_replay_equals_eager():
    torch.manual_seed(0)
    model = UNet(ModelConfig(base_channels=32, class_conditional=True)).cuda().eval()
    graphed = GraphedDenoiser(model)
    for _ in range(3):  # capture, then replays with new inputs
        x, t = torch.randn(16, 1, 28, 28, device="cuda"), torch.randint(0, 1000, (16,), device="cuda")
        y = torch.randint(0, 11, (16,), device="cuda")
        with torch.no_grad():
            assert torch.allclose(graphed(x, t, y), model(x, t, y), atol=1e-5)


def test_graphed_ddim_matches_eager_ddim_in_bf16():
    torch.manual_seed(0)
    model = UNet(ModelConfig(base_channels=32)).cuda().eval()
    s = Schedule.from_config(DiffusionConfig()).to("cuda")
    x_T = torch.randn(64, 1, 28, 28, device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16, cache_enabled=False):
        a = ddim_sample_loop(GraphedDenoiser(model), s, x_T, steps=20)
        b = ddim_sample_loop(model, s, x_T, steps=20)
    assert (a - b).abs().max().item() < 1e-2
