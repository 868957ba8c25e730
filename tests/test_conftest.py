"""The test helpers themselves: a missing dev extra skips locally and fails in CI."""

import pytest

from .conftest import dev_extra


def test_dev_extra_fails_in_ci_and_skips_elsewhere(monkeypatch):
    monkeypatch.setenv("CI", "true")
    with pytest.raises(ImportError, match="install the dev extra"):
        dev_extra("e2kd_no_such_module")
    monkeypatch.delenv("CI")
    with pytest.raises(pytest.skip.Exception, match="is not installed"):
        dev_extra("e2kd_no_such_module")
    assert dev_extra("math").sqrt(4.0) == 2.0


def test_a_forked_test_process_killed_while_drawing_a_bar_blocks_no_other():
    """tqdm's lock in tests is this process's alone: a child that dies holding it (a mutant's
    timeout under mutmut's fork server) leaves the next forked child free to draw its bar."""
    import multiprocessing
    import os
    import signal

    import tqdm

    assert tqdm.tqdm.monitor_interval == 0
    tqdm.tqdm.get_lock()  # made before the forks, as mutmut's fork server has it
    holder = os.fork()
    if holder == 0:  # a child that takes the lock and is killed with it
        tqdm.tqdm.get_lock().acquire()
        os.kill(os.getpid(), signal.SIGKILL)
    os.waitpid(holder, 0)
    ctx = multiprocessing.get_context("fork")
    drawer = ctx.Process(target=lambda: list(tqdm.tqdm(range(3), disable=False)))
    drawer.start()
    drawer.join(timeout=20)
    hung = drawer.is_alive()
    if hung:
        drawer.kill()
    assert not hung and drawer.exitcode == 0
