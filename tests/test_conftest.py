"""The suite's own rule for missing data and tools: skipped locally, a failure in CI, so CI cannot stop checking."""

from __future__ import annotations

import pytest

import conftest


def test_a_missing_requirement_skips_locally_and_fails_in_ci(monkeypatch):
  monkeypatch.setattr(conftest, "IN_CI", False)
  with pytest.raises(pytest.skip.Exception, match="../shared is not present"):
    conftest.require(False, "../shared")
  monkeypatch.setattr(conftest, "IN_CI", True)
  with pytest.raises(pytest.fail.Exception, match="../shared is missing, and CI=true"):
    conftest.require(False, "../shared")
  conftest.require(True, "../shared")  # present: nothing happens either way
