import pytest
import torch
import torch.nn.functional as F

from ddpm.config import DiffusionConfig, ModelConfig
from ddpm.losses import p_losses
from ddpm.schedule import Schedule
from ddpm.unet import AttentionBlock, UNet, timestep_embedding


@pytest.mark.parametrize("shape", [(1, 28, 28), (3, 32, 32)])
@pytest.mark.parametrize("conditional", [False, True])
def test_unet_output_shape_equals_input(shape, conditional, tiny_model_cfg):
    from dataclasses import replace
    cfg = replace(tiny_model_cfg, class_conditional=conditional, channel_mult=(1, 2, 2), attention_levels=(2,))
    net = UNet(cfg, in_channels=shape[0])
    x = torch.randn(3, *shape)
    t = torch.tensor([0, 500, 999])
    labels = torch.tensor([1, 7, 10]) if conditional else None
    assert net(x, t, labels).shape == x.shape


def test_unconditional_unet_refuses_labels(tiny_model_cfg):
    net = UNet(tiny_model_cfg)
    with pytest.raises(ValueError, match="class-conditional"):
        net(torch.randn(1, 1, 28, 28), torch.tensor([3]), torch.tensor([1]))


def test_timestep_embedding_is_sinusoidal():
    emb = timestep_embedding(torch.tensor([0, 7]), 8)
    assert emb.shape == (2, 8)
    assert torch.allclose(emb[0], torch.tensor([1.0] * 4 + [0.0] * 4))
    freqs = torch.exp(-torch.log(torch.tensor(10000.0)) * torch.arange(4) / 4)
    assert torch.allclose(emb[1, :4], torch.cos(7 * freqs)) and torch.allclose(emb[1, 4:], torch.sin(7 * freqs))


def test_p_losses_is_mse_between_noise_and_prediction():
    s = Schedule.from_config(DiffusionConfig(timesteps=100))
    x0, noise, t = torch.rand(4, 1, 6, 6), torch.randn(4, 1, 6, 6), torch.tensor([1, 20, 50, 99])
    zero = lambda x, t: torch.zeros_like(x)
    assert p_losses(zero, s, x0, t, noise).item() == pytest.approx(noise.pow(2).mean().item(), rel=1e-5)
    assert p_losses(zero, s, x0, t, noise, prediction="x0").item() == pytest.approx(x0.pow(2).mean().item(), rel=1e-5)


def test_min_snr_weights_clamp_the_snr():
    s = Schedule.from_config(DiffusionConfig(timesteps=1000))
    x0, noise = torch.rand(2, 1, 4, 4), torch.randn(2, 1, 4, 4)
    zero = lambda x, t: torch.zeros_like(x)
    t = torch.tensor([0, 0])  # SNR ~ 1e4, far above gamma = 5: weight gamma / snr for eps
    snr = s.alphas_cumprod[0] / (1 - s.alphas_cumprod[0])
    plain = p_losses(zero, s, x0, t, noise)
    weighted = p_losses(zero, s, x0, t, noise, weighting="min_snr", min_snr_gamma=5.0)
    assert weighted.item() == pytest.approx(plain.item() * 5.0 / snr.item(), rel=1e-4)


@pytest.mark.parametrize("prediction", ["eps", "v"])
def test_small_unet_overfits_a_fixed_batch(prediction):
    torch.manual_seed(0)
    cfg = ModelConfig(base_channels=16, channel_mult=(1, 2), num_res_blocks=1, attention_levels=(), num_heads=1,
                      dropout=0.0, norm_groups=8)
    net = UNet(cfg)
    s = Schedule.from_config(DiffusionConfig(timesteps=100))
    x0 = torch.rand(8, 1, 12, 12) * 2 - 1
    noise, t = torch.randn_like(x0), torch.randint(0, 100, (8,))
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    first = p_losses(net, s, x0, t, noise, prediction=prediction).item()
    for _ in range(150):
        loss = p_losses(net, s, x0, t, noise, prediction=prediction)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.1 * first


