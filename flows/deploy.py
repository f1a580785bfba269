"""Create the work pools that prefect.yaml names, then deploy: `python -m flows.deploy` (`make deploy`).

    export PREFECT_API_URL=http://127.0.0.1:4200/api    # a running server (`make prefect-server`)
    python -m flows.deploy                               # pools ddpm-cpu and ddpm-gpu, deployments cpu and gpu
    prefect worker start --pool ddpm-cpu                 # from the project root

Running it again changes nothing but the deployments, which `prefect deploy` updates in place: a
pool that exists is kept as it is (its settings may have been changed on purpose). Pools are of the
`process` type: a worker runs each flow run as a process in the checkout it was deployed from.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import yaml

from flows.runtime import PROJECT_ROOT, ServiceUnavailable, check_prefect_api

PREFECT = str(Path(sys.executable).parent / "prefect")
POOL_TYPE = "process"


def work_pools(prefect_yaml: Path) -> list[str]:
    """The work pools that prefect.yaml's deployments name, in order, once each."""
    deployments = (yaml.safe_load(prefect_yaml.read_text()) or {}).get("deployments") or []
    names = [(d.get("work_pool") or {}).get("name") for d in deployments]
    return list(dict.fromkeys(n for n in names if n))


def _prefect(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([PREFECT, *args], cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=300)


def ensure_pool(name: str) -> bool:
    """Create the work pool `name` unless it exists; returns whether it was created."""
    if _prefect("work-pool", "inspect", name).returncode == 0:
        return False
    made = _prefect("work-pool", "create", name, "--type", POOL_TYPE)
    if made.returncode != 0:
        said = (made.stderr or made.stdout).strip().splitlines() or ["no output"]
        raise ServiceUnavailable(f"`prefect work-pool create {name} --type {POOL_TYPE}` failed: {said[-1]}")
    return True


def _main(argv: list[str] | None) -> int:
    parser = argparse.ArgumentParser(prog="python -m flows.deploy", description=__doc__.split("\n\n")[0])
    parser.parse_args(argv)
    if check_prefect_api() is None:
        raise ServiceUnavailable(
            "deploying needs a Prefect server that workers can reach: start one with `make prefect-server` and "
            "export PREFECT_API_URL=http://127.0.0.1:4200/api")
    for pool in work_pools(PROJECT_ROOT / "prefect.yaml"):
        print(f"work pool {pool}: {'created' if ensure_pool(pool) else 'exists, kept as it is'}", flush=True)
    return subprocess.call([PREFECT, "--no-prompt", "deploy", "--all"], cwd=PROJECT_ROOT)


def main(argv: list[str] | None = None) -> int:
    from flows.stages import run_cli

    return run_cli(_main, argv, "flows.deploy", extensions=())  # it only runs the prefect CLI: no torch, no onnx


if __name__ == "__main__":
    sys.exit(main())
