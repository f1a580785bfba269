import os

import pytest

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("DO_NOT_TRACK", "1")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
if os.environ.get("PYTEST_XDIST_WORKER"):
    # `make test` runs two workers on the cores: OpenMP threads spinning for a descheduled sibling would burn
    # them (ddpm/threads.py), here and in the pipelines the tests start, which inherit this.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


@pytest.fixture
def tiny_model_cfg():
    from ddpm.config import ModelConfig
    return ModelConfig(base_channels=8, channel_mult=(1, 2), num_res_blocks=1, attention_levels=(1,),
                       num_heads=2, dropout=0.0, norm_groups=4)


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny models gain nothing from threads, and on a busy 2-core machine two OpenMP threads ran 100x slower."""
    import torch

    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(saved)


@pytest.fixture(scope="session")
def tiny_exports(tmp_path_factory):
    """{'uncond': model.onnx, 'cond': model.onnx}: testkit's tiny random-weight U-Nets exported with the default
    export settings (float32 only)."""
    import torch

    from ddpm.config import ExportConfig
    from ddpm.export import export_onnx
    from testkit import tiny_checkpoint

    d = tmp_path_factory.mktemp("tiny-exports")
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return {name: export_onnx(tiny_checkpoint(d / f"{name}.pt", name == "cond", seed=int(name == "cond")),
                                  d / name / "model.onnx", ExportConfig())
                for name in ("uncond", "cond")}
    finally:
        torch.set_num_threads(saved)


# `make test` hands whole modules to its two workers (--dist loadfile), in this order
# (--no-loadscope-reorder; xdist's default order, most tests first, put these few-test modules last,
# where one of them ran on alone at the end). Longest first, as `pytest --durations=0` summed them per module:
# whole pipelines against real servers, then compiles and exports; the short modules fill in behind.
LONGEST_FIRST = (
    "tests/test_integration_dvc.py", "tests/faults/test_pipeline_faults.py", "tests/test_integration.py",
    "tests/test_pipeline.py", "tests/test_aot_package.py", "tests/test_bench_smoke.py",
    "tests/test_compile_cache.py", "tests/test_onnx.py", "tests/test_dvc_views.py",
)


def pytest_collection_modifyitems(config, items):
    rank = {module: i for i, module in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.nodeid.split("::")[0], len(rank)))  # stable: the rest keep their order
