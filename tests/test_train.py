"""Training loop: resume equals an uninterrupted run, NaN stops with the last good checkpoint, safe checkpoints."""


import math
import os
import signal
import threading
import time

import pytest
import torch

import ddpm.train as train_mod
import ddpm.train_step as step_mod
from ddpm.checkpoint import CheckpointWriter, load_checkpoint, load_model, save_checkpoint
from ddpm.config import load_config
from ddpm.errors import CheckpointError, TrainingDivergedError, TrainingInterrupted
from ddpm.train_compile import compile_options


def _fake_images(name, root, split="train"):
    gen = torch.Generator().manual_seed(0)
    return torch.randint(0, 256, (64, 1, 28, 28), generator=gen, dtype=torch.uint8), torch.arange(64) % 10


@pytest.fixture
def cfg_for(tmp_path, monkeypatch):
    monkeypatch.setattr(train_mod, "load_images", _fake_images)

    def make(out, steps, *extra):
        return load_config("params.yaml", "cpu", [
            f"train.out_dir={tmp_path / out}", f"train.steps={steps}", "train.batch_size=4", "train.log_every=2",
            "train.checkpoint_every=3", "train.warmup_steps=2", "diffusion.timesteps=20", "model.base_channels=8",
            "model.channel_mult=[1,2]", "model.attention_levels=[1]", "model.num_heads=2", "model.norm_groups=4",
            "model.dropout=0.1", "sampler.steps=2", "sample.num_images=4", *extra])
    return make


def test_resume_gives_the_same_weights(cfg_for):
    # A constant learning rate after warm-up: a cosine decay's schedule depends on train.steps, which grows here.
    straight = train_mod.train(cfg_for("a", 8, "train.lr_decay=none"))
    half = train_mod.train(cfg_for("b", 4, "train.lr_decay=none"))
    assert half.step == 4
    resumed = train_mod.train(cfg_for("b", 8, "train.lr_decay=none"), resume=True)
    a, b = load_checkpoint(straight.checkpoint), load_checkpoint(resumed.checkpoint)
    assert a["step"] == b["step"] == 8
    for key in ("model", "ema"):
        for name, tensor in a[key].items():
            assert torch.equal(tensor, b[key][name]), f"{key}.{name}"
    assert a["optimizer"]["state"][0]["step"] == b["optimizer"]["state"][0]["step"]
    rows = (resumed.checkpoint.parent / "loss.csv").read_text().splitlines()
    assert [r.split(",")[0] for r in rows[1:]] == ["2", "4", "6", "8"]
    # resumed at train.steps: nothing runs, and loss.csv keeps its bytes (csv's \r\n line ends, every line)
    written = (resumed.checkpoint.parent / "loss.csv").read_bytes()
    again = train_mod.train(cfg_for("b", 8, "train.lr_decay=none"), resume=True)
    assert (again.step, again.steps_run, resumed.steps_run) == (8, 0, 4)
    assert (resumed.checkpoint.parent / "loss.csv").read_bytes() == written and written.count(b"\r\n") == 5


# Recorded on the CPU before the training step moved to ddpm.train_step: the losses logged every 2 steps and
# sum |w| over the EMA weights after 6 steps. A change in what a step draws, or in what order, moves them by far
# more than the tolerance, which only absorbs CPU kernels that round differently.
RECORDED = {
    "cpu profile (class-conditional, label dropout, min-SNR, cosine lr)": (
        (), [0.1651991754770279, 0.11197895556688309, 0.21861761808395386], 2778.7266696617667),
    "unconditional, unweighted, constant lr": (
        ("model.class_conditional=false", "diffusion.loss_weighting=none", "train.lr_decay=none"),
        [0.9881659746170044, 0.9952177405357361, 0.9403818845748901], 2491.508481723829),
}


@pytest.mark.parametrize("case", RECORDED)
def test_seeded_run_gives_the_recorded_losses_and_weights(cfg_for, one_torch_thread, case):
    extra, losses, ema_abs_sum = RECORDED[case]
    result = train_mod.train(cfg_for("pinned", 6, *extra))
    rows = (result.checkpoint.parent / "loss.csv").read_text().splitlines()[1:]
    assert [float(r.split(",")[1]) for r in rows] == pytest.approx(losses, rel=1e-4)
    ema = load_checkpoint(result.checkpoint)["ema"]
    assert sum(float(v.double().abs().sum()) for v in ema.values()) == pytest.approx(ema_abs_sum, rel=1e-5)


