"""Progressive distillation: the target is two teacher DDIM steps, a student learns it, rounds resume exactly,
and a student samples with its own step count only."""

from pathlib import Path

import numpy as np
import pytest
import torch

import ddpm.train as train_mod
from ddpm.checkpoint import load_checkpoint, load_model
from ddpm.config import DiffusionConfig, load_config
from ddpm.distill import (DistillLayout, DistillationLoss, distill, optimisation_steps, round_config, round_spans,
                          round_steps_of)
from ddpm.errors import ConfigError, RunFolderError, TrainingInterrupted
from ddpm.samplers import ddim_sample_loop
from ddpm.schedule import Schedule
from ddpm.schedule_math import sampling_timesteps, trailing_timesteps
from ddpm.unet import build_unet

CPU = torch.device("cpu")


def test_each_round_keeps_every_factor_th_point_of_the_grid():
    for factor in (2, 4, 8):
        for steps in (1, 2, 4, 8, 16, 32, 64):
            teacher, student = trailing_timesteps(1000, factor * steps), trailing_timesteps(1000, steps)
            assert student == teacher[::factor] and student[0] == 999 and len(student) == steps
    assert trailing_timesteps(1000, 4) == [999, 749, 499, 249]


def test_a_student_refuses_another_step_count():
    assert sampling_timesteps(1000, 4, distilled_steps=4) == [999, 749, 499, 249]
    assert sampling_timesteps(1000, 4) == [750, 500, 250, 0]  # a trained model: DDIM's uniform grid
    with pytest.raises(ConfigError, match="distilled to 4 DDIM steps.*exactly 4 steps"):
        sampling_timesteps(1000, 8, distilled_steps=4)


def _teacher(tiny_model_cfg, seed=0):
    torch.manual_seed(seed)
    return build_unet(tiny_model_cfg, (1, 28, 28)).eval().requires_grad_(False)


def _x0(n=4, seed=1):
    gen = torch.Generator().manual_seed(seed)
    return torch.rand((n, 1, 28, 28), generator=gen) * 2 - 1


@pytest.mark.parametrize("prediction, factor", [("eps", 2), ("v", 2), ("v", 4)])
def test_a_student_that_predicts_the_target_takes_the_teachers_path(tiny_model_cfg, one_torch_thread, prediction,
                                                                    factor):
    """2 student DDIM steps that each predict x~ land where 2 * factor teacher DDIM steps land (ddpm.samplers,
    independent of the target's arithmetic)."""
    schedule = Schedule.from_config(DiffusionConfig())
    teacher = _teacher(tiny_model_cfg)
    loss = DistillationLoss(teacher, prediction, schedule, steps=2, device=CPU, factor=factor)
    x_T = torch.randn((4, 1, 28, 28), generator=torch.Generator().manual_seed(2))

    def oracle(z, t):  # v such that alpha z - sigma v = x~
        i = torch.full_like(t, factor * trailing_timesteps(1000, 2).index(int(t[0])))
        a, s = loss._coef(loss.alpha, i), loss._coef(loss.sigma, i)
        return (a * z - loss.target(z, i, None)) / s

    want = ddim_sample_loop(teacher, schedule, x_T, prediction=prediction,
                            timesteps=trailing_timesteps(1000, 2 * factor))
    got = ddim_sample_loop(oracle, schedule, x_T, prediction="v", clip_denoised=False,
                           timesteps=trailing_timesteps(1000, 2))
    assert torch.allclose(got, want, atol=1e-4), float((got - want).abs().max())


def _fixed_batch(teacher, schedule, loss):
    """The training batch of a 2-step student: x_T = z_999 of data and noise, and the teacher's own 4-step
    state at the student's second point, written as (x0, noise) pairs that q_sample maps onto them."""
    x0, noise = _x0(), torch.randn((4, 1, 28, 28), generator=torch.Generator().manual_seed(3))
    a, s = loss.alpha[0], loss.sigma[0]
    x_T = a * x0 + s * noise
    _, traj = ddim_sample_loop(teacher, schedule, x_T, prediction="v", timesteps=trailing_timesteps(1000, 4),
                               return_trajectory=True)
    a1, s1 = loss.alpha[2], loss.sigma[2]  # teacher grid index 2 = the student's second point
    x0_mid = (traj[2] - s1 * noise) / a1
    t = torch.tensor([0] * 4 + [999] * 4)  # k = t * 2 // 1000: the student's first and second point
    return x_T, torch.cat([x0, x0_mid]), torch.cat([noise, noise]), t


