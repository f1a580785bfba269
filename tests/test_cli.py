"""The command line: errors are one clear line and a non-zero status, before any work starts."""

import subprocess
import sys

import pytest


def _ddpm(*args: str, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ddpm.cli", *args], capture_output=True, text=True, timeout=120,
                          cwd=cwd)


@pytest.mark.parametrize("override, key", [
    ("diffusion.timesteps=-1", "diffusion.timesteps"),
    ("diffusion.beta_end=1.5", "diffusion.beta_end"),
    ("diffusion.schedule=sigmoid", "diffusion.schedule"),
    ("model.channel_mult=[1,2,2,2]", "model.channel_mult"),  # 28 is not divisible by 8
])
def test_invalid_settings_fail_before_any_work(override, key, tmp_path):
    out = tmp_path / "run"
    result = _ddpm("train", override, f"train.out_dir={out}")
    assert result.returncode == 2
    assert result.stderr.startswith(f"ddpm train: error: {key}")
    assert not out.exists()  # nothing was written


@pytest.mark.parametrize("command, override, says", [
    ("train", "train.device=cpu", "train.device has moved to runtime.device"),
    ("sample", "sample.steps=5", "sample.steps has moved to sampler.steps"),
    ("evaluate", "evaluate.steps=5", "evaluate.steps has moved to sampler.steps"),
    ("export", "export.check_steps=5", "export.check_steps has moved to sampler.steps"),
])
def test_a_moved_setting_is_one_line_naming_its_new_home(command, override, says, tmp_path):
    out = tmp_path / "run"
    result = _ddpm(command, override, f"train.out_dir={out}", *(["--out", str(out)] if command != "train" else []))
    assert result.returncode == 2
    assert result.stderr.splitlines() == [f"ddpm {command}: error: {says}; set it there (one block serves every "
                                          f"stage that reads it)"]
    assert not out.exists()


@pytest.mark.parametrize("command", ["sample", "evaluate", "export"])
def test_missing_checkpoint_is_a_clear_error_and_makes_no_folder(tmp_path, command):
    out = tmp_path / ("model.onnx" if command == "export" else "s")
    result = _ddpm(command, "--checkpoint", str(tmp_path / "nope.pt"), "--out", str(out))
    assert result.returncode == 2 and f"checkpoint {tmp_path / 'nope.pt'} does not exist" in result.stderr
    assert "Traceback" not in result.stderr and sorted(tmp_path.iterdir()) == []


def test_make_pipeline_picks_the_gpu_profile_only_where_torch_sees_a_cuda_device(monkeypatch):
    import torch

    from ddpm.config import load_config
    from flows.pipeline import GPU_PROFILE, pick_profile

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "Test GPU")
    profile, said = pick_profile("auto")
    assert profile == GPU_PROFILE and "Test GPU" in said and "PROFILE=cpu forces the CPU" in said
    assert load_config("params.yaml", profile).runtime.device == "cuda"
    assert pick_profile("cpu")[0] == "cpu"  # PROFILE=cpu wins on a GPU machine
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    profile, said = pick_profile("auto")
    assert profile is None and "no CUDA device" in said
    assert load_config("params.yaml", profile).runtime.device == "cpu"


@pytest.mark.parametrize("command", ["sample", "evaluate", "export"])
def test_default_paths_follow_train_out_dir(command, tmp_path):
    run = tmp_path / "elsewhere"
    result = _ddpm(command, f"train.out_dir={run}", *(["--out", str(tmp_path / "s")] if command == "sample" else []))
    assert result.returncode == 2
    assert f"checkpoint {run / 'checkpoint.pt'} does not exist" in result.stderr, result.stderr
    assert not (tmp_path / "s").exists() and not (run / "model.onnx").exists()