def _group_norm_float64(x, groups, weight, bias, eps):
    """GroupNorm from its definition: each group's mean and variance over its (C/G) x H x W values."""
    b, c, h, w = x.shape
    xg = x.double().reshape(b, groups, -1)
    mean, var = xg.mean(-1, keepdim=True), xg.var(-1, unbiased=False, keepdim=True)
    y = ((xg - mean) / torch.sqrt(var + eps)).reshape(b, c, h, w)
    return y * weight.double()[:, None, None] + bias.double()[:, None, None]


@pytest.mark.parametrize("channels_last", [False, True])
def test_compiled_group_norm_matches_the_definition(channels_last):
    from ddpm.layers import GroupNorm, use_per_channel_group_norm
    torch.manual_seed(0)
    norm = GroupNorm(8, 32)
    with torch.no_grad():
        norm.weight.normal_()
        norm.bias.normal_()
    # x: offsets about the spreads; far: offsets 10-100x the spreads, where E[x^2] - E[x]^2 in float32
    # loses digits (GroupNorm's docstring: still below the bf16 rounding of the convolution after it)
    spread = torch.linspace(0.2, 2, 32)[:, None, None]
    x, far = 1 + torch.randn(3, 32, 7, 5) * spread, 20 + torch.randn(3, 32, 7, 5) * spread
    if channels_last:
        x, far = x.to(memory_format=torch.channels_last), far.to(memory_format=torch.channels_last)
    traced = []

    def backend(gm, example_inputs):
        traced.append({str(n.target) for n in gm.graph.nodes if n.op in ("call_function", "call_method")})
        return gm.forward

    for asked, training in ((False, False), (True, True), (True, False)):
        torch._dynamo.reset()
        traced.clear()
        use_per_channel_group_norm(norm, asked).train(training)
        with torch.no_grad():
            net = torch.compile(norm, backend=backend)
            out, out_far = net(x), net(far)
        # the per-channel form sums squares (a method call in dynamo's graph) and calls no group_norm
        per_channel = "square" in traced[0] and not any("group_norm" in t for t in traced[0])
        # only asked for: otherwise (export, other compiles) aten's group_norm
        assert per_channel is asked
        if per_channel:  # (aten's CPU channels-last kernel itself is off by ~2e-3 at the far offset)
            torch.testing.assert_close(out.double(), _group_norm_float64(x, 8, norm.weight, norm.bias, norm.eps),
                                       atol=5e-5, rtol=0)
            torch.testing.assert_close(out_far.double(), _group_norm_float64(far, 8, norm.weight, norm.bias, norm.eps),
                                       atol=2e-3, rtol=0)
    torch._dynamo.reset()
    with torch.no_grad():  # a bf16 model keeps bf16 activations, as with aten's group_norm
        norm, x = norm.to(torch.bfloat16), x.to(torch.bfloat16)
        out = torch.compile(norm, backend=backend)(x)
    assert "square" in traced[-1] and not any("group_norm" in t for t in traced[-1]) and out.dtype == torch.bfloat16
    expected = _group_norm_float64(x, 8, norm.weight, norm.bias, norm.eps)  # of the bf16 values
    torch.testing.assert_close(out.double(), expected, atol=1e-2, rtol=1e-2)  # the bf16 rounding of the output
    torch._dynamo.reset()


@pytest.mark.parametrize("channels_last", [False, True])
def test_compiled_per_channel_group_norm_trains_as_aten_group_norm(channels_last):
    """ddpm.train compiles the model with per-channel GroupNorm statistics: its gradients must be group_norm's."""
    from ddpm.layers import GroupNorm, use_per_channel_group_norm
    torch.manual_seed(1)
    norm = GroupNorm(4, 16).double()
    with torch.no_grad():
        norm.weight.normal_()
        norm.bias.normal_()
    x = (3 + torch.randn(2, 16, 6, 5, dtype=torch.float64)
         * torch.linspace(0.5, 2, 16, dtype=torch.float64)[:, None, None])
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    upstream = torch.randn(2, 16, 6, 5, dtype=torch.float64)
    traced = []

    def backend(gm, example_inputs):
        traced.append({str(n.target) for n in gm.graph.nodes if n.op in ("call_function", "call_method")})
        return torch._dynamo.backends.debugging.aot_eager(gm, example_inputs)

    grads = []
    for per_channel in (False, True):
        torch._dynamo.reset()
        use_per_channel_group_norm(norm, per_channel).train()
        norm.zero_grad(set_to_none=True)
        xi = x.clone().requires_grad_(True)
        net = torch.compile(norm, backend=backend) if per_channel else norm
        (net(xi) * upstream).sum().backward()
        grads.append((xi.grad, norm.weight.grad, norm.bias.grad))
    assert "square" in traced[0] and not any("group_norm" in c for c in traced[0])
    for got, want in zip(grads[1], grads[0]):
        torch.testing.assert_close(got, want, atol=1e-10, rtol=1e-9)
    use_per_channel_group_norm(norm, False)
    torch._dynamo.reset()


