import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

from e2kd.registry import registry  # noqa: E402


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


class TinyCNN(nn.Module):
    """conv -> relu -> conv ('feat') -> relu -> GAP -> fc, small enough for finite differences."""

    def __init__(self, num_classes: int = 3, width: int = 4, bn: bool = False) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, width, 3, padding=1), nn.BatchNorm2d(width) if bn else nn.Identity(), nn.ReLU())
        self.feat = nn.Sequential(nn.Conv2d(width, width, 3, stride=2, padding=1), nn.ReLU())
        self.fc = nn.Linear(width, num_classes)
        self.feature_info = [{"num_chs": width, "reduction": 2, "module": "feat"}]

    def forward(self, x):
        return self.fc(self.feat(self.stem(x)).mean(dim=(2, 3)))


@pytest.fixture
def tiny_pair():
    torch.manual_seed(1)
    teacher = TinyCNN(width=6).double()
    student = TinyCNN(width=4).double()
    x = torch.randn(3, 3, 8, 8, dtype=torch.float64)
    return teacher, student, x


def check_gradient(loss_fn, params, *, samples=3, rel=1e-5, abs=1e-8, seed=0):
    """Autograd gradient of ``loss_fn()`` w.r.t. ``params`` vs central finite differences.

    Checks ``samples`` random entries of every parameter (use float64 models); returns the
    autograd gradients.
    """
    grads = torch.autograd.grad(loss_fn(), params, allow_unused=True)
    grads = [torch.zeros_like(p) if g is None else g for p, g in zip(params, grads)]
    assert any(g.abs().max() > 0 for g in grads), "all gradients are zero"
    gen = torch.Generator().manual_seed(seed)
    eps = 1e-6
    for p, g in zip(params, grads):
        flat = p.data.view(-1)
        for i in torch.randperm(flat.numel(), generator=gen)[:samples].tolist():
            orig = flat[i].item()
            flat[i] = orig + eps
            up = loss_fn().item()
            flat[i] = orig - eps
            down = loss_fn().item()
            flat[i] = orig
            assert g.reshape(-1)[i].item() == pytest.approx((up - down) / (2 * eps), rel=rel, abs=abs), (tuple(p.shape), i)
    return grads
