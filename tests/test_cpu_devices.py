"""Process start-up settings of parallel: configure_cpu_devices (a CPU host split into data-parallel XLA devices)
and enable_compilation_cache. Each case runs in a fresh process, as both must happen before JAX starts a backend."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest

from ccfnet_jax import parallel

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(code: str, xla_flags: str | None = None, cache_env: str | None = None) -> dict:
  env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_COMPILATION_CACHE_DIR")}
  if xla_flags is not None:
    env["XLA_FLAGS"] = xla_flags
  if cache_env is not None:
    env["JAX_COMPILATION_CACHE_DIR"] = cache_env
  for name in ("JAX_COORDINATOR_ADDRESS", "SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE", "JAX_NUM_PROCESSES"):
    env.pop(name, None)
  script = "import json, jax\nfrom ccfnet_jax import parallel\n" + code
  out = subprocess.run([sys.executable, "-c", script], cwd=_ROOT, env=env, capture_output=True, text=True, check=True)
  return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("batch_sizes", [(8, 8), (6, 4), (3,)])
def test_auto_picks_the_most_cores_that_divide_every_batch(batch_sizes):
  got = _run(f"n = parallel.configure_cpu_devices(0, {batch_sizes!r})\n"
             "print(json.dumps({'n': n, 'devices': len(jax.devices()), 'cores': parallel.usable_cores()}))")
  common = math.gcd(*batch_sizes)
  expected = max(d for d in range(1, got["cores"] + 1) if common % d == 0)
  assert got["n"] == got["devices"] == expected


def test_explicit_count_and_the_users_xla_flag_win():
  got = _run("print(json.dumps({'n': parallel.configure_cpu_devices(3, (2,)), 'devices': len(jax.devices())}))")
  assert got == {"n": 3, "devices": 3}  # explicit: not bound to the core count or the batch
  got = _run("print(json.dumps({'n': parallel.configure_cpu_devices(0, (8,)), 'devices': len(jax.devices())}))",
             xla_flags="--xla_force_host_platform_device_count=5")
  assert got == {"n": 0, "devices": 5}
  got = _run("n = parallel.configure_cpu_devices(0, (8,), multi_process=True)\n"
             "print(json.dumps({'n': n, 'devices': len(jax.devices())}))")
  assert got == {"n": 0, "devices": 1}  # one process of several: auto leaves JAX's single CPU device


def test_too_late_and_negative_are_refused():
  got = _run("jax.numpy.zeros(1).block_until_ready()\n"
             "try:\n  parallel.configure_cpu_devices(2)\n  print(json.dumps({'error': None}))\n"
             "except RuntimeError as e:\n  print(json.dumps({'error': str(e)}))")
  assert "already started a backend" in got["error"]
  with pytest.raises(ValueError, match="cpu_devices = -1"):
    parallel.configure_cpu_devices(-1)


def test_compilation_cache_is_set_off_or_left_to_the_environment(tmp_path):
  report = ("print(json.dumps({'got': got, 'config': jax.config.jax_compilation_cache_dir, "
            "'files': len(os.listdir(got)) if got and os.path.isdir(got) else 0}))")
  compile_once = "jax.jit(lambda x: jnp.sin(x) @ x.T)(jnp.ones((64, 64))).block_until_ready()\n"
  prefix = "import os\nimport jax.numpy as jnp\njax.config.update('jax_persistent_cache_min_compile_time_secs', 0)\n"
  got = _run(prefix + f"got = parallel.enable_compilation_cache({str(tmp_path / 'c')!r})\n" + compile_once + report)
  assert got["got"] == got["config"] == str(tmp_path / "c") and got["files"] > 0  # the compiled program was stored
  got = _run(prefix + "got = parallel.enable_compilation_cache('')\n" + report)
  assert got["got"] is None and not got["config"]
  got = _run(prefix + f"got = parallel.enable_compilation_cache({str(tmp_path / 'c')!r})\n" + report,
             cache_env=str(tmp_path / "env"))
  assert got["got"] == str(tmp_path / "env") and got["config"] == str(tmp_path / "env")
