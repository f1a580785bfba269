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


def test_compiled_generate_matches_graph_mode_and_pads_the_last_batch(monkeypatch):
    import dataclasses

    import ddpm.generate as generate_mod
    from ddpm.config import config_from_dict

    torch.manual_seed(0)
    cfg = config_from_dict({"model": {"base_channels": 16, "channel_mult": [1, 2], "attention_levels": [1],
                                      "norm_groups": 8, "num_heads": 2, "class_conditional": True},
                            "runtime": {"bf16": False}, "sample": {"batch_size": 4},
                            "sampler": {"steps": 4}})
    model = UNet(cfg.model).cuda()
    for mod in model.modules():  # zero-initialised output layers would make every network output 0
        if isinstance(mod, (torch.nn.Conv2d, torch.nn.Linear)) and not mod.weight.any():
            mod.reset_parameters()
    batches: list[int] = []  # the batch of every network call
    real_network = generate_mod.sampling_network

    def spying(*args, **kwargs):
        net = real_network(*args, **kwargs)
        return lambda x, t, labels=None: (batches.append(x.shape[0]), net(x, t, labels))[1]
    monkeypatch.setattr(generate_mod, "sampling_network", spying)

    s = Schedule.from_config(cfg.diffusion)
    graphed, graphed_labels = generate_mod.generate(model, s, cfg, 6, seed=1)  # batches of 4 and 2
    assert batches == [4] * 4 + [2] * 4
    batches.clear()
    compiled_cfg = dataclasses.replace(cfg, sample=dataclasses.replace(cfg.sample, compile=True))
    compiled, compiled_labels = generate_mod.generate(model, s, compiled_cfg, 6, seed=1)
    assert batches == [4] * 8  # the batch of 2 was padded to 4: one compiled shape
    assert graphed.shape == compiled.shape == (6, 1, 28, 28) and compiled.dtype == torch.uint8
    assert torch.equal(graphed_labels, compiled_labels) and compiled_labels.tolist() == [0, 1, 2, 3, 4, 5]
    assert (graphed.int() - compiled.int()).abs().max().item() <= 2  # fp32: rounding of fused kernels only
    assert next(model.parameters()).is_contiguous()  # the channels-last copy left the model alone
    images, _, trajectory = generate_mod.generate(model, s, compiled_cfg, 3, seed=1, return_trajectory=True)
    assert images.shape[0] == 3 and all(frame.shape[0] == 3 for frame in trajectory)  # padding removed


def test_compiled_sampling_network_in_bf16_matches_the_model_under_autocast():
    """sample.compile's copy (channels-last, padded image convolutions, per-channel GroupNorm, weights cast
    to bf16 once) computes what the model computes under bf16 autocast, and leaves the model as it was."""
    from ddpm.generate import sampling_network
    torch.manual_seed(0)
    model = UNet(ModelConfig(base_channels=32, norm_groups=8, class_conditional=True)).cuda().eval()
    for p in model.parameters():  # zero-initialised layers would hide most of the network
        torch.nn.init.normal_(p, std=0.05)
    net = sampling_network(model, torch.device("cuda"), cuda_graphs=True, compile=True, autocast_dtype=torch.bfloat16)
    inner = net.model._orig_mod  # the copy torch.compile wraps
    assert inner.input_conv.weight.dtype == inner.time_mlp[0].weight.dtype == torch.bfloat16
    assert inner.label_emb.weight.dtype == inner.out[0].weight.dtype == torch.float32  # autocast leaves these alone
    x, t = torch.randn(8, 1, 28, 28, device="cuda"), torch.randint(0, 1000, (8,), device="cuda")
    y = torch.randint(0, 11, (8,), device="cuda")
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16, cache_enabled=False):
        out, expected = net(x, t, y), model(x, t, y)
    with torch.no_grad():
        reference = model(x, t, y)  # float32 (cuDNN's TF32 convolutions, torch's default)
    assert out.shape == x.shape and out.dtype == expected.dtype == torch.bfloat16
    bf16_error = (expected.float() - reference).abs().max().item()
    assert (out.float() - reference).abs().max().item() <= 2 * bf16_error + 1e-3  # bf16's own rounding, no more
    assert all(p.dtype == torch.float32 and p.is_contiguous() for p in model.parameters())


