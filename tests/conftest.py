"""Test set-up shared by every test module.

Eight fake CPU devices (for sharding tests) and jax's persistent compilation cache must be configured before jax
initialises its backends, so this happens at import time, before any test module imports jax.
"""

import collections
import os
import pathlib

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import pytest  # noqa: E402

REPO = pathlib.Path(__file__).resolve().parents[1]
jax.config.update("jax_compilation_cache_dir", str(REPO / ".cache" / "jax"))
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)

SHARED = REPO.parent / "shared"
IN_CI = os.environ.get("CI", "").strip().lower() in ("1", "true", "yes")


def require(available: bool, what: str) -> None:
  """Skips the calling test when `what` is missing locally; fails it in CI (CI=true), where everything must be there,
  so that a missing ../shared or tool cannot silently turn checks off."""
  if available:
    return
  if IN_CI:
    pytest.fail(f"{what} is missing, and CI=true: CI must run this test", pytrace=False)
  pytest.skip(f"{what} is not present", allow_module_level=True)


@pytest.fixture(scope="session")
def shared_dir() -> pathlib.Path:
  """`../shared` beside the checkout (golden vectors, real studies)."""
  require(SHARED.is_dir(), "../shared")
  return SHARED


@pytest.fixture(scope="session")
def tianchi_dir(shared_dir) -> pathlib.Path:
  """The 150 real Tianchi studies (research use only: read in place, never copied)."""
  path = shared_dir / "data" / "tianchi"
  require((path / "lumbar_train150_annotation.json").is_file(), "../shared/data/tianchi")
  return path


def pytest_collection_modifyitems(items):
  """Files with more `slow` tests first (stable otherwise): pytest-xdist hands files to the workers in collection
  order, so the longest ones start at once instead of ending the run on one busy worker while the other idles."""
  def file_of(item):
    return item.nodeid.split("::")[0]

  slow = collections.Counter(file_of(item) for item in items if item.get_closest_marker("slow"))
  items.sort(key=lambda item: -slow[file_of(item)])