@pytest.mark.parametrize("channels_last", [False, True])
def test_compiled_nearest_upsample_is_aten_upsample(channels_last):
    """Compiled, NearestUpsample2x broadcasts instead of calling aten's upsample: same values, same gradients,
    same memory format."""
    from ddpm.layers import NearestUpsample2x
    torch.manual_seed(2)
    x = torch.randn(2, 8, 7, 5)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    x.requires_grad_(True)
    want = F.interpolate(x, scale_factor=2, mode="nearest")
    upstream = torch.randn_like(want)
    (want_grad,) = torch.autograd.grad((want * upstream).sum(), x)
    traced = []

    def backend(gm, example_inputs):
        traced.append({str(n.target) for n in gm.graph.nodes if n.op in ("call_function", "call_method")})
        return gm.forward

    torch._dynamo.reset()
    got = torch.compile(NearestUpsample2x(), backend=backend)(x)
    (got_grad,) = torch.autograd.grad((got * upstream).sum(), x)
    assert not any("interpolate" in t or "upsample" in t for t in traced[0])
    assert torch.equal(got, want)
    torch.testing.assert_close(got_grad, want_grad, atol=1e-6, rtol=1e-6)  # four copies summed in another order
    assert got.is_contiguous(memory_format=torch.channels_last) is channels_last
    assert torch.equal(NearestUpsample2x()(x), want)  # eager: aten's kernel
    torch._dynamo.reset()


def _mueller_hash(word: int) -> int:
    """T. Mueller's 32-bit integer hash in Python integers, independent of the tensor code."""
    for _ in range(2):
        word = ((word ^ (word >> 16)) * 0x45D9F3B) % 2**32
    return word ^ (word >> 16)


@pytest.mark.parametrize("channels_last", [False, True])
def test_hashed_dropout_masks_follow_the_hash_and_drop_p(channels_last):
    """ddpm.layers.hashed_dropout keeps the element at memory offset i when hash((i + seed) mod 2**32) >=
    p * 2**32, scales the rest by 1 / (1 - p), writes its output in x's layout, passes the same mask to the
    gradient, and draws a fresh seed per call."""
    from ddpm.layers import hashed_dropout, mask_hash
    words = [0, 1, 2, 65535, 65536, 12345678, 2**31, 2**32 - 1]
    assert mask_hash(torch.tensor(words)).tolist() == [_mueller_hash(w) for w in words]
    torch.manual_seed(0)
    p, seed = 0.1, 2**32 - 5  # offset + seed wraps past 2**32 at offset 5
    x = torch.randn(4, 8, 28, 28)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    x.requires_grad_(True)
    y = hashed_dropout(x, p, torch.tensor(seed))
    assert y.stride() == x.stride()
    in_memory = y.detach().as_strided((y.numel(),), (1,))  # y and x in memory order
    x_memory = x.detach().as_strided((x.numel(),), (1,))
    kept = torch.tensor([_mueller_hash((i + seed) % 2**32) >= round(p * 2**32) for i in range(x.numel())])
    torch.testing.assert_close(in_memory, torch.where(kept, x_memory / (1 - p), 0.0))
    y.backward(torch.ones_like(y))
    torch.testing.assert_close(x.grad, (y != 0).float() / (1 - p))
    big = torch.ones(64, 64, 28, 28)
    keep = hashed_dropout(big, p) != 0
    n = keep.numel()
    assert abs(keep.float().mean().item() - (1 - p)) < 5 * (p * (1 - p) / n) ** 0.5
    per_channel = keep.float().mean((0, 2, 3))
    assert (per_channel - (1 - p)).abs().max().item() < 5 * (p * (1 - p) / (n / 64)) ** 0.5
    k = keep.float()
    for a, b in ((k[..., 1:], k[..., :-1]), (k[:, 1:], k[:, :-1]), (k[1:], k[:-1])):  # neighbours in w, c, batch
        assert abs(torch.corrcoef(torch.stack([a.flatten(), b.flatten()]))[0, 1].item()) < 5 / a.numel() ** 0.5
    other = hashed_dropout(big, p) != 0  # a new seed: another mask, independent of the first
    assert abs((other != keep).float().mean().item() - 2 * p * (1 - p)) < 0.01