def test_compiled_channels_last_training_step_matches_eager():
    """The model ddpm.train compiles with train.compile and train.channels_last (channels-last memory,
    per-channel GroupNorm statistics, broadcast upsampling, channels-last gradients, padded image
    convolutions), through inductor with ddpm.train's options for a CUDA-graph step (recomputation,
    multi-kernel reductions), gives the loss and gradients of the eager NCHW model; in float32 without
    TF32, so that the comparison is tight (training itself runs under bf16 autocast in a CUDA graph)."""
    import copy

    from ddpm.layers import use_padded_image_convs, use_per_channel_group_norm
    from ddpm.losses import p_losses
    from ddpm.train_compile import compile_options
    torch.manual_seed(0)
    model = UNet(ModelConfig(base_channels=16, channel_mult=(1, 2), attention_levels=(1,), norm_groups=8,
                             num_heads=2, dropout=0.0)).cuda().train()
    for p in model.parameters():  # zero-initialised layers would give most parameters no gradient
        torch.nn.init.normal_(p, std=0.05)
    fast = use_padded_image_convs(use_per_channel_group_norm(
        copy.deepcopy(model).to(memory_format=torch.channels_last)))
    s = Schedule.from_config(DiffusionConfig()).to("cuda")
    x0 = torch.rand(8, 1, 28, 28, device="cuda") * 2 - 1
    t, noise = torch.randint(0, 1000, (8,), device="cuda"), torch.randn_like(x0)

    def loss_and_grads(net, owner, x):
        loss = p_losses(net, s, x, t, noise)
        loss.backward()
        return loss.item(), [p.grad for p in owner.parameters()]

    tf32 = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        want_loss, want = loss_and_grads(model, model, x0)
        got_loss, got = loss_and_grads(torch.compile(fast, dynamic=False, options=compile_options(True)), fast,
                                       x0.contiguous(memory_format=torch.channels_last))
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = tf32
    assert got_loss == pytest.approx(want_loss, rel=1e-4)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-3, atol=1e-3 * w.abs().max().item() + 1e-7)


def test_compiled_hashed_dropout_on_cuda_gives_the_eager_cpu_mask():
    """Through inductor on the GPU, hashed_dropout's integer hash gives exactly the mask that eager PyTorch
    computes on the CPU for the same seed and layout, and its gradient carries that mask."""
    from ddpm.layers import hashed_dropout
    x = torch.randn(16, 64, 28, 28).contiguous(memory_format=torch.channels_last)
    seed = torch.tensor(3_000_000_000)
    want = hashed_dropout(x, 0.1, seed)
    xc = x.cuda().requires_grad_(True)
    try:
        got = torch.compile(hashed_dropout, dynamic=False)(xc, 0.1, seed.cuda())
        got.backward(torch.ones_like(got))
    finally:
        torch._dynamo.reset()
    assert torch.equal(got.detach().cpu() != 0, want != 0)
    assert abs((want != 0).float().mean().item() - 0.9) < 0.002
    torch.testing.assert_close(got.detach().cpu(), want)
    torch.testing.assert_close(xc.grad.cpu(), (want != 0).float() / 0.9)


def test_compiled_dropout_draws_a_new_mask_at_each_cuda_graph_replay():
    """As ddpm.train runs it: the compiled Dropout (its seed drawn inside the compiled graph) captured in a
    CUDA graph draws a new mask at every replay, and the backward in the same graph uses the forward's."""
    from ddpm.layers import Dropout, use_hashed_dropout
    drop = torch.compile(use_hashed_dropout(Dropout(0.1)).cuda().train(), dynamic=False)
    x = torch.randn(8, 64, 28, 28, device="cuda").contiguous(memory_format=torch.channels_last).requires_grad_(True)
    try:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(3):  # eager warm-up, as ddpm.train does before capture
                x.grad = None
                drop(x).sum().backward()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        x.grad = None
        with torch.cuda.graph(graph):
            y = drop(x)
            y.sum().backward()
        masks = []
        for _ in range(2):
            graph.replay()
            torch.cuda.synchronize()
            masks.append(y != 0)
            torch.testing.assert_close(x.grad, masks[-1].float() / 0.9)
    finally:
        torch._dynamo.reset()
    assert abs(masks[0].float().mean().item() - 0.9) < 0.005
    assert abs((masks[0] != masks[1]).float().mean().item() - 2 * 0.1 * 0.9) < 0.01  # independent draws


_COMPILED_STEP = """
import json, torch
from torch._dynamo.utils import counters
from ddpm.config import DiffusionConfig, ModelConfig
from ddpm.losses import p_losses
from ddpm.schedule import Schedule
from ddpm.train_compile import compile_options
from ddpm.layers import use_hashed_dropout, use_padded_image_convs, use_per_channel_group_norm
from ddpm.unet import UNet
torch.manual_seed(0)
model = UNet(ModelConfig(base_channels=16, channel_mult=(1, 2), attention_levels=(1,), norm_groups=8, num_heads=2,
                         dropout=0.1)).cuda().train()
model = use_padded_image_convs(use_hashed_dropout(use_per_channel_group_norm(model))).to(
    memory_format=torch.channels_last)
net = torch.compile(model, dynamic=False, options=compile_options(True))
s = Schedule.from_config(DiffusionConfig()).to("cuda")
x0 = (torch.rand(8, 1, 28, 28, device="cuda") * 2 - 1).contiguous(memory_format=torch.channels_last)
t, noise = torch.randint(0, 1000, (8,), device="cuda"), torch.randn_like(x0)
with torch.autocast("cuda", dtype=torch.bfloat16, cache_enabled=False):
    loss = p_losses(net, s, x0, t, noise)
loss.backward()
print(json.dumps({"loss": loss.item(), "hits": counters["inductor"]["fxgraph_cache_hit"]}))
"""


