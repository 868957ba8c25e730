import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

from e2kd.registry import registry  # noqa: E402
from e2kd.testing import TinyCNN  # noqa: E402


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    yield


@pytest.fixture
def fresh_registry():
    """A registry rebuilt from scratch before and after the test (for env-var and ad-hoc plugins)."""
    registry().reset()
    yield registry()
    registry().reset()


#: A tiny experiment config (seconds to train) for CLI and run-directory tests.
TINY = {
    "seed": 0,
    "data": {"num_classes": 3, "image_size": 16, "train_per_class": 6, "test_per_class": 4, "bias": 0.9},
    "model": {"name": "small_resnet", "options": {"widths": [4, 8]}},
    "train": {"epochs": 2, "batch_size": 8, "progress": False},
}


@pytest.fixture
def tiny_pair():
    torch.manual_seed(1)
    teacher = TinyCNN(width=6).double()
    student = TinyCNN(width=4).double()
    x = torch.randn(3, 3, 8, 8, dtype=torch.float64)
    return teacher, student, x