def test_dropout_takes_the_hashed_mask_only_when_asked_compiled_and_training():
    from ddpm.layers import Dropout, use_hashed_dropout
    traced = []

    def backend(gm, example_inputs):
        traced.append({str(n.target) for n in gm.graph.nodes if n.op == "call_function"})
        return torch._dynamo.backends.debugging.aot_eager(gm, example_inputs)

    x = torch.randn(2, 4, 8, 8)
    for asked, training in ((True, True), (False, True), (True, False)):
        torch._dynamo.reset()
        traced.clear()
        drop = use_hashed_dropout(Dropout(0.1), asked).train(training)
        y = torch.compile(drop, backend=backend)(x)
        hashed = any("arange" in c for c in traced[0])
        assert hashed is (asked and training), traced[0]
        assert torch.equal(y, x) if not training else ((y == 0) | torch.isclose(y, x / 0.9)).all()
        if training:  # 512 elements: 51 dropped on average, 5 sigma from 0 and from everything
            assert 20 < (y == 0).sum().item() < 90
    torch._dynamo.reset()
    assert torch.equal(use_hashed_dropout(Dropout(0.1)).eval()(x), x)


def test_hashed_dropout_makes_other_layouts_contiguous():
    """An input that is neither contiguous nor channels-last (a transposed or expanded view) is made
    contiguous, so no two elements share an offset and hence a mask value."""
    from ddpm.layers import hashed_dropout
    base = torch.ones(8, 1, 16, 16)
    expanded = base.expand(8, 32, 16, 16)  # stride 0 over channels: one offset per pixel
    y = hashed_dropout(expanded, 0.5, torch.tensor(12345))
    assert y.is_contiguous()
    assert not torch.equal(y[:, 0], y[:, 1])  # channels dropped independently
    t = torch.randn(16, 24).t()
    assert torch.equal(hashed_dropout(t, 0.5, torch.tensor(7)), hashed_dropout(t.contiguous(), 0.5, torch.tensor(7)))