def test_compiled_training_step_runs_again_from_a_warm_compile_cache(tmp_path):
    """A second process compiling the same training step with compile_options(True) (multi-kernel reductions)
    is served from inductor's on-disk cache and runs: with torch 2.11 reading back the record of which
    multi-kernel variant won failed with a TypeError, so a second `ddpm train` on one machine stopped."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    env = {k: v for k, v in os.environ.items()
           if k not in ("TORCHINDUCTOR_DISABLE_MULTI_KERNEL_CACHE", "TORCHINDUCTOR_FORCE_DISABLE_CACHES")}
    env.update(TORCHINDUCTOR_CACHE_DIR=str(tmp_path / "inductor"), TRITON_CACHE_DIR=str(tmp_path / "triton"),
               TORCHINDUCTOR_FX_GRAPH_CACHE="1", PYTHONPATH=os.pathsep.join([str(root), env.get("PYTHONPATH", "")]))
    runs = []
    for _ in range(2):
        done = subprocess.run([sys.executable, "-c", _COMPILED_STEP], env=env, cwd=root, capture_output=True,
                              text=True, timeout=600)
        assert done.returncode == 0, done.stderr[-3000:]
        runs.append(json.loads(done.stdout.strip().splitlines()[-1]))
    generated = [p.read_text() for p in (tmp_path / "inductor").rglob("*.py")]
    assert any("multi_kernel(" in code for code in generated)  # the compiled step has multi-kernel reductions
    assert not list((tmp_path / "inductor").rglob("*.picked_kernel"))  # no record of the choice (any torch)
    assert runs[0]["hits"] == 0 and runs[1]["hits"] > 0
    assert runs[1]["loss"] == pytest.approx(runs[0]["loss"], rel=1e-3)  # each process times the variants anew


def test_graphed_training_step_matches_the_eager_step():
    """ddpm.train_step as `train.cuda_graphs` runs it (eager steps on a side stream, one capture, replays that
    read the warming-up learning rate and EMA decay from device tensors, label dropout drawn eagerly) gives
    the losses, weights and EMA of the eager step from the same seeds; in float32 without TF32."""
    from ddpm.config import config_from_dict
    from ddpm.train_step import TrainData, TrainState, make_train_step
    cfg = config_from_dict({"model": {"base_channels": 16, "channel_mult": [1, 2], "attention_levels": [1],
                                      "norm_groups": 8, "num_heads": 2, "dropout": 0.0, "class_conditional": True},
                            "diffusion": {"timesteps": 100},
                            "runtime": {"bf16": False},
                            "train": {"batch_size": 8, "warmup_steps": 4, "ema_decay": 0.99,
                                      "label_dropout": 0.5}})
    gen = torch.Generator().manual_seed(0)
    data = TrainData(torch.randint(0, 256, (64, 1, 28, 28), generator=gen, dtype=torch.uint8).cuda(),
                     (torch.arange(64) % 10).cuda())
    schedule = Schedule.from_config(cfg.diffusion).to("cuda")
    runs = []
    tf32 = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        for graphed in (False, True):
            torch.manual_seed(0)
            model = UNet(cfg.model).cuda().train()
            for p in model.parameters():  # zero-initialised layers would give most parameters no gradient
                torch.nn.init.normal_(p, std=0.05)
            state = TrainState.create(model, cfg.train, torch.device("cuda"), graphed=graphed, seed=1)
            step = make_train_step(state, cfg, data, schedule)
            losses = [step().item() for _ in range(8)]
            assert state.step == 8 and (step.graph is not None) == graphed and step.first_nonfinite() is None
            runs.append((losses, [p.detach().clone() for p in [*model.parameters(), *state.ema.parameters()]]))
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = tf32
    (eager_losses, eager_weights), (graph_losses, graph_weights) = runs
    assert graph_losses == pytest.approx(eager_losses, rel=1e-4)
    for got, want in zip(graph_weights, eager_weights):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)


def test_aot_package_on_cuda_samples_what_the_eager_network_samples_in_bf16(tmp_path):
    """`ddpm export`'s package for this GPU: written after its gate, chosen for its checkpoint, and replayed as CUDA
    graphs by generate at any batch size, with samples within bf16's rounding of the eager network's."""
    import ddpm.aot_package as aot
    from ddpm.checkpoint import load_model, save_checkpoint
    from ddpm.config import config_from_dict, image_shape
    from ddpm.generate import generate
    from ddpm.unet import build_unet

    cfg = config_from_dict({"diffusion": {"timesteps": 100}, "sampler": {"steps": 10}, "sample": {"batch_size": 96},
                            "export": {"aot": True},
                            "model": {"base_channels": 32, "norm_groups": 8, "class_conditional": True}})
    torch.manual_seed(0)
    net = build_unet(cfg.model, image_shape(cfg))
    for p in net.parameters():  # zero-initialised layers would hide most of the network
        torch.nn.init.normal_(p, std=0.05)
    ckpt = tmp_path / "checkpoint.pt"
    save_checkpoint(ckpt, {"model": net.state_dict(), "ema": net.state_dict(), "config": cfg.to_dict(), "step": 1})
    record = aot.export_package(ckpt, tmp_path / "model.pt2", cfg)
    assert record["written"], record  # docs/experiments/2026-12-04-aot-package-load-fixed-h200.md
    assert record["machine"]["device"] == torch.cuda.get_device_name() and record["bf16"] is True
    package, used = aot.choose_package("auto", ckpt, torch.device("cuda"), True)
    assert used["network"] == "aot" and used["package"] == str(tmp_path / "model.pt2")
    model, _, _ = load_model(ckpt, "cuda")
    s = Schedule.from_config(cfg.diffusion)
    packaged, labels = generate(model, s, cfg, 200, seed=1, network=package)  # batches of 96, 96 and 8
    eager, eager_labels = generate(model, s, cfg, 200, seed=1)
    assert torch.equal(labels, eager_labels)
    diff = (packaged.float() - eager.float()).abs() / 255 * 2  # in [-1, 1]
    assert diff.mean().item() <= cfg.export.aot_mean_atol, diff.mean().item()
    refused, why = aot.choose_package("auto", ckpt, torch.device("cuda"), False)  # float32 asked for: not this one
    assert refused is None and "bf16" in why["reason"]


_CACHED_STEP = """
import json, sys, torch
from torch._dynamo.utils import counters
from ddpm.compile_cache import CompileCache, cache_key
from ddpm.config import DiffusionConfig, ModelConfig
from ddpm.losses import p_losses
from ddpm.schedule import Schedule
from ddpm.train_compile import compile_options
from ddpm.unet import UNet
torch.manual_seed(0)
model = UNet(ModelConfig(base_channels=16, channel_mult=(1, 2), attention_levels=(1,), norm_groups=8, num_heads=2,
                         dropout=0.0)).cuda().train()
