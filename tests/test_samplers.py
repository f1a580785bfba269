import pytest
import torch

from ddpm.config import DiffusionConfig
from ddpm.samplers import ddim_sample_loop, ddim_timesteps, guided, p_sample, p_sample_loop
from ddpm.schedule import Schedule


def _schedule(T=50):
    return Schedule.from_config(DiffusionConfig(timesteps=T))


class LinearNet(torch.nn.Module):
    """A fixed stand-in for eps_theta: eps = 0.3 * x + 0.001 * t."""

    def forward(self, x, t, labels=None):
        return 0.3 * x + 0.001 * t.float().reshape(-1, 1, 1, 1)


def test_p_sample_is_equation_11():
    s = _schedule()
    net = LinearNet()
    torch.manual_seed(0)
    x = torch.randn(3, 1, 4, 4)
    z = torch.randn_like(x)
    for t_index in [0, 1, 25, 49]:
        t = torch.full((3,), t_index)
        out, _ = p_sample(net, s, x, t, t_index, clip_denoised=False, noise=z)
        # Eq. 11 and Algorithm 2, computed from the betas alone in float64.
        betas = torch.linspace(1e-4, 0.02, 50, dtype=torch.float64)
        alpha = 1 - betas[t_index]
        abar = torch.prod(1 - betas[: t_index + 1])
        abar_prev = torch.prod(1 - betas[:t_index]) if t_index > 0 else torch.tensor(1.0, dtype=torch.float64)
        eps = net(x.double(), t)
        mean = (x.double() - betas[t_index] / (1 - abar).sqrt() * eps) / alpha.sqrt()
        sigma = (betas[t_index] * (1 - abar_prev) / (1 - abar)).sqrt() if t_index > 0 else 0.0
        assert torch.allclose(out.double(), mean + sigma * z.double(), atol=1e-5), t_index


def test_p_sample_beta_variance():
    s = _schedule()
    x = torch.zeros(2, 1, 3, 3)
    z = torch.ones_like(x)
    zero_net = lambda x, t, labels=None: torch.zeros_like(x)
    out, _ = p_sample(zero_net, s, x, torch.full((2,), 10), 10, clip_denoised=False, noise=z, variance="beta")
    assert torch.allclose(out, s.betas[10].sqrt().expand_as(out), atol=1e-6)


def test_ddim_eta1_all_steps_equals_ddpm_marginal_variance():
    """With eta=1 and every step, DDIM's per-step variance is beta_tilde, so the marginals match DDPM."""
    s = _schedule(40)
    net = lambda x, t, labels=None: 0.5 * x  # a non-trivial but fixed predictor
    gen = torch.Generator().manual_seed(0)
    x_T = torch.randn(20000, 1, 1, 1, generator=gen)
    a = p_sample_loop(net, s, x_T, clip_denoised=False, generator=torch.Generator().manual_seed(1))
    b = ddim_sample_loop(net, s, x_T, clip_denoised=False, steps=40, eta=1.0,
                         generator=torch.Generator().manual_seed(2))
    assert a.var().item() == pytest.approx(b.var().item(), rel=0.05)
    assert a.mean().item() == pytest.approx(b.mean().item(), abs=0.03)
    # Same noise -> same path (the update is algebraically the same).
    noise = [torch.randn_like(x_T[:8]) for _ in range(40)]
    a8 = p_sample_loop(net, s, x_T[:8], clip_denoised=False, step_noise=noise)
    b8 = ddim_sample_loop(net, s, x_T[:8], clip_denoised=False, steps=40, eta=1.0, step_noise=noise)
    assert torch.allclose(a8, b8, atol=1e-4)


def test_ddim_eta0_is_deterministic():
    s = _schedule(100)
    net = LinearNet()
    x_T = torch.randn(4, 1, 4, 4)
    a = ddim_sample_loop(net, s, x_T, steps=10, eta=0.0, generator=torch.Generator().manual_seed(1))
    b = ddim_sample_loop(net, s, x_T, steps=10, eta=0.0, generator=torch.Generator().manual_seed(2))
    assert torch.equal(a, b)


def test_ddim_timesteps():
    assert ddim_timesteps(1000, 50)[:3] == [980, 960, 940] and ddim_timesteps(1000, 50)[-1] == 0
    assert ddim_timesteps(10, 10) == list(range(9, -1, -1))
    with pytest.raises(ValueError, match="steps"):
        ddim_timesteps(10, 11)


def test_trajectory_starts_at_noise_and_ends_at_sample():
    s = _schedule(20)
    x_T = torch.randn(2, 1, 4, 4)
    x0, traj = p_sample_loop(LinearNet(), s, x_T, return_trajectory=True, generator=torch.Generator().manual_seed(0))
    assert torch.equal(traj[0], x_T) and torch.equal(traj[-1], x0) and len(traj) == 11
    x0, traj = ddim_sample_loop(LinearNet(), s, x_T, return_trajectory=True, steps=5)
    assert len(traj) == 6 and torch.equal(traj[-1], x0)


def test_classifier_free_guidance_combines_branches():
    calls = []

    def net(x, t, labels):
        calls.append(labels.clone())
        return torch.where(labels.reshape(-1, 1, 1, 1) == 10, torch.zeros_like(x), torch.ones_like(x))

    g = guided(net, null_label=10, guidance_scale=3.0)
    out = g(torch.zeros(2, 1, 2, 2), torch.tensor([5, 5]), torch.tensor([7, 7]))
    assert torch.allclose(out, torch.full_like(out, 3.0))  # 0 + 3 * (1 - 0)
    assert calls[-1].tolist() == [7, 7, 10, 10]
