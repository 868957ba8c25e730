import copy
import importlib
import os
import sys
import tempfile
import threading

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# decoded-image caches of tests go to a folder of this session, never to ~/.cache
os.environ.setdefault("E2KD_CACHE_DIR", tempfile.mkdtemp(prefix="e2kd-test-cache-"))

import pytest  # noqa: E402
import torch  # noqa: E402
import tqdm  # noqa: E402

# No tqdm monitor thread in tests: it takes tqdm's lock every few seconds, and a test process forked
# while it holds it (mutmut forks one per mutant) blocks for ever on its first progress bar.
tqdm.tqdm.monitor_interval = 0
# And a lock of this process only: tqdm's default write lock includes a multiprocessing semaphore that
# forked test processes share, so one killed while drawing a bar (a mutant's timeout) would leave it
# taken, and every later test process would block on its first bar.
tqdm.tqdm.set_lock(threading.RLock())

from e2kd.registry import registry  # noqa: E402
from e2kd.testing import TinyCNN  # noqa: E402


def dev_extra(module: str):
    """Import a module of the dev extra. Missing, it skips the calling test module on a developer's
    machine but fails loudly in CI (``CI`` set), where the extra must be installed."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        if os.environ.get("CI"):
            raise ImportError(
                f"{module} is missing but CI runs every test: install the dev extra (pip install -e '.[dev]')"
            ) from exc
        pytest.skip(f"{module} is not installed (pip install -e '.[dev]')", allow_module_level=True)


def end_spawned_worker() -> None:
    """End a spawned gloo worker whose results are written and whose peers passed the last barrier, at
    once: interpreter teardown in those workers has now and then aborted the process ("terminate called
    without an active exception", SIGABRT) after the work was done."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


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


@pytest.fixture
def disagreeing_pair():
    """A teacher and a student that disagree on every sample: the student is the teacher with its
    class rows rolled by one, so it predicts (t + 1) mod 3 where the teacher predicts t, and its
    map of class t + 1 is exactly the teacher's map of class t (float64, 4 images of 8 x 8)."""
    torch.manual_seed(1)
    teacher = TinyCNN(width=6).double()
    student = copy.deepcopy(teacher)
    with torch.no_grad():
        student.fc.weight.copy_(teacher.fc.weight.roll(1, dims=0))
        student.fc.bias.copy_(teacher.fc.bias.roll(1))
    return teacher, student, torch.randn(4, 3, 8, 8, dtype=torch.float64)


@pytest.fixture
def spread_images():
    """Four 8 x 8 images of very different brightness, to which TinyCNN(num_classes=3) seeded 10
    gives different top-1 classes (a test that must tell "each image's top-1" from one class uses them)."""
    return torch.rand(4, 3, 8, 8, generator=torch.Generator().manual_seed(1)) * torch.tensor([0.1, 1, 3, 6]).view(
        4, 1, 1, 1
    )
