"""DistributedDataParallel on the CPU with gloo and 2 processes."""

import os

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import ddpm.train as train_mod
from ddpm.checkpoint import load_checkpoint
from ddpm.config import DiffusionConfig, ModelConfig, load_config
from ddpm.losses import p_losses
from ddpm.schedule import Schedule
from ddpm.unet import UNet
from testkit import free_port

MODEL = ModelConfig(base_channels=8, channel_mult=(1, 2), num_res_blocks=1, attention_levels=(1,), num_heads=2,
                    dropout=0.0, norm_groups=4)


def _env(rank: int, world: int, port: int) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))


def _batch():
    gen = torch.Generator().manual_seed(1)
    x0 = torch.rand(8, 1, 28, 28, generator=gen) * 2 - 1
    return x0, torch.randint(0, 50, (8,), generator=gen), torch.randn(8, 1, 28, 28, generator=gen)


def _grads_worker(rank: int, world: int, port: int, out: str) -> None:
    _env(rank, world, port)
    dist.init_process_group("gloo")
    torch.manual_seed(0)
    model = torch.nn.parallel.DistributedDataParallel(UNet(MODEL))
    x0, t, noise = _batch()
    part = slice(rank * 4, rank * 4 + 4)
    p_losses(model, Schedule.from_config(DiffusionConfig(timesteps=50)), x0[part], t[part], noise[part]).backward()
    if rank == 0:
        torch.save({n: p.grad for n, p in model.module.named_parameters()}, out)
    dist.destroy_process_group()


def test_ddp_gradients_equal_a_single_process_on_the_whole_batch(tmp_path):
    out = str(tmp_path / "grads.pt")
    mp.spawn(_grads_worker, args=(2, free_port(), out), nprocs=2, join=True)
    torch.manual_seed(0)
    model = UNet(MODEL)
    x0, t, noise = _batch()
    p_losses(model, Schedule.from_config(DiffusionConfig(timesteps=50)), x0, t, noise).backward()
    ddp_grads = torch.load(out, weights_only=True)
    for name, p in model.named_parameters():
        assert torch.allclose(p.grad, ddp_grads[name], atol=1e-6, rtol=1e-4), name


def _fake_images(name, root, split="train"):
    gen = torch.Generator().manual_seed(0)
    return torch.randint(0, 256, (64, 1, 28, 28), generator=gen, dtype=torch.uint8), torch.arange(64) % 10


def _cfg(out_dir: str, steps: int):
    return load_config("params.yaml", "cpu", [
        f"train.out_dir={out_dir}", f"train.steps={steps}", "train.batch_size=4", "train.log_every=2",
        "train.checkpoint_every=2", "diffusion.timesteps=20", "model.base_channels=8", "model.channel_mult=[1,2]",
        "model.attention_levels=[1]", "model.num_heads=2", "model.norm_groups=4", "sampler.steps=2"])


def _train_worker(rank: int, world: int, port: int, out_dir: str) -> None:
    _env(rank, world, port)
    train_mod.load_images = _fake_images
    train_mod.train(_cfg(out_dir, 4))


def test_two_rank_checkpoint_resumes_on_one(tmp_path, monkeypatch):
    out_dir = str(tmp_path / "run")
    mp.spawn(_train_worker, args=(2, free_port(), out_dir), nprocs=2, join=True)
    ckpt = load_checkpoint(f"{out_dir}/checkpoint.pt")
    assert ckpt["step"] == 4 and ckpt["rng"]["world_size"] == 2 and len(ckpt["rng"]["generator"]) == 2
    rows = open(f"{out_dir}/loss.csv").read().splitlines()
    assert len(rows) == 3  # header + steps 2 and 4, written by rank 0 alone

    monkeypatch.setattr(train_mod, "load_images", _fake_images)
    for var in ("RANK", "LOCAL_RANK", "WORLD_SIZE"):
        monkeypatch.delenv(var, raising=False)
    result = train_mod.train(_cfg(out_dir, 6), resume=True)
    resumed = load_checkpoint(result.checkpoint)
    assert resumed["step"] == 6 and resumed["rng"]["world_size"] == 1
    assert resumed["optimizer"]["state"][0]["step"] == 6
