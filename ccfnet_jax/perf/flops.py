"""FLOPs of a compiled step, and the measured matrix-product rate the model FLOP utilisation is taken against."""

from __future__ import annotations

import statistics
from typing import Any

import jax
import jax.numpy as jnp

from ccfnet_jax.perf import timing


def xla_flops(compiled: Any, num_partitions: int = 1) -> float | None:
  """FLOPs of one call of a compiled jax function from XLA's cost analysis (None when the backend gives none).

  XLA analyses the SPMD-partitioned module, i.e. one device's share: `num_partitions` (the devices of a data-parallel
  mesh) scales it back to the whole call.
  """
  try:
    analysis = compiled.cost_analysis()
  except Exception:  # pylint: disable=broad-except  (not every backend implements it)
    return None
  if isinstance(analysis, (list, tuple)):
    analysis = analysis[0] if analysis else None
  if not analysis or "flops" not in analysis:
    return None
  return float(analysis["flops"]) * num_partitions


def default_matmul_size(platform: str) -> int:
  """Side of the reference matrix product: large enough to reach the device's peak, small enough for a CPU."""
  return 2048 if platform == "cpu" else 8192


def matmul_flops_per_s(size: int, dtype: str, *, steps: int, warmup: int,
                       device: jax.Device | None = None) -> tuple[float, list[float]]:
  """FLOP/s of one device on an N x N x N matrix product in `dtype` (2 N^3 FLOPs a call), and the call seconds.

  The measured reference for the model FLOP utilisation: what the device reaches on the work it does best, in the
  step's own dtype.
  """
  if size < 1:
    raise ValueError(f"matmul size {size}: expected >= 1")
  device = device or jax.devices()[0]
  keys = jax.random.split(jax.random.key(0))
  a, b = (jax.device_put(jax.random.normal(k, (size, size), jnp.float32).astype(dtype), device) for k in keys)
  product = jax.jit(jnp.matmul)
  seconds = timing.time_calls(lambda: product(a, b), steps, max(warmup, 1))
  return 2.0 * size ** 3 / statistics.median(seconds), seconds


def mfu_reference(matmul_rate: float, platform: str, num_devices: int) -> float:
  """The FLOP/s a step on `num_devices` devices is measured against: the one-device matmul rate times the devices
  on accelerators; on a CPU the rate alone, because the CPU devices are slices of the same cores, all of which the
  matrix product above already used."""
  return matmul_rate * (1 if platform == "cpu" else num_devices)
