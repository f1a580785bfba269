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
# Where a stored config's value of a new key comes from, first match first: what the run itself used.
_STORED_SOURCES = {
    ("sampler", "name"): [("sample", "sampler")],
    ("sampler", "steps"): [("sample", "steps")],
    ("sampler", "eta"): [("sample", "eta")],
    ("sampler", "variance"): [("sample", "variance")],
    ("sampler", "clip_denoised"): [("sample", "clip_denoised")],
    ("sampler", "guidance_scale"): [("sample", "guidance_scale")],
    ("runtime", "device"): [("train", "device"), ("evaluate", "device")],
    ("runtime", "bf16"): [("train", "bf16")],
}


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
    for (new_section, new_key), sources in _STORED_SOURCES.items():
        found = [out[s][k] for s, k in sources if isinstance(out.get(s), dict) and k in out[s]]
        target = out.setdefault(new_section, {})
        if found and isinstance(target, dict) and new_key not in target:
            target[new_key] = found[0]
    for section, key in MOVED:
        if isinstance(out.get(section), dict):
            out[section].pop(key, None)
    return out
