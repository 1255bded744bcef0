"""Device mesh, shardings and multi-host start-up: the same training code on 1 CPU, 8 fake devices, a GPU or a pod.

Data parallelism by sharding (no pmap, no rewrites): a 1-D `Mesh` named `("data",)` over every device of every
process; batches are split along their leading axis over "data", the train state is replicated. Under `jax.jit` with
these shardings XLA inserts the gradient all-reduce, and BatchNorm's batch statistics (means over the batch axis of
a sharded array) are computed over the GLOBAL batch.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np
from absl import logging
from jax.sharding import Mesh, NamedSharding, PartitionSpec

DATA_AXIS = "data"

# Environment variables that mean "this process is one of several": jax.distributed.initialize() then finds the
# coordinator itself (SLURM, Open MPI, Cloud TPU pods) or reads JAX_COORDINATOR_ADDRESS.
_MULTI_PROCESS_ENV_COUNTS = ("SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE", "JAX_NUM_PROCESSES")


def _multi_process_environment() -> bool:
  """True when the environment says this process is part of a multi-process (multi-host) job."""
  if os.environ.get("JAX_COORDINATOR_ADDRESS"):
    return True
  for name in _MULTI_PROCESS_ENV_COUNTS:
    value = os.environ.get(name, "")
    if value.isdigit() and int(value) > 1:
      return True
  # Cloud TPU pod slices list every worker of the slice.
  return "," in os.environ.get("TPU_WORKER_HOSTNAMES", "")


def maybe_initialize_distributed(coordinator_address: str | None = None,
                                 num_processes: int | None = None,
                                 process_id: int | None = None) -> bool:
  """Calls `jax.distributed.initialize` when this process is one of several; a no-op on a single host.

  Multi-process when any argument is given, or `CCFNET_DISTRIBUTED=1`, or the environment is a multi-process
  launch (JAX_COORDINATOR_ADDRESS with JAX_NUM_PROCESSES / JAX_PROCESS_ID, SLURM, Open MPI, a Cloud TPU pod slice).
  `CCFNET_DISTRIBUTED=0` forces a single process. Must run before anything touches a JAX backend.

  Returns:
    Whether `jax.distributed.initialize` was called.
  """
  forced = os.environ.get("CCFNET_DISTRIBUTED", "").strip().lower()
  explicit = any(v is not None for v in (coordinator_address, num_processes, process_id))
  if forced in ("0", "false", "no") and not explicit:
    return False
  if not (explicit or forced in ("1", "true", "yes") or _multi_process_environment()):
    return False
  if num_processes is None and os.environ.get("JAX_NUM_PROCESSES"):
    num_processes = int(os.environ["JAX_NUM_PROCESSES"])
  if process_id is None and os.environ.get("JAX_PROCESS_ID"):
    process_id = int(os.environ["JAX_PROCESS_ID"])
  jax.distributed.initialize(coordinator_address=coordinator_address, num_processes=num_processes,
                             process_id=process_id)
  logging.info("jax.distributed initialised: process %d of %d, %d local / %d global devices",
               jax.process_index(), jax.process_count(), jax.local_device_count(), jax.device_count())
  return True


_XLA_DEVICE_COUNT_FLAG = re.compile(r"--xla_force_host_platform_device_count=(\d+)")


def usable_cores() -> int:
  """CPU cores this process may run on (its affinity mask where the OS has one)."""
  return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def configure_cpu_devices(requested: int = 0, batch_sizes: Sequence[int] = (), *,
                          multi_process: bool | None = None) -> int:
  """Splits the host CPU into several XLA devices, so that a CPU run is data-parallel over its cores.

  XLA:CPU runs one program on one device with intra-op threads, which scale worse than one device per core
  (docs/performance.md). The math is the same program: BatchNorm statistics and the gradient stay global (module
  docstring), only the order of float additions changes. Accelerator backends are not affected (the setting is the
  CPU client's), so it is safe to call on every machine, but it must run before anything starts a JAX backend.

  Args:
    requested: devices to make; 0 chooses: the largest count <= `usable_cores()` that divides every batch size in
      `batch_sizes` (1 where none does), single-process runs only.
    batch_sizes: the global batch sizes the mesh must split evenly (train and eval).
    multi_process: whether this process is one of several (default: what the environment says; pass the result of
      `maybe_initialize_distributed` where flags may have started it).

  Returns:
    The number of CPU devices set, or 0 where this left JAX alone: XLA_FLAGS already sets
    `--xla_force_host_platform_device_count` (the user's choice wins), or `requested` is 0 in a multi-process run.
  """
  if requested < 0:
    raise ValueError(f"cpu_devices = {requested}: expected 0 (one per core that divides the batch) or a count >= 1")
  if _XLA_DEVICE_COUNT_FLAG.search(os.environ.get("XLA_FLAGS", "")):
    return 0
  count = requested
  if not count:
    if _multi_process_environment() if multi_process is None else multi_process:
      return 0
    common = math.gcd(*batch_sizes) if batch_sizes else 1
    count = max(d for d in range(1, usable_cores() + 1) if common % d == 0)
  try:
    jax.config.update("jax_num_cpu_devices", count)
  except RuntimeError as e:
    raise RuntimeError(f"cpu_devices = {count}: JAX has already started a backend, so the CPU can no longer be "
                       "split; call parallel.configure_cpu_devices first") from e
  return count


DEFAULT_COMPILATION_CACHE = os.path.join("~", ".cache", "ccfnet_jax", "jax")


def enable_compilation_cache(directory: str | None = DEFAULT_COMPILATION_CACHE) -> str | None:
  """Points JAX's persistent compilation cache at `directory` (created on use); returns it, or None when off.

  A resumed or repeated run then loads its compiled steps instead of compiling them again. `None` or "" leaves the
  cache off; the environment variable JAX_COMPILATION_CACHE_DIR, where set, wins (JAX reads it itself).
  """
  if os.environ.get("JAX_COMPILATION_CACHE_DIR"):
    return os.environ["JAX_COMPILATION_CACHE_DIR"]
  if not directory:
    return None
  directory = os.path.abspath(os.path.expanduser(directory))
  jax.config.update("jax_compilation_cache_dir", directory)
  return directory


def make_mesh(devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A 1-D data-parallel mesh `("data",)` over `devices` (default: every device of every process)."""
  devices = list(jax.devices() if devices is None else devices)
  if not devices:
    raise ValueError("make_mesh: no devices given")
  return Mesh(np.asarray(devices), (DATA_AXIS,))


def data_sharding(mesh: Mesh) -> NamedSharding:
  """Leading (batch) axis split over the "data" axis, other axes whole."""
  return NamedSharding(mesh, PartitionSpec(DATA_AXIS))


def replicated_sharding(mesh: Mesh) -> NamedSharding:
  """A full copy on every device of the mesh (train state, scalars)."""
  return NamedSharding(mesh, PartitionSpec())


def num_data_shards(mesh: Mesh) -> int:
  """Number of devices along the "data" axis."""
  return int(mesh.shape[DATA_AXIS])


def check_global_batch_size(batch_size: int, mesh: Mesh, what: str = "batch_size") -> None:
  """Raises ValueError unless `batch_size` splits evenly over the mesh's devices and over the processes.

  (Host batches become global arrays with `ccfnet_jax.data.pipeline.to_global`.)
  """
  shards = num_data_shards(mesh)
  if batch_size <= 0 or batch_size % shards:
    raise ValueError(f"config.{what} = {batch_size} must be a positive multiple of the number of devices on the "
                     f"'data' axis ({shards})")
  if batch_size % jax.process_count():
    raise ValueError(f"config.{what} = {batch_size} must be a multiple of the process count {jax.process_count()}")


def folds_data_sharding(mesh: Mesh) -> NamedSharding:
  """Batches of stacked folds `[F, B, ...]`: the fold axis whole, the batch axis split over "data"."""
  return NamedSharding(mesh, PartitionSpec(None, DATA_AXIS))


def host_to_global(batch: Mapping[str, Any], mesh: Mesh, *, stacked_folds: bool = False) -> dict[str, jax.Array]:
  """This host's rows of a global batch -> global jax arrays split over the mesh's "data" axis.

  The batch axis is the leading one, or the second one after a fold axis (`stacked_folds`). Works on one device,
  on fake CPU devices and across hosts (global batch = local batch * process_count).
  """
  sharding = folds_data_sharding(mesh) if stacked_folds else data_sharding(mesh)
  out = {}
  for key, value in batch.items():
    value = np.asarray(value)
    if value.dtype.kind not in "biuf":
      raise TypeError(f"batch[{key!r}] has dtype {value.dtype}; only numeric arrays go to devices")
    try:
      out[key] = jax.make_array_from_process_local_data(sharding, value)
    except ValueError as e:
      raise ValueError(f"cannot shard batch[{key!r}] of shape {value.shape} with {sharding}: {e}") from e
  return out


def replicate(tree: Any, mesh: Mesh) -> Any:
  """Places a pytree of host or device arrays on every device of the mesh (the same value everywhere).

  Every process must pass the same values (e.g. from the same seed or the same checkpoint).
  """
  sharding = replicated_sharding(mesh)

  def put(x):
    x = np.asarray(x) if not isinstance(x, jax.Array) else x
    if jax.process_count() == 1:
      return jax.device_put(x, sharding, may_alias=False)  # a fresh copy: the train step donates it
    host = np.asarray(jax.device_get(x)) if isinstance(x, jax.Array) else x
    return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])

  return jax.tree.map(put, tree)


def to_host(tree: Any) -> Any:
  """Fetches a pytree of (fully replicated or fully addressable) arrays to numpy on this host."""
  return jax.tree.map(lambda x: np.asarray(jax.device_get(x)), tree)