def _train_student(teacher, loss, schedule, batch, iterations):
    student = _teacher_copy(teacher).train().requires_grad_(True)
    opt = torch.optim.Adam(student.parameters(), lr=4e-3)
    _, x0, noise, t = batch
    losses = []
    for _ in range(iterations):
        value = loss(student, schedule, x0, t, noise, None)
        opt.zero_grad()
        value.backward()
        opt.step()
        losses.append(float(value.detach()))
    return student.eval(), losses


def _teacher_copy(teacher):
    import copy
    return copy.deepcopy(teacher)


# The teachers below predict v, as every round's after the first does: a random eps network's x0 at t = 999 is
# its error times 1 / alpha = 160, clipped to +-1 everywhere, so its 2- and 4-step samples would be alike.
def test_one_round_drives_the_loss_down_on_a_fixed_batch(tiny_model_cfg, one_torch_thread):
    schedule = Schedule.from_config(DiffusionConfig())
    teacher = _teacher(tiny_model_cfg)
    loss = DistillationLoss(teacher, "v", schedule, steps=2, device=CPU)
    _, losses = _train_student(teacher, loss, schedule, _fixed_batch(teacher, schedule, loss), 20)
    assert losses[-1] < 0.5 * losses[0] and losses[-1] == min(losses), losses


def test_a_two_step_student_reproduces_its_teachers_four_steps(tiny_model_cfg, one_torch_thread):
    schedule = Schedule.from_config(DiffusionConfig())
    teacher = _teacher(tiny_model_cfg)
    loss = DistillationLoss(teacher, "v", schedule, steps=2, device=CPU)
    batch = _fixed_batch(teacher, schedule, loss)
    x_T = batch[0]
    want = ddim_sample_loop(teacher, schedule, x_T, prediction="v", timesteps=trailing_timesteps(1000, 4))
    two_step_teacher = ddim_sample_loop(teacher, schedule, x_T, prediction="v", timesteps=trailing_timesteps(1000, 2))
    student, _ = _train_student(teacher, loss, schedule, batch, 80)
    got = ddim_sample_loop(student, schedule, x_T, prediction="v", timesteps=trailing_timesteps(1000, 2))
    err, baseline = float((got - want).abs().mean()), float((two_step_teacher - want).abs().mean())
    # the student against the teacher's own 2 steps, the distance it is trained to close; its loss is still falling
    assert err < 0.15 * baseline, (err, baseline)


# --- rounds through the training loop -----------------------------------------------------------

def _fake_images(name, root, split="train"):
    gen = torch.Generator().manual_seed(0)
    return torch.randint(0, 256, (32, 1, 28, 28), generator=gen, dtype=torch.uint8), torch.arange(32) % 10


@pytest.fixture
def teacher_run(tmp_path, monkeypatch, one_torch_thread):
    monkeypatch.setattr(train_mod, "load_images", _fake_images)

    def cfg(out, *extra):
        return load_config("params.yaml", "cpu", [
            f"train.out_dir={tmp_path / out}", "train.steps=2", "train.batch_size=4", "train.log_every=1",
            "train.checkpoint_every=2", "train.warmup_steps=0", "model.base_channels=8", "model.channel_mult=[1,2]",
            "model.attention_levels=[1]", "model.num_heads=2", "model.norm_groups=4", "model.dropout=0.1",
            "sampler.steps=2", "sample.num_images=4", "distill.steps=2",
            "distill.teacher_steps=8", "distill.first_round_steps=6", "distill.round_steps=4", *extra])
    teacher = train_mod.train(cfg("teacher")).checkpoint
    return cfg, teacher


def test_rounds_halve_down_to_the_students_steps_and_record_them(teacher_run):
    cfg, teacher = teacher_run
    c = cfg("a")
    assert round_steps_of(c) == [4, 2]
    result = distill(c, teacher)
    assert [r.steps for r in result.rounds] == [4, 2] and result.student == DistillLayout.of(c).student
    model, student_cfg, ckpt = load_model(result.student)
    assert (student_cfg.diffusion.distilled_steps, student_cfg.diffusion.prediction, ckpt["step"]) == (2, "v", 4)
    assert result.student.read_bytes() == result.rounds[-1].checkpoint.read_bytes()
    assert load_checkpoint(result.rounds[0].checkpoint)["step"] == 6  # the first round: distill.first_round_steps
    from ddpm.generate import generate
    images, _ = generate(model, Schedule.from_config(student_cfg.diffusion), student_cfg, 2)
    assert images.shape == (2, 1, 28, 28)
    with pytest.raises(ConfigError, match="distilled to 2 DDIM steps"):
        generate(model, Schedule.from_config(student_cfg.diffusion),
                 load_config(None, None, ["diffusion.distilled_steps=2", "sampler.steps=50"]), 2)


