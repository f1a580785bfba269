"""Serve the pipeline's deployments from this process: `python -m flows.serve`.

    prefect server start --host 127.0.0.1            # terminal 1 (or any Prefect API)
    export PREFECT_API_URL=http://127.0.0.1:4200/api  # terminals 2 and 3
    python -m flows.serve                             # terminal 2: serves ddpm-pipeline/cpu and /gpu
    prefect deployment run 'ddpm-pipeline/cpu' --watch
    prefect deployment run 'ddpm-pipeline/gpu' --param overrides='["train.steps=40000"]'

Runs execute here, one at a time (they share train.out_dir), in the project root. For a work
pool and workers instead, see prefect.yaml.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any

from flows.runtime import PROJECT_ROOT, ServiceUnavailable, check_prefect_api

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


def _main(argv: list[str] | None) -> int:
    parser = argparse.ArgumentParser(prog="python -m flows.serve", description="Serve the ddpm-pipeline deployments.")
    parser.add_argument("--only", nargs="+", choices=list(DEPLOYMENTS), help="serve only these deployments")
    parser.add_argument("--limit", type=int, default=1, help="flow runs executed at once (default: %(default)s)")
    args = parser.parse_args(argv)
    if check_prefect_api() is None:
        raise ServiceUnavailable(
            "serving needs a Prefect server that `prefect deployment run` can reach as well: start one with "
            "`prefect server start --host 127.0.0.1` and export PREFECT_API_URL=http://127.0.0.1:4200/api")
    os.chdir(PROJECT_ROOT)  # flow runs resolve params.yaml and outputs from here
    from prefect import serve

    serve(*deployments(args.only), limit=args.limit)
    return 0


def main(argv: list[str] | None = None) -> int:
    from flows.stages import run_cli

    return run_cli(_main, argv, "flows.serve")


if __name__ == "__main__":
    sys.exit(main())