def test_checkpoint_rebuilds_the_model_alone(cfg_for):
    result = train_mod.train(cfg_for("c", 3, "model.class_conditional=true"))
    model, cfg, ckpt = load_model(result.checkpoint)
    assert cfg.model.class_conditional and ckpt["step"] == 3
    out = model(torch.randn(2, 1, 28, 28), torch.tensor([0, 19]), torch.tensor([3, 10]))
    assert out.shape == (2, 1, 28, 28)
    assert (result.checkpoint.parent / "samples_final.png").stat().st_size > 0
    import yaml
    from ddpm.config import config_from_dict
    assert config_from_dict(yaml.safe_load((result.checkpoint.parent / "config.yaml").read_text())) == cfg


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(cfg_for, monkeypatch):
    real = step_mod.p_losses
    calls = {"n": 0}

    def poisoned(*args, **kwargs):
        calls["n"] += 1
        loss = real(*args, **kwargs)
        return loss * float("nan") if calls["n"] == 5 else loss

    monkeypatch.setattr(step_mod, "p_losses", poisoned)
    cfg = cfg_for("d", 10)
    with pytest.raises(TrainingDivergedError, match="step 5"):
        train_mod.train(cfg)
    ckpt = load_checkpoint(train_mod.Path(cfg.train.out_dir) / "checkpoint.pt")
    assert ckpt["step"] == 3
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values())


def test_unsafe_and_truncated_checkpoints_are_refused(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    evil = tmp_path / "evil.pt"
    evil.write_bytes(b"")
    torch.save({"model": Evil(), "config": {}, "step": 0}, evil)
    with pytest.raises(CheckpointError, match="could run code"):
        load_checkpoint(evil)

    good = tmp_path / "good.pt"
    save_checkpoint(good, {"model": {"w": torch.ones(1000)}, "config": {}, "step": 1})
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(good.read_bytes()[:500])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        load_checkpoint(truncated)
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "missing.pt")


def test_failed_checkpoint_write_keeps_the_previous_file(tmp_path, monkeypatch):
    path = tmp_path / "ckpt.pt"
    save_checkpoint(path, {"model": {}, "config": {}, "step": 1})
    before = path.read_bytes()

    import ddpm.fileio as ck
    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(ck.os, "fsync", full_disk)
    with pytest.raises(OSError, match="No space"):
        save_checkpoint(path, {"model": {"w": torch.ones(10)}, "config": {}, "step": 2})
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt.pt"]


def _held_writes(monkeypatch):
    """Checkpoint writes that wait for `release` (set by the test); `started` is set when one is waiting."""
    import ddpm.checkpoint as ck

    started, release, real = threading.Event(), threading.Event(), ck.atomic_write_bytes

    def held(path, data):
        started.set()
        assert release.wait(60), "the test never released the write"
        real(path, data)
    monkeypatch.setattr(ck, "atomic_write_bytes", held)
    return started, release


def test_a_checkpoint_written_in_the_background_holds_the_state_at_its_save(tmp_path, monkeypatch):
    """`save` returns while the write waits; the tensors then change in place, as the next training steps change
    them; the file holds the values they had at the save."""
    started, release = _held_writes(monkeypatch)
    weights = {"w": torch.arange(6.0), "opt": {"state": {0: {"step": torch.tensor(3.0)}}, "groups": [{"lr": 0.1}]}}
    writer = CheckpointWriter()
    writer.save(tmp_path / "ckpt.pt", {"model": weights, "config": {}, "step": 3})
    assert started.wait(60) and not (tmp_path / "ckpt.pt").exists()  # still being written
    weights["w"].add_(100.0)
    weights["opt"]["state"][0]["step"].add_(1.0)
    release.set()
    writer.close()
    ckpt = load_checkpoint(tmp_path / "ckpt.pt")  # its content hash checked too
    assert torch.equal(ckpt["model"]["w"], torch.arange(6.0)) and ckpt["model"]["opt"]["state"][0]["step"] == 3.0
    assert ckpt["model"]["opt"]["groups"] == [{"lr": 0.1}] and ckpt["step"] == 3


def test_a_failed_background_write_is_raised_by_the_next_save_and_keeps_the_previous_file(tmp_path, monkeypatch):
    path = tmp_path / "ckpt.pt"
    writer = CheckpointWriter()
    writer.save(path, {"model": {"w": torch.ones(3)}, "config": {}, "step": 1})
    writer.wait()
    before = path.read_bytes()

    import ddpm.fileio as fileio
    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(fileio.os, "fsync", full_disk)
    writer.save(path, {"model": {"w": torch.zeros(3)}, "config": {}, "step": 2})  # fails in the worker
    with pytest.raises(OSError, match=f"No space left on device: '{path}'"):
        writer.save(path, {"model": {"w": torch.zeros(3)}, "config": {}, "step": 3})
    writer.close()  # the failed write was raised once; nothing else is pending
    assert path.read_bytes() == before and [p.name for p in tmp_path.iterdir()] == ["ckpt.pt"]