def test_ddpm_sample_with_guidance_samples_what_the_guided_sampler_samples(tmp_path):
    """`ddpm sample --label 7 --guidance 3` on a class-conditional checkpoint: the images of ddim_sample_loop on
    ddpm.samplers.guided(model, null class, 3) from the same x_T, which differ from unguided ones."""
    import numpy as np
    import torch

    from ddpm.checkpoint import load_model
    from ddpm.data import from_model_range
    from ddpm.samplers import ddim_sample_loop, guided
    from ddpm.schedule import Schedule
    from testkit import tiny_checkpoint

    ckpt = tiny_checkpoint(tmp_path / "checkpoint.pt", conditional=True, seed=0)
    common = ["sample", "--checkpoint", str(ckpt), "-n", "4", "--steps", "3", "--seed", "5", "--label", "7",
              "runtime.device=cpu"]
    runs = {g: _ddpm(*common, "--guidance", g, "--out", str(tmp_path / g)) for g in ("3", "1")}
    for run in runs.values():
        assert run.returncode == 0, run.stderr[-2000:]
        assert "4 images (ddim, 3 steps, seed 5, label 7, eager network)" in run.stdout, run.stdout
    got = {g: np.load(tmp_path / g / "samples.npz")["images"] for g in runs}
    model, cfg, _ = load_model(ckpt)
    x_T = torch.randn((4, 1, 28, 28), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        want = ddim_sample_loop(guided(model, model.num_classes, 3.0), Schedule.from_config(cfg.diffusion), x_T,
                                labels=torch.full((4,), 7), steps=3, prediction=cfg.diffusion.prediction)
    assert np.abs(got["3"].astype(int) - from_model_range(want).numpy().astype(int)).max() <= 1
    assert np.abs(got["3"].astype(int) - got["1"].astype(int)).max() > 10  # guidance changed the images


@pytest.mark.parametrize("flag, value, key", [("-n", "-5", "sample.num_images"), ("--steps", "0", "sampler.steps"),
                                              ("--eta", "-1", "sampler.eta")])
def test_ddpm_sample_refuses_a_bad_value_before_loading_the_checkpoint(flag, value, key, tmp_path):
    from testkit import tiny_checkpoint

    ckpt = tiny_checkpoint(tmp_path / "checkpoint.pt", conditional=False, seed=0)
    run = _ddpm("sample", "--checkpoint", str(ckpt), flag, value, "--out", str(tmp_path / "s"), "runtime.device=cpu")
    assert run.returncode == 2 and f"{key}: {value}" in run.stderr, run.stderr
    assert "loaded" not in run.stderr and len(run.stderr.strip().splitlines()) == 1, run.stderr
    assert not (tmp_path / "s").exists()


def test_ctrl_c_outside_training_is_one_line_and_the_shell_s_status_for_it(tmp_path, monkeypatch, capsys):
    import ddpm.evaluate
    from ddpm.cli import main

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(ddpm.evaluate, "evaluate_checkpoint", interrupted)
    run = ["evaluate", "--onnx", str(tmp_path / "m.onnx"), "--out", str(tmp_path / "e"),
           f"train.out_dir={tmp_path}"]  # no checkpoint there: none is read
    assert main(run) == 130
    assert capsys.readouterr().err == "ddpm evaluate: interrupted\n"
    with pytest.raises(KeyboardInterrupt):  # -v keeps the traceback
        main(["-v", *run])


@pytest.mark.parametrize("how", [["evaluate.backend=onnx"], ["--onnx", "model.onnx"]])
def test_evaluating_an_onnx_model_needs_no_checkpoint(tmp_path, monkeypatch, how):
    import ddpm.evaluate
    from ddpm.cli import main

    asked = []
    monkeypatch.setattr(ddpm.evaluate, "evaluate_checkpoint", lambda *a, **k: asked.append(k["onnx_model"]) or {})
    assert main(["evaluate", f"train.out_dir={tmp_path}", *how]) == 0
    assert asked == [how[1] if how[0] == "--onnx" else None]
