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