def test_training_waits_for_its_last_checkpoint_and_draws_the_final_grid_meanwhile(cfg_for, monkeypatch):
    """The final grid is sampled while the last checkpoint is written and saved once it is on disk; `train`
    returns with the checkpoint of its last step in place."""
    started, release = _held_writes(monkeypatch)
    cfg = cfg_for("bg", 3)  # one checkpoint, at step 3
    sampled = []
    real = train_mod.sample_grid_images

    def sample(*args, **kwargs):
        assert started.wait(60)  # the checkpoint's write has begun and waits ...
        sampled.append(not (train_mod.Path(cfg.train.out_dir) / "checkpoint.pt").exists())
        release.set()  # ... until the grid is sampled
        return real(*args, **kwargs)
    monkeypatch.setattr(train_mod, "sample_grid_images", sample)
    result = train_mod.train(cfg)
    assert sampled == [True]
    assert load_checkpoint(result.checkpoint)["step"] == 3
    assert (train_mod.Path(cfg.train.out_dir) / "samples_final.png").is_file()


def test_a_failed_background_write_stops_training_at_the_next_step_not_the_next_checkpoint(cfg_for, monkeypatch):
    import ddpm.checkpoint as ck

    failed = threading.Event()

    def full_disk(path, data):
        try:
            raise OSError(28, "No space left on device", str(path))
        finally:
            failed.set()
    monkeypatch.setattr(ck, "atomic_write_bytes", full_disk)
    steps = []

    def on_step(step):
        steps.append(step)
        if step == 4:  # the step-3 write has failed by step 5's check at the latest
            assert failed.wait(60)
            time.sleep(0.2)
    cfg = cfg_for("full", 9)  # checkpoints at 3, 6 and 9
    with pytest.raises(OSError, match="No space left on device"):
        train_mod.train(cfg, on_step=on_step)
    assert steps in ([1, 2, 3], [1, 2, 3, 4])  # not on to the next checkpoint's step 6
    assert not (train_mod.Path(cfg.train.out_dir) / "checkpoint.pt").exists()


def test_a_sigterm_while_the_final_grid_is_drawn_keeps_the_last_checkpoint_and_exits_as_stopped(cfg_for,
                                                                                                 monkeypatch):
    real = train_mod.sample_grid_images

    def sample(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)
        return real(*args, **kwargs)
    monkeypatch.setattr(train_mod, "sample_grid_images", sample)
    cfg = cfg_for("term", 4)
    with pytest.raises(TrainingInterrupted, match=r"stopped by SIGTERM after the last step \(4\)"):
        train_mod.train(cfg)
    assert load_checkpoint(train_mod.Path(cfg.train.out_dir) / "checkpoint.pt")["step"] == 4


@pytest.mark.parametrize("n, channels, nrow", [(7, 1, 3), (10, 3, None), (2, 1, 1)])
def test_sample_grids_are_torchvision_make_grids_in_pixels(n, channels, nrow):
    """The grids of `ddpm sample`, training and evaluation (ddpm.fileio.grid_png, which needs no torchvision)
    against torchvision's make_grid with the same padding and white border, pixel for pixel."""
    import io

    import numpy as np
    from PIL import Image
    from torchvision.transforms.functional import to_pil_image
    from torchvision.utils import make_grid

    from ddpm.generate import grid_png

    images = torch.randint(0, 256, (n, channels, 5, 4), generator=torch.Generator().manual_seed(n), dtype=torch.uint8)
    ours = np.array(Image.open(io.BytesIO(grid_png(images, nrow))))
    theirs = np.array(to_pil_image(make_grid(images, nrow=nrow or max(int(n ** 0.5), 1), padding=2, pad_value=255)))
    assert np.array_equal(ours, theirs[..., 0] if channels == 1 else theirs)  # make_grid repeats a gray channel