@pytest.mark.parametrize("in_channels", [1, 3])
def test_compiled_channels_last_unet_trains_as_the_eager_model(in_channels):
    """The pieces ddpm.train compiles with train.channels_last (per-channel GroupNorm statistics, broadcast
    upsampling, channels-last gradients, image-channel convolutions padded to 8 channels) leave the loss
    and every gradient as the eager NCHW model's."""
    import copy

    from ddpm.layers import use_padded_image_convs, use_per_channel_group_norm
    torch.manual_seed(0)
    model = UNet(ModelConfig(base_channels=16, channel_mult=(1, 2), attention_levels=(1,), norm_groups=8,
                             num_heads=2, dropout=0.0), in_channels=in_channels)
    for p in model.parameters():  # zero-initialised layers would give most parameters no gradient
        torch.nn.init.normal_(p, std=0.05)
    fast = use_padded_image_convs(use_per_channel_group_norm(
        copy.deepcopy(model).to(memory_format=torch.channels_last)))
    s = Schedule.from_config(DiffusionConfig())
    x0 = torch.rand(4, in_channels, 28, 28) * 2 - 1
    t, noise = torch.randint(0, 1000, (4,)), torch.randn_like(x0)
    traced, conv_channels = [], []

    def backend(gm, example_inputs):
        traced.append({str(n.target) for n in gm.graph.nodes if n.op in ("call_function", "call_method")})
        conv_channels.extend((n.args[0].meta["example_value"].shape[1], n.meta["example_value"].shape[1])
                             for n in gm.graph.nodes if n.target is F.conv2d)
        return torch._dynamo.backends.debugging.aot_eager(gm, example_inputs)

    torch._dynamo.reset()
    want = p_losses(model, s, x0, t, noise)
    want.backward()
    got = p_losses(torch.compile(fast, backend=backend), s, x0.contiguous(memory_format=torch.channels_last), t, noise)
    got.backward()
    torch._dynamo.reset()
    calls = set().union(*traced)
    assert any("_ChannelsLastGrad" in c or "autograd_function_apply" in c for c in calls), calls
    assert "square" in calls and not any("group_norm" in c or "interpolate" in c for c in calls), calls
    assert {(8, 16), (16, 8)} <= set(conv_channels), conv_channels  # the image convolutions, padded
    assert not {(in_channels, 16), (16, in_channels)} & set(conv_channels), conv_channels
    # float32 both ways, convolutions in another memory order and GroupNorm reduced in another order
    torch.testing.assert_close(got, want, rtol=1e-5, atol=0)
    for a, b in zip(fast.parameters(), model.parameters()):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-4, atol=1e-5 * b.grad.abs().max().item() + 1e-8)


@pytest.mark.parametrize("channels_last", [False, True])
def test_attention_takes_a_fused_sdpa_kernel_and_equals_softmax_attention(channels_last):
    """From NCHW and channels-last inputs alike, q/k/v reach SDPA contiguous per head (its flash kernel
    refuses strided ones), and the block computes x + proj(softmax(q k^T / sqrt(d)) v) per head."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    torch.manual_seed(0)
    block = AttentionBlock(16, num_heads=2, groups=4)
    torch.nn.init.normal_(block.proj.weight)  # zero-initialised: the attention would not show
    x = torch.randn(2, 16, 5, 3)
    if channels_last:
        x, block = x.to(memory_format=torch.channels_last), block.to(memory_format=torch.channels_last)
    with torch.no_grad(), sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        out = block(x)
        qkv = block.qkv(block.norm(x)).double().reshape(2, 3, 2, 8, 15)  # [B, q/k/v, heads, C/heads, HW]
        q, k, v = qkv.unbind(dim=1)
        weights = torch.softmax(q.transpose(-1, -2) @ k / 8 ** 0.5, dim=-1)  # [B, heads, HW (query), HW (key)]
        attended = (v @ weights.transpose(-1, -2)).reshape(2, 16, 5, 3)  # [B, C, H, W]
        expected = x.double() + torch.nn.functional.conv2d(attended, block.proj.weight.double(),
                                                           block.proj.bias.double())
    torch.testing.assert_close(out.double(), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("in_channels", [1, 3])
def test_channel_padded_image_convolutions_give_the_same_network(in_channels, tiny_model_cfg):
    """The sampling copy's first and last convolutions, zero-padded to 8 channels, compute the same function."""
    import copy
    from ddpm.layers import ChannelPaddedConv2d
    from ddpm.unet import pad_image_channels
    torch.manual_seed(0)
    model = UNet(tiny_model_cfg, in_channels=in_channels).eval()
    for p in model.parameters():  # the last convolution is zero-initialised: its padding would not show
        torch.nn.init.normal_(p, std=0.2)
    padded = pad_image_channels(copy.deepcopy(model)).to(memory_format=torch.channels_last)
    assert isinstance(padded.input_conv, ChannelPaddedConv2d) and padded.input_conv.weight.shape[1] == 8
    assert padded.out[-1].weight.shape[0] == 8 and not padded.out[-1].weight[in_channels:].any()
    x, t = torch.randn(4, in_channels, 32, 32), torch.tensor([0, 10, 500, 999])
    with torch.no_grad():
        expected, out = model(x, t), padded(x, t)
    assert out.shape == expected.shape == x.shape
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="groups=1"):
        ChannelPaddedConv2d(torch.nn.Conv2d(4, 4, 3, groups=2))
