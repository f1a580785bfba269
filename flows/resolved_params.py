"""The settings a run uses, resolved: params.yaml with its active profile applied, written for DVC.

dvc.yaml's first stage, `settings`, writes <train.out_dir>/resolved_params.yaml with this module, and
every other stage tracks the keys it reads in that file rather than params.yaml's sections and the
whole active profile. So:

- a stage reruns when a value it reads changes, whether the change is made in a base section or
  under the active profile, and not when the profile changes a value that only other stages read;
- `dvc exp show` and `dvc params diff` show the values each run used (train.steps as the cpu profile sets
  it, not the base section's).

The stages themselves still read params.yaml (flows.runtime.load_settings), through the same
ddpm.config.load_config, so the file and the run cannot disagree. Relative paths stay as configured
(data, runs/default), so the file is the same on every machine.

    python -m flows.resolved_params [--params params.yaml] [--profile P] [section.key=value ...]
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

import yaml

from ddpm.config import load_config
from ddpm.errors import DDPMError
from ddpm.fileio import atomic_write_bytes
from flows.runtime import Settings, check_device, load_settings


def resolved(settings: Settings) -> dict[str, Any]:
    """Every setting after profile and overrides, keyed by section as in params.yaml, plus `profile`."""
    cfg = load_config(settings.params_path, settings.profile, settings.overrides)
    return {"profile": settings.profile, **cfg.to_dict()}


def write_resolved(settings: Settings) -> str:
    """Write resolved_params.yaml into the run folder (atomically); returns its path."""
    text = ("# Written by `python -m flows.resolved_params` (dvc.yaml's settings stage): params.yaml with the "
            "active profile\n# applied. Edit params.yaml, not this file.\n"
            + yaml.safe_dump(resolved(settings), sort_keys=False, default_flow_style=False))
    atomic_write_bytes(settings.layout.resolved_params, text.encode())
    return str(settings.layout.resolved_params)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m flows.resolved_params", description=__doc__.split("\n\n")[0])
    parser.add_argument("overrides", nargs="*", metavar="section.key=value", help="override a setting")
    parser.add_argument("--params", default="params.yaml", help="settings file (default: %(default)s)")
    parser.add_argument("--profile", default=None, help="profile of the settings file (default: its `profile:` key)")
    args = parser.parse_args(argv)
    try:
        settings = load_settings(args.params, args.profile, args.overrides)
        check_device(settings.cfg)
        path = write_resolved(settings)
    except DDPMError as exc:
        print(f"{parser.prog}: error: {exc}", file=sys.stderr)
        return 2
    print(f"resolved settings -> {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
