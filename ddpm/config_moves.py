"""Settings that moved to another block, and how a stored config written before the move is read.

`sampler` (how images are drawn) and `runtime` (device and precision) each hold settings that used
to be repeated in several stage sections. A params file, profile or override that still names an
old key is refused with one line naming the new home (`refuse_moved`); a checkpoint's stored config,
which a user cannot edit, is rewritten to the new keys silently (`migrate_stored`).
"""

from __future__ import annotations

from typing import Any

from ddpm.errors import ConfigError

# (old section, old key) -> (new section, new key)
MOVED: dict[tuple[str, str], tuple[str, str]] = {
    ("sample", "sampler"): ("sampler", "name"),
    ("sample", "steps"): ("sampler", "steps"),
    ("sample", "eta"): ("sampler", "eta"),
    ("sample", "variance"): ("sampler", "variance"),
    ("sample", "clip_denoised"): ("sampler", "clip_denoised"),
    ("sample", "guidance_scale"): ("sampler", "guidance_scale"),
    ("evaluate", "sampler"): ("sampler", "name"),
    ("evaluate", "steps"): ("sampler", "steps"),
    ("export", "check_steps"): ("sampler", "steps"),
    ("export", "int8_calibration_steps"): ("sampler", "steps"),
    ("train", "device"): ("runtime", "device"),
    ("train", "bf16"): ("runtime", "bf16"),
    ("evaluate", "device"): ("runtime", "device"),
}
# The old keys whose value a stored config keeps, in order of precedence: what its run itself sampled and
# trained with (evaluate.device only where train.device is missing). The evaluation's and the export
# check's own step counts were never the run's sampling, so they are dropped.
_KEPT = [old for old in MOVED if old[0] in ("sample", "train") or old == ("evaluate", "device")]


def refuse_moved(raw: dict[str, Any], prefix: str = "") -> None:
    """ConfigError naming the first moved key of `raw` (sections of settings) and its new home."""
    for section, values in raw.items():
        if not isinstance(values, dict):
            continue
        for key in values:
            if (section, key) in MOVED:
                new_section, new_key = MOVED[(section, key)]
                raise ConfigError(f"{prefix}{section}.{key} has moved to {prefix}{new_section}.{new_key}; "
                                  f"set it there (one block serves every stage that reads it)")


def migrate_stored(raw: dict[str, Any]) -> dict[str, Any]:
    """A stored config (a checkpoint's) with every moved key in its new home; a config without one is returned as is.

    A value already under the new key wins; otherwise the run's own sample and train values are
    taken; the evaluation's and the export check's old step counts, which no run stored as its own
    sampling, are dropped.
    """
    if not any(isinstance(v, dict) and any((s, k) in MOVED for k in v) for s, v in raw.items()):
        return raw
    out = {s: dict(v) if isinstance(v, dict) else v for s, v in raw.items()}
    for section, key in _KEPT:
        new_section, new_key = MOVED[(section, key)]
        target = out.setdefault(new_section, {})
        if isinstance(out.get(section), dict) and key in out[section] and isinstance(target, dict) \
                and new_key not in target:
            target[new_key] = out[section][key]
    for section, key in MOVED:
        if isinstance(out.get(section), dict):
            out[section].pop(key, None)
    return out
