"""Property-based checks of the config parser and the samplers' argument checks (hypothesis)."""

import dataclasses

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ddpm.config import _SECTION_CLASSES, Config, ConfigError, config_from_dict
from ddpm.samplers import ddim_timesteps

pytestmark = pytest.mark.faults

FIELDS = [(section, f.name) for section, cls in _SECTION_CLASSES.items() for f in dataclasses.fields(cls)]
ANY_VALUE = st.one_of(st.none(), st.booleans(), st.integers(-10**6, 10**6), st.floats(allow_nan=True),
                      st.text(max_size=8), st.lists(st.integers(-3, 9), max_size=6),
                      st.dictionaries(st.text(max_size=3), st.integers(), max_size=2))


@settings(max_examples=400, suppress_health_check=[HealthCheck.too_slow], deadline=None)
@given(field=st.sampled_from(FIELDS), value=ANY_VALUE)
def test_any_value_is_accepted_or_named_in_the_error(field, value):
    section, key = field
    try:
        cfg = config_from_dict({section: {key: value}})
    except ConfigError as exc:
        # The error names a key: the one we set, or a setting it conflicts with.
        assert str(exc).split(":")[0].split("[")[0] in {f"{s}.{k}" for s, k in FIELDS}, str(exc)
        return
    assert isinstance(cfg, Config)
    stored = getattr(getattr(cfg, section), key)
    expected = tuple(value) if isinstance(value, list) else value
    if isinstance(value, str) and isinstance(stored, float):  # a number written as text, as YAML 1.1 reads 1e-3
        expected = float(value)
    assert stored == expected


@settings(max_examples=200, deadline=None)
@given(section=st.sampled_from(list(_SECTION_CLASSES)), key=st.text(min_size=1, max_size=12))
def test_unknown_keys_are_refused_by_name(section, key):
    known = {f.name for f in dataclasses.fields(_SECTION_CLASSES[section])}
    if key in known:
        return
    with pytest.raises(ConfigError) as info:
        config_from_dict({section: {key: 1}})
    assert str(info.value).startswith(f"{section}.{key}: unknown setting")


@settings(max_examples=200, deadline=None)
@given(T=st.integers(1, 2000), steps=st.integers(-5, 2500))
def test_ddim_timesteps_are_valid_or_refused(T, steps):
    if not 0 < steps <= T:
        with pytest.raises(ValueError, match="steps"):
            ddim_timesteps(T, steps)
        return
    seq = ddim_timesteps(T, steps)
    assert len(seq) == steps and seq[-1] == 0 and all(0 <= t < T for t in seq)
    assert all(a > b for a, b in zip(seq, seq[1:]))
