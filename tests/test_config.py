import pytest

from ddpm.config import Config, ConfigError, config_from_dict, load_config


def test_params_yaml_loads_with_every_profile():
    for profile in (None, "cpu", "gpu", "gpu-fast", "cifar10"):
        cfg = load_config("params.yaml", profile)
        assert isinstance(cfg, Config)
    assert load_config("params.yaml").model.base_channels == 16  # the file's default profile is cpu
    assert load_config("params.yaml", "cifar10").model.channel_mult == (1, 2, 2, 2)


def test_overrides_apply_last():
    cfg = load_config("params.yaml", "cpu", ["train.steps=7", "model.channel_mult=[1,2]", "model.attention_levels=[1]",
                                             "sample.sampler=ddpm"])
    assert cfg.train.steps == 7 and cfg.model.channel_mult == (1, 2) and cfg.sample.sampler == "ddpm"


@pytest.mark.parametrize("override, key", [
    ("diffusion.timesteps=-5", "diffusion.timesteps"),
    ("diffusion.beta_end=1.0", "diffusion.beta_end"),
    ("diffusion.beta_start=0.03", "diffusion.beta_start"),
    ("diffusion.schedule=quadratic", "diffusion.schedule"),
    ("train.steps=ten", "train.steps"),
    ("train.bf16=1", "train.bf16"),
    ("train.stepz=10", "train.stepz"),
    ("model.channel_mult=[1,2,2,2,2]", "model.channel_mult"),
    ("model.attention_levels=[5]", "model.attention_levels"),
    ("sample.steps=5000", "sample.steps"),
    ("export.check_steps=5000", "export.check_steps"),
    ("sample.label=10", "sample.label"),
    ("trian.steps=1", "trian"),
    ("export.int8_mean_atol=0", "export.int8_mean_atol"),
    ("export.int8_calibration_images=0", "export.int8_calibration_images"),
])
def test_bad_settings_name_the_key(override, key):
    with pytest.raises(ConfigError) as info:
        load_config("params.yaml", "cpu", [override])
    assert str(info.value).startswith(key)


def test_a_label_needs_a_class_conditional_model():
    with pytest.raises(ConfigError, match=r"^sample.label: the model is not class-conditional"):
        load_config("params.yaml", "cpu", ["model.class_conditional=false", "sample.label=3"])


def test_int8_calibration_steps_are_checked_against_the_timesteps_when_int8_is_on():
    load_config("params.yaml", "cpu", ["export.int8_calibration_steps=2000"])  # int8 off: not used
    with pytest.raises(ConfigError, match=r"^export.int8_calibration_steps: 2000 exceeds diffusion.timesteps \(1000\)"):
        load_config("params.yaml", "cpu", ["export.int8_calibration_steps=2000", "export.int8=true"])


def test_unknown_profile_and_bad_override_syntax():
    with pytest.raises(ConfigError, match="profile"):
        load_config("params.yaml", "tpu")
    with pytest.raises(ConfigError, match="section.key=value"):
        load_config("params.yaml", None, ["steps"])


def test_config_round_trips_through_a_dict():
    cfg = load_config("params.yaml", "cifar10")
    assert config_from_dict(cfg.to_dict()) == cfg
