import pytest

import yaml

from ddpm.config import Config, ConfigError, RuntimeConfig, SamplerConfig, config_from_dict, load_config


def test_params_yaml_loads_with_every_profile():
    for profile in (None, "cpu", "gpu", "gpu-fast", "cifar10"):
        cfg = load_config("params.yaml", profile)
        assert isinstance(cfg, Config)
    assert load_config("params.yaml").model.base_channels == 16  # the file's default profile is cpu
    assert load_config("params.yaml", "cifar10").model.channel_mult == (1, 2, 2, 2)


def test_overrides_apply_last():
    cfg = load_config("params.yaml", "cpu", ["train.steps=7", "model.channel_mult=[1,2]", "model.attention_levels=[1]",
                                             "sampler.name=ddpm"])
    assert cfg.train.steps == 7 and cfg.model.channel_mult == (1, 2) and cfg.sampler.name == "ddpm"


@pytest.mark.parametrize("override, key", [
    ("diffusion.timesteps=-5", "diffusion.timesteps"),
    ("diffusion.beta_end=1.0", "diffusion.beta_end"),
    ("diffusion.beta_start=0.03", "diffusion.beta_start"),
    ("diffusion.schedule=quadratic", "diffusion.schedule"),
    ("train.steps=ten", "train.steps"),
    ("runtime.bf16=1", "runtime.bf16"),
    ("runtime.device=tpu", "runtime.device"),
    ("train.stepz=10", "train.stepz"),
    ("model.channel_mult=[1,2,2,2,2]", "model.channel_mult"),
    ("model.attention_levels=[5]", "model.attention_levels"),
    ("sampler.steps=5000", "sampler.steps"),
    ("sampler.name=euler", "sampler.name"),
    ("evaluate.feature_seed=-1", "evaluate.feature_seed"),
    ("sample.label=10", "sample.label"),
    ("trian.steps=1", "trian"),
    ("export.int8_mean_atol=0", "export.int8_mean_atol"),
    ("export.int8_calibration_images=0", "export.int8_calibration_images"),
])
def test_bad_settings_name_the_key(override, key):
    with pytest.raises(ConfigError) as info:
        load_config("params.yaml", "cpu", [override])
    assert str(info.value).startswith(key)


@pytest.mark.parametrize("key", ["train.out_dir", "train.steps", "train.lr", "runtime.bf16", "model.channel_mult",
                                 "data.dataset"])
def test_an_empty_value_says_so(key):
    with pytest.raises(ConfigError, match=rf"^{key}: empty; give it a value$"):
        load_config("params.yaml", "cpu", [f"{key}="])


def test_a_label_needs_a_class_conditional_model():
    with pytest.raises(ConfigError, match=r"^sample.label: the model is not class-conditional"):
        load_config("params.yaml", "cpu", ["model.class_conditional=false", "sample.label=3"])


def test_sampler_steps_are_checked_against_the_timesteps():
    with pytest.raises(ConfigError, match=r"^sampler.steps: 2000 exceeds diffusion.timesteps \(1000\)$"):
        load_config("params.yaml", "cpu", ["sampler.steps=2000"])
    assert load_config("params.yaml", "cpu", ["sampler.steps=1000"]).sampler.steps == 1000


MOVED = [("sample.sampler=ddpm", "sampler.name"), ("sample.steps=5", "sampler.steps"),
         ("sample.eta=0.5", "sampler.eta"), ("sample.variance=beta", "sampler.variance"),
         ("sample.clip_denoised=false", "sampler.clip_denoised"),
         ("sample.guidance_scale=2", "sampler.guidance_scale"), ("evaluate.sampler=ddim", "sampler.name"),
         ("evaluate.steps=5", "sampler.steps"), ("export.check_steps=5", "sampler.steps"),
         ("export.int8_calibration_steps=5", "sampler.steps"), ("train.device=cpu", "runtime.device"),
         ("train.bf16=false", "runtime.bf16"), ("evaluate.device=cpu", "runtime.device")]


@pytest.mark.parametrize("override, home", MOVED)
def test_a_moved_setting_names_its_new_home(override, home):
    old = override.split("=")[0]
    with pytest.raises(ConfigError, match=rf"^{old} has moved to {home}; set it there"):
        load_config("params.yaml", "cpu", [override])


def test_a_moved_setting_in_a_params_file_or_profile_names_its_new_home(tmp_path):
    params = yaml.safe_load(open("params.yaml"))
    base = tmp_path / "base.yaml"
    base.write_text(yaml.safe_dump({**params, "evaluate": {**params["evaluate"], "steps": 20}}))
    with pytest.raises(ConfigError, match=r"^evaluate.steps has moved to sampler.steps;"):
        load_config(base)
    params["profiles"]["cpu"]["train"]["device"] = "cpu"
    profile = tmp_path / "profile.yaml"
    profile.write_text(yaml.safe_dump(params))
    with pytest.raises(ConfigError, match=r"^profiles.cpu.train.device has moved to profiles.cpu.runtime.device;"):
        load_config(profile)
    load_config(profile, "gpu")  # a profile that is not applied is not read


def test_a_checkpoint_config_written_before_the_move_is_migrated_silently(tmp_path, caplog):
    from ddpm.checkpoint import config_of, load_checkpoint, save_checkpoint

    old = load_config("params.yaml", "cpu").to_dict()
    sampler = old.pop("sampler")
    del old["runtime"]
    old["sample"].update(sampler=sampler["name"], steps=7, eta=0.5, variance="beta", clip_denoised=False,
                         guidance_scale=2.0)
    old["train"].update(device="cpu", bf16=False)
    old["evaluate"].update(sampler="ddpm", steps=3, device="cuda")
    old["evaluate"].pop("feature_seed")
    old["export"].update(check_steps=10, int8_calibration_steps=50)
    save_checkpoint(tmp_path / "old.pt", {"model": {}, "config": old, "step": 1})
    cfg = config_of(load_checkpoint(tmp_path / "old.pt"))
    assert cfg.sampler == SamplerConfig(name="ddim", steps=7, eta=0.5, variance="beta", clip_denoised=False,
                                        guidance_scale=2.0)  # the run's own sample settings, not evaluate's
    assert cfg.runtime == RuntimeConfig(device="cpu", bf16=False)  # train's, not evaluate's
    assert cfg.evaluate.feature_seed == 0 and cfg.train == load_config("params.yaml", "cpu").train
    assert not [r for r in caplog.records if r.levelname in ("WARNING", "ERROR") and "moved" in r.message]


def test_unknown_profile_and_bad_override_syntax():
    with pytest.raises(ConfigError, match="profile"):
        load_config("params.yaml", "tpu")
    with pytest.raises(ConfigError, match="section.key=value"):
        load_config("params.yaml", None, ["steps"])


def test_config_round_trips_through_a_dict():
    cfg = load_config("params.yaml", "cifar10")
    assert config_from_dict(cfg.to_dict()) == cfg
