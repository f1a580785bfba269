"""Serve the pipeline's deployments from this process: `python -m flows.serve`.

    prefect server start --host 127.0.0.1            # terminal 1 (or any Prefect API)
    export PREFECT_API_URL=http://127.0.0.1:4200/api  # terminals 2 and 3
    python -m flows.serve                             # terminal 2: serves ddpm-pipeline/cpu and /gpu
    prefect deployment run 'ddpm-pipeline/cpu' --watch
    prefect deployment run 'ddpm-pipeline/gpu' --param overrides='["train.steps=40000"]'

Runs execute here, one at a time (they share train.out_dir), in the project root. For a work
pool and workers instead, see prefect.yaml; a deployment that `make deploy` gave a work pool is
replaced by the served one (`make deploy` gives it back).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import Any

from flows.runtime import PROJECT_ROOT, ServiceUnavailable, check_prefect_api

log = logging.getLogger(__name__)

# name -> (parameters, description). The gpu deployment needs a CUDA machine to serve it.
DEPLOYMENTS = {
    "cpu": ({"profile": "cpu"}, "A small model trained for a few minutes on the CPU (params.yaml profile cpu)."),
    "gpu": ({"profile": "gpu"}, "The full model on one CUDA GPU (params.yaml profile gpu)."),
}


def deployments(names: list[str] | None = None) -> list[Any]:
    from flows.pipeline import ddpm_pipeline

    return [ddpm_pipeline.to_deployment(name=name, parameters=params, description=desc, tags=["ddpm", name],
                               concurrency_limit=1)
            for name, (params, desc) in DEPLOYMENTS.items() if names is None or name in names]


def release_pool_deployments(names: list[str]) -> list[str]:
    """Delete the deployments of these names that a work pool holds (`make deploy` made them): served under the
    same name, Prefect updates a deployment in place and it keeps its pool, so its runs would go to that pool's
    workers, with no code to pull, and crash. Returns "ddpm-pipeline/<name> (work pool <pool>)" for each."""
    from prefect import get_client
    from prefect.exceptions import ObjectNotFound

    released = []
    with get_client(sync_client=True) as client:
        for name in names:
            try:
                found = client.read_deployment_by_name(f"ddpm-pipeline/{name}")
            except ObjectNotFound:
                continue
            if found.work_pool_name:
                client.delete_deployment(found.id)
                released.append(f"ddpm-pipeline/{name} (work pool {found.work_pool_name})")
    return released


def _main(argv: list[str] | None) -> int:
    parser = argparse.ArgumentParser(prog="python -m flows.serve", description="Serve the ddpm-pipeline deployments.")
    parser.add_argument("--only", nargs="+", choices=list(DEPLOYMENTS), help="serve only these deployments")
    parser.add_argument("--limit", type=int, default=1, help="flow runs executed at once (default: %(default)s)")
    args = parser.parse_args(argv)
    if check_prefect_api() is None:
        raise ServiceUnavailable(
            "serving needs a Prefect server that `prefect deployment run` can reach as well: start one with "
            "`prefect server start --host 127.0.0.1` and export PREFECT_API_URL=http://127.0.0.1:4200/api")
    for released in release_pool_deployments(args.only or list(DEPLOYMENTS)):
        log.warning("deployment %s: replaced by the one served here; `make deploy` gives it back to the pool",
                    released)
    os.chdir(PROJECT_ROOT)  # flow runs resolve params.yaml and outputs from here
    from prefect import serve

    serve(*deployments(args.only), limit=args.limit)
    return 0


def main(argv: list[str] | None = None) -> int:
    from flows.stages import run_cli

    return run_cli(_main, argv, "flows.serve")


if __name__ == "__main__":
    sys.exit(main())
