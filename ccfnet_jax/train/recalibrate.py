"""BatchNorm recalibration ("precise BN"): running statistics from the unaugmented training images.

Training normalises augmented images with their batch statistics, and the running averages follow those images;
evaluation sees unaugmented ones. Averaging the statistics of unaugmented training images matches the statistics
to what evaluation sees. The parameters are untouched, and training never reads the running statistics, so only
the evaluations (and what the checkpoints hold for inference) change.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ccfnet_jax import parallel


def batch_statistics(params: nnx.State, batch_stats: nnx.State, image: jax.Array, *,
                     graphdef: nnx.GraphDef) -> nnx.State:
  """The BatchNorm statistics (mean, biased var) of one batch: the train-mode forward pass with momentum 0."""
  model = nnx.merge(graphdef, params, batch_stats, copy=True)
  for _, module in nnx.iter_graph(model):
    if isinstance(module, nnx.BatchNorm):
      module.momentum = 0.0  # the running statistics become this batch's
  model(image)
  return nnx.state(model, nnx.BatchStat)


@functools.lru_cache(maxsize=8)
def _jit_batch_statistics(graphdef: nnx.GraphDef, mesh: jax.sharding.Mesh) -> Callable[..., nnx.State]:
  """`batch_statistics` jitted on `mesh`, built once per (model, mesh): a fold recalibrates at every evaluation."""
  replicated = parallel.replicated_sharding(mesh)
  return jax.jit(functools.partial(batch_statistics, graphdef=graphdef),
                 in_shardings=(replicated, replicated, parallel.data_sharding(mesh)), out_shardings=replicated)


def recalibrated_batch_stats(params: nnx.State, batch_stats: nnx.State, batches: Iterable[Mapping[str, np.ndarray]],
                             *, graphdef: nnx.GraphDef, mesh: jax.sharding.Mesh) -> Any:
  """The mean of the per-batch statistics over `batches` (host batches with `image`; full batches, no padding).

  Args:
    params, batch_stats: the replicated model variables.
    batches: e.g. `pipeline.calibration_dataset`.
    graphdef: the model's train-mode graphdef.
    mesh: the data-parallel mesh.
  Returns:
    The new statistics; `batch_stats` itself when `batches` is empty.
  """
  stats_fn = _jit_batch_statistics(graphdef, mesh)
  total, count = None, 0
  for host_batch in batches:
    image = parallel.host_to_global({"image": host_batch["image"]}, mesh)["image"]
    stats = stats_fn(params, batch_stats, image)
    total = stats if total is None else jax.tree.map(jnp.add, total, stats)
    count += 1
  if total is None:
    return batch_stats
  return jax.tree.map(lambda x: x / count, total)