def test_the_first_round_has_its_own_length_and_the_rounds_share_one_step_count():
    c = load_config(None, None, ["distill.teacher_steps=32", "distill.steps=4", "distill.first_round_steps=1500",
                                 "distill.round_steps=500"])
    assert [optimisation_steps(c, n) for n in round_steps_of(c)] == [1500, 500, 500]
    assert round_spans(c) == {16: (0, 1500), 8: (1500, 500), 4: (2000, 500)}
    assert round_config(c, c, 16).train.steps == 1500 and round_config(c, c, 8).train.steps == 500


def test_a_round_factor_divides_the_steps_by_it_and_must_reach_the_students_steps():
    c = load_config(None, None, ["distill.teacher_steps=32", "distill.steps=4", "distill.round_factor=8"])
    assert round_steps_of(c) == [4] and optimisation_steps(c, 4) == c.distill.first_round_steps
    c = load_config(None, None, ["distill.teacher_steps=64", "distill.steps=4", "distill.round_factor=4"])
    assert round_steps_of(c) == [16, 4] and [optimisation_steps(c, n) for n in (16, 4)] == [1500, 500]
    with pytest.raises(ConfigError, match="by distill.round_factor \\(4\\) one or more times .*; set "
                                          "distill.teacher_steps=16 or distill.round_factor=8 \\(one round\\)$"):
        load_config(None, None, ["distill.teacher_steps=32", "distill.steps=4", "distill.round_factor=4"])
    with pytest.raises(ConfigError, match="distill.round_factor: 1 is out of range"):
        load_config(None, None, ["distill.round_factor=1"])


def test_a_round_of_another_teacher_step_count_is_not_resumed(teacher_run):
    cfg, teacher = teacher_run
    distill(cfg("f", "distill.teacher_steps=4"), teacher)  # one halving round, 4 -> 2
    with pytest.raises(RunFolderError, match="from teacher [0-9a-f]{12} at 4 DDIM steps, now teacher [0-9a-f]{12} "
                                             "at 8 DDIM steps"):
        distill(cfg("f", "distill.teacher_steps=8", "distill.round_factor=4"), teacher, resume=True)
    record = DistillLayout.of(cfg("f")).round_dir(2) / "teacher.sha256"
    sha = record.read_text().split()[0]
    record.write_text(sha + "\n")  # a record of before round_factor: a halving round's
    assert distill(cfg("f", "distill.teacher_steps=4"), teacher, resume=True).rounds[0].skipped


def test_resume_after_an_interrupted_round_gives_the_same_weights(teacher_run):
    cfg, teacher = teacher_run
    straight = distill(cfg("straight"), teacher)

    def stop(steps, step):
        if steps == 2 and step == 3:  # second round, after its checkpoint at step 2
            raise TrainingInterrupted("stopped by the test")
    with pytest.raises(TrainingInterrupted):
        distill(cfg("resumed"), teacher, on_step=stop)
    with pytest.raises(RunFolderError, match="--resume"):
        distill(cfg("resumed"), teacher)  # a folder with rounds is not replaced unasked
    resumed = distill(cfg("resumed"), teacher, resume=True)
    assert [r.skipped for r in resumed.rounds] == [True, False]
    a, b = load_checkpoint(straight.student), load_checkpoint(resumed.student)
    assert a["step"] == b["step"] == 4
    for key in ("model", "ema"):
        for name, tensor in a[key].items():
            assert torch.equal(tensor, b[key][name]), f"{key}.{name}"