options = compile_options(False)
cache = CompileCache(sys.argv[1], cache_key({"tiny": 1}, (1, 28, 28), 8, 1, torch.device("cuda"), options))
cache.load()
net = torch.compile(model, options=options)
s = Schedule.from_config(DiffusionConfig()).to("cuda")
x0 = torch.rand(8, 1, 28, 28, device="cuda") * 2 - 1
t, noise = torch.randint(0, 1000, (8,), device="cuda"), torch.randn_like(x0)
with torch.autocast("cuda", dtype=torch.bfloat16):
    loss = p_losses(net, s, x0, t, noise)
loss.backward()
cache.save()
print(json.dumps({"loss": loss.item(), "hits": counters["inductor"]["fxgraph_cache_hit"],
                  "status": cache.record["status"]}))
"""


def test_compile_cache_serves_a_fresh_process_with_empty_inductor_and_triton_caches(tmp_path):
    """The first process compiles and saves <key>.bin; the second, with caches of its own and empty, loads it and
    inductor serves the compiled graphs from it, with the same loss."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    runs = []
    for i in range(2):
        env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / f"inductor{i}"),
               "TRITON_CACHE_DIR": str(tmp_path / f"triton{i}"),
               "PYTHONPATH": os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")])}
        done = subprocess.run([sys.executable, "-c", _CACHED_STEP, str(tmp_path / "cache")], env=env, cwd=root,
                              capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr[-3000:]
        runs.append(json.loads(done.stdout.strip().splitlines()[-1]))
    assert runs[0]["status"] == "missing" and runs[0]["hits"] == 0 and len(list((tmp_path / "cache").iterdir())) == 1
    assert runs[1]["status"] == "loaded" and runs[1]["hits"] > 0
    assert runs[1]["loss"] == pytest.approx(runs[0]["loss"], rel=1e-3)