def test_preview_grids_are_never_compiled(monkeypatch, tmp_path, tiny_model_cfg):
    """sample.compile costs minutes of compilation; a 64-image preview must not pay it."""
    from ddpm.config import config_from_dict
    from ddpm.schedule import Schedule
    from ddpm.unet import UNet

    calls = []

    def fake_generate(model, schedule, cfg, n, **kwargs):
        calls.append(kwargs)
        return torch.zeros(n, 1, 28, 28, dtype=torch.uint8), None
    monkeypatch.setattr(train_mod, "generate", fake_generate)
    cfg = config_from_dict({"sample": {"compile": True}})
    model = UNet(tiny_model_cfg)
    train_mod.save_sample_grid(model, Schedule.from_config(cfg.diffusion), cfg, tmp_path / "grid.png", n=4)
    assert calls and calls[0]["compile"] is False and (tmp_path / "grid.png").is_file()


@pytest.mark.parametrize("cuda_graphs", [False, True])
def test_compile_options_are_inductor_settings_this_torch_knows(cuda_graphs):
    """ddpm.train's torch.compile options name inductor settings that exist (torch renames them between
    releases, and an unknown one would fail only when a GPU run compiles), and inductor accepts them and
    still computes the eager output and gradient. Whether they change the generated code is measured on
    the GPU (docs/experiments/2026-11-26-recompute-rather-than-store.md); tests/test_cuda.py checks the U-Net's
    training step compiled with them."""
    import torch._inductor.config as inductor_config
    options = compile_options(cuda_graphs)
    assert all(hasattr(inductor_config, key) for key in options), options
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.SiLU(), torch.nn.LayerNorm(16))
    x = torch.randn(4, 8, requires_grad=True)
    torch._dynamo.reset()
    got = torch.compile(net, dynamic=False, options=options)(x)
    got.sum().backward()
    got_grad, x.grad = x.grad, None
    want = net(x)
    want.sum().backward()
    torch._dynamo.reset()
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(got_grad, x.grad)


def test_learning_rate_warms_up_then_follows_its_decay():
    from ddpm.config import TrainConfig
    from ddpm.train_step import lr_at_step
    const = TrainConfig(steps=100, lr=1e-3, warmup_steps=10)
    assert lr_at_step(0, const) == pytest.approx(1e-4) and lr_at_step(9, const) == pytest.approx(1e-3)
    assert lr_at_step(99, const) == pytest.approx(1e-3)
    cos = TrainConfig(steps=110, lr=1e-3, warmup_steps=10, lr_decay="cosine")
    # after warm-up: lr * (1 + cos(pi * (s - warmup) / (steps - warmup))) / 2
    assert [lr_at_step(s, cos) for s in (10, 60, 110)] == pytest.approx([1e-3, 5e-4, 0.0])
    assert lr_at_step(35, cos) == pytest.approx(1e-3 * (1 + math.cos(math.pi / 4)) / 2)


def test_on_step_sees_every_step_and_the_final_grid_reports_its_sampling(cfg_for):
    """The per-step hook (what a pipeline's progress reads) gets each step once, in order; the final grid's
    sampling goes through ddpm.progress, one call per network evaluation."""
    from ddpm import progress

    steps, seen = [], []
    with progress.reporting(lambda phase, done, total: seen.append((phase, done, total))):
        cfg = cfg_for("a", 5, "sampler.name=ddim", "sample.batch_size=32")
        train_mod.train(cfg, on_step=steps.append)
    assert steps == [1, 2, 3, 4, 5]
    sampling = [(done, total) for phase, done, total in seen if phase.startswith("sampling")]
    calls = 2 * 2  # the 64-image grid: two batches of 32, DDIM with sampler.steps=2
    assert sampling == [(k, calls) for k in range(1, calls + 1)]


def test_training_progress_off_a_terminal_is_a_log_line_now_and_then_not_bar_redraws(caplog, capsys):
    """A redirected `ddpm train` gets log lines: the first, then none sooner than `every_s` seconds after the last,
    and the last step's (on a terminal, a tqdm bar); under a progress hook (a pipeline stage), none."""
    from ddpm.progress import StepBar, reporting

    with caplog.at_level("INFO", logger="ddpm.progress"):
        bar = StepBar(total=300, start=0, every_s=3600.0)  # pytest's captured stderr is no terminal
        for step in (50, 100, 150, 300):
            bar(step, 0.5, 1000.0)
        bar.close()
    assert [r.getMessage() for r in caplog.records] == ["step 50/300  loss 0.5000  1000 img/s",
                                                       "step 300/300  loss 0.5000  1000 img/s"]
    assert capsys.readouterr().err == ""
    caplog.clear()
    with caplog.at_level("INFO", logger="ddpm.progress"), reporting(lambda phase, done, total: None):
        StepBar(total=300, start=0, every_s=0.0)(300, 0.5, 1000.0)  # the pipeline logs its own progress
    assert caplog.records == []