def test_the_student_samples_with_its_own_steps_in_torch_and_onnxruntime(teacher_run, tmp_path, capsys):
    from ddpm.cli import main
    from ddpm.config import ExportConfig
    from ddpm.export import export_onnx
    from ddpm.onnx_model import OnnxDenoiser
    from ddpm.onnx_sampler import sample, sample_model_range

    cfg, teacher = teacher_run
    student = distill(cfg("c", "distill.teacher_steps=4"), teacher).student
    assert main(["sample", "--checkpoint", str(student), "--out", str(tmp_path / "s"), "-n", "2"]) == 0
    assert "(ddim, 2 steps" in capsys.readouterr().out  # its own count, though sample.steps is 50
    assert main(["sample", "--checkpoint", str(student), "--out", str(tmp_path / "t"), "--steps", "5"]) == 2
    assert "distilled to 2 DDIM steps" in capsys.readouterr().err and not (tmp_path / "t").exists()
    from ddpm.cli import _scoring_settings  # what `ddpm export` checks, `ddpm evaluate` scores
    plain = load_config(None, None, ["sampler.name=ddpm", "sampler.eta=0.5"])
    assert _scoring_settings(plain, str(teacher), "pinned") is plain
    own = _scoring_settings(plain, str(student), "pinned").sampler
    assert (own.name, own.steps, own.eta) == ("ddim", 2, 0.0)  # deterministic DDIM, as it was distilled for
    from flows.distill_tasks import student_config  # the pipeline's: the same sampler
    assert student_config(plain, 2).sampler == own
    onnx = export_onnx(student, tmp_path / "student.onnx", ExportConfig())
    den = OnnxDenoiser(onnx)
    assert (den.distilled_steps, den.prediction, den.metadata["diffusion"]["distilled_steps"]) == (2, "v", 2)
    assert den.sampler_defaults["steps"] == 2  # its own steps, though the export's sampler block has 50
    assert sample(den, 2, steps=2).shape == (2, 1, 28, 28)
    with pytest.raises(ConfigError, match="exactly 2 steps"):
        sample(den, 2, steps=50)
    from ddpm.quantize import calibration_feeds, int8_check_images  # the int8 twin: calibrated and checked
    assert den.schedule.num_timesteps == 1000  # the student's grid, from T - 1 (DDIM-2's would be [500, 0])
    assert [int(f["t"][0]) for f in calibration_feeds(den, images=2, steps=2)] == [999, 499]
    x_T = np.random.default_rng(0).standard_normal((2, 1, 28, 28), dtype=np.float32)  # int8_check_images' seed 0
    np.testing.assert_allclose(int8_check_images(den, n=2, steps=2),
                               np.clip(sample_model_range(den, 2, steps=2, x_T=x_T), -1, 1), atol=1e-6)


def test_the_teacher_is_the_checkpoint_of_train_out_dir_unless_named(tmp_path, monkeypatch):
    import ddpm.distill as distill_mod
    from ddpm.cli import main

    taken = []
    monkeypatch.setattr(distill_mod, "distill", lambda cfg, checkpoint, **kw: taken.append(checkpoint) or
                        distill_mod.DistillResult(student=Path(checkpoint), rounds=()))
    assert main(["distill", f"train.out_dir={tmp_path / 'run'}"]) == 0
    assert main(["distill", "--checkpoint", str(tmp_path / "t.pt"), f"train.out_dir={tmp_path / 'run'}"]) == 0
    assert taken == [str(tmp_path / "run" / "checkpoint.pt"), str(tmp_path / "t.pt")]


def test_bad_distill_settings_fail_before_any_work(teacher_run, capsys):
    from ddpm.cli import main

    cfg, teacher = teacher_run
    out = cfg("d").train.out_dir
    assert main(["distill", "--checkpoint", str(teacher), "distill.teacher_steps=12", f"train.out_dir={out}"]) == 2
    assert capsys.readouterr().err.startswith("ddpm distill: error: distill.teacher_steps: 12 must be")
    assert main(["distill", "--checkpoint", str(teacher), "distill.teacher_steps=2048", f"train.out_dir={out}"]) == 2
    assert "exceeds the T of" in capsys.readouterr().err
    assert not Path(out).exists()


def test_a_non_finite_loss_stops_the_round_as_training_does(teacher_run, monkeypatch):
    import ddpm.distill as distill_mod
    from ddpm.errors import TrainingDivergedError

    cfg, teacher = teacher_run
    finite = distill_mod.DistillationLoss.__call__

    def diverge(self, student, schedule, x0, t, noise, labels):
        return finite(self, student, schedule, x0, t, noise, labels) * float("nan")
    monkeypatch.setattr(distill_mod.DistillationLoss, "__call__", diverge)
    c = cfg("nan")
    with pytest.raises(TrainingDivergedError, match="non-finite at step 1"):
        distill(c, teacher)
    assert not DistillLayout.of(c).student.exists() and not DistillLayout.of(c).round_checkpoint(4).exists()
