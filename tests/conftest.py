import os

import pytest

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("DO_NOT_TRACK", "1")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")


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
