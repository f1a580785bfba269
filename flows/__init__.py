"""The MLOps pipeline around `ddpm`: Prefect flows, MLflow tracking, DVC stages.

    flows.runtime   settings of one run (params.yaml + profile + overrides), paths, preflight checks
    flows.tracking  MLflow: one parent run per pipeline run, one nested run per stage
    flows.tasks     Prefect tasks: thin wrappers around ddpm functions that pass file paths
    flows.export_tasks  the export stage's tasks: ONNX export, its check, onnxruntime samples, registry
    flows.observe   the library's log lines in Prefect's run logs; a stage's progress every few seconds
    flows.artifacts the Prefect artifacts each stage publishes (summary, metrics table, image links)
    flows.stages    one flow per stage (data, features, train, evaluate, export); `python -m flows.stages`
    flows.pipeline  the `ddpm-pipeline` flow chaining the stage flows; `python -m flows.pipeline`
    flows.serve     serves the deployments `ddpm-pipeline/cpu` and `ddpm-pipeline/gpu`

Importing this package sets quiet defaults for the environment (no telemetry, short network
timeouts) and the CPU thread defaults (ddpm.threads) before Prefect, MLflow or torch is imported;
a value already in the environment wins.
"""

from flows.runtime import apply_env_defaults

apply_env_defaults()
