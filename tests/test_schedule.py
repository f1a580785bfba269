import dataclasses
import math

import pytest
import torch

from ddpm.config import DiffusionConfig
from ddpm.schedule import Schedule, cosine_beta_schedule, extract, linear_beta_schedule, q_sample, split_prediction


def test_linear_alpha_bar_matches_the_seed_code():
    # The seed's code with T=200, evaluated by hand; its plot's figures (ending at 0.096) do not follow from it.
    s = Schedule.from_betas(linear_beta_schedule(200))
    expected = [0.9999, 0.977, 0.917, 0.827, 0.717, 0.596, 0.477, 0.366, 0.270, 0.191, 0.132]
    got = s.alphas_cumprod[[0, 20, 40, 60, 80, 100, 120, 140, 160, 180, 199]]
    assert torch.allclose(got, torch.tensor(expected), atol=1e-3)


def test_linear_alpha_bar_is_the_product_of_alphas():
    betas = [1e-4 + i * (0.02 - 1e-4) / 199 for i in range(200)]
    prod = 1.0
    s = Schedule.from_betas(linear_beta_schedule(200))
    for t, b in enumerate(betas):
        prod *= 1 - b
        assert abs(s.alphas_cumprod[t].item() - prod) < 1e-6


def test_cosine_matches_its_closed_form():
    T, s_ = 1000, 0.008
    sch = Schedule.from_betas(cosine_beta_schedule(T, s_))
    f = lambda t: math.cos((t / T + s_) / (1 + s_) * math.pi / 2) ** 2
    for t in [0, 10, 250, 500, 900]:  # away from the clipped end
        assert sch.alphas_cumprod[t].item() == pytest.approx(f(t + 1) / f(0), rel=1e-5)
    assert sch.betas.max().item() == pytest.approx(0.999)  # clipped at the end


def test_precomputed_arrays_follow_the_paper():
    s = Schedule.from_config(DiffusionConfig(timesteps=50))
    # Reference in float64 from the betas alone (float32 inputs would lose 1 - alpha_bar near t = 0).
    b = torch.linspace(1e-4, 0.02, 50, dtype=torch.float64)
    a = 1 - b
    ab = torch.cumprod(a, 0)
    abp = torch.cat([torch.ones(1, dtype=torch.float64), ab[:-1]])
    assert s.alphas_cumprod_prev[0] == 1 and torch.allclose(s.alphas_cumprod_prev[1:], s.alphas_cumprod[:-1])
    assert torch.allclose(s.posterior_variance.double(), b * (1 - abp) / (1 - ab), rtol=1e-5)
    assert torch.allclose(s.posterior_mean_coef1.double(), b * abp.sqrt() / (1 - ab), rtol=1e-5)
    assert torch.allclose(s.posterior_mean_coef2.double(), (1 - abp) * a.sqrt() / (1 - ab), rtol=1e-5)
    assert s.posterior_variance[0] == 0
    assert s.posterior_log_variance_clipped[0] == s.posterior_log_variance_clipped[1]
    assert all(getattr(s, n).dtype == torch.float32 for n in ("betas", "alphas_cumprod", "posterior_variance"))


def test_schedule_is_immutable():
    s = Schedule.from_config(DiffusionConfig(timesteps=10))
    with pytest.raises(dataclasses.FrozenInstanceError, match="'betas'"):
        s.betas = torch.zeros(10)


def test_extract_shapes_and_values():
    a = torch.arange(10.0)
    t = torch.tensor([0, 9, 3])
    out = extract(a, t, (3, 1, 28, 28))
    assert out.shape == (3, 1, 1, 1) and out.flatten().tolist() == [0.0, 9.0, 3.0]


def test_q_sample_moments():
    torch.manual_seed(0)
    s = Schedule.from_config(DiffusionConfig(timesteps=100))
    x0 = torch.linspace(-1, 1, 16).reshape(1, 1, 4, 4)
    for t_val in [0, 30, 99]:
        t = torch.full((20000,), t_val)
        xt = q_sample(s, x0.expand(20000, -1, -1, -1), t)
        ab = s.alphas_cumprod[t_val]
        assert torch.allclose(xt.mean(0), ab.sqrt() * x0[0], atol=0.03)
        assert torch.allclose(xt.var(0), (1 - ab).expand(1, 4, 4), atol=0.03, rtol=0.05)


@pytest.mark.parametrize("prediction", ["eps", "v", "x0"])
def test_split_prediction_recovers_eps_and_x0(prediction):
    s = Schedule.from_config(DiffusionConfig(timesteps=100))
    x0, eps = torch.rand(4, 1, 5, 5) * 2 - 1, torch.randn(4, 1, 5, 5)
    t = torch.tensor([0, 10, 50, 99])
    xt = q_sample(s, x0, t, eps)
    a, sig = extract(s.sqrt_alphas_cumprod, t, xt.shape), extract(s.sqrt_one_minus_alphas_cumprod, t, xt.shape)
    out = {"eps": eps, "x0": x0, "v": a * eps - sig * x0}[prediction]
    e, x = split_prediction(s, xt, t, out, prediction)
    assert torch.allclose(e, eps, atol=2e-3) and torch.allclose(x, x0, atol=2e-3)
