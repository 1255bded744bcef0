"""Training data held on the devices (`config.data_on_device`): no host pipeline in the training loop.

The data sets are small (hundreds of studies), so on an accelerator the host would set the pace. Here every
training record of every fold of a group is resized once on the host (`pipeline.to_example`, the same pixels the
host pipeline gives) and placed on the mesh, replicated, as `[F, N, ...]` arrays (folds padded to the longest);
the order of the whole run, the host pipeline's own (`pipeline.train_index_batches`), goes along as an
`[F, steps, B]` index table. Each step gathers its batch by index inside the jitted step, split over the "data"
axis, and augments it there as usual, so the batches, and the training, are those of the host pipeline. Every
host loads all records (each of its devices may need any of them); evaluation batches are placed once too.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from ccfnet_jax import parallel
from ccfnet_jax.data import pipeline
from ccfnet_jax.train import steps

TRAIN_KEYS = ("image", "points_xy", "points_xy_native", "native_hw", "pixel_spacing_mm", "point_valid", "disease")
"""What the train step reads of a batch (the host pipeline's batches hold these and two bookkeeping keys)."""


@dataclasses.dataclass
class DeviceData:
  """A group's training records and order on the mesh (replicated).

  records: key -> `[F, N_max, ...]`; order: int32 `[F, num_steps, B]` record indices of every step.
  """

  records: dict[str, jax.Array]
  order: jax.Array

  @property
  def num_bytes(self) -> int:
    return int(sum(x.size * x.dtype.itemsize for x in (*self.records.values(), self.order)))


def records_array(source: Sequence[Any], image_size: int) -> dict[str, np.ndarray]:
  """Every record of `source` as the host pipeline's examples, stacked: key -> `[N, ...]`."""
  examples = [pipeline.to_example(source[i], image_size, i) for i in range(len(source))]
  return {key: np.stack([e[key] for e in examples]) for key in TRAIN_KEYS}


def load(sources: Sequence[Sequence[Any]], seeds: Sequence[int], *, batch_size: int, image_size: int,
         num_steps: int, mesh: jax.sharding.Mesh) -> DeviceData:
  """The folds' training sources and their orders (one seed per fold, as the host pipeline's), on the mesh."""
  per_fold = [records_array(source, image_size) for source in sources]
  longest = max(len(s) for s in sources)

  def pad(array):
    return np.concatenate([array, np.zeros((longest - len(array), *array.shape[1:]), array.dtype)])

  records = {key: np.stack([pad(r[key]) for r in per_fold]) for key in TRAIN_KEYS}
  order = np.stack([np.stack([np.asarray(batches[k], np.int32) for k in range(num_steps)])
                    for batches in (pipeline.train_index_batches(len(s), batch_size=batch_size, seed=seed)
                                    for s, seed in zip(sources, seeds))])
  return DeviceData(records=parallel.replicate(records, mesh), order=parallel.replicate(order, mesh))


def gather(records: Mapping[str, jax.Array], order: jax.Array, step: jax.Array,
           sharding: jax.sharding.Sharding) -> dict[str, jax.Array]:
  """The stacked batch `[F, B, ...]` of `step`, split over the "data" axis (inside a jitted step)."""
  index = jax.lax.dynamic_index_in_dim(order, step, axis=1, keepdims=False)  # [F, B]
  batch = {key: jax.vmap(lambda table, rows: jnp.take(table, rows, axis=0))(value, index)
           for key, value in records.items()}
  return jax.lax.with_sharding_constraint(batch, sharding)


def jit_train_step(mesh: jax.sharding.Mesh, *, batching: str, graphdef: Any, settings: steps.StepSettings
                   ) -> Callable[..., Any]:
  """`steps.stacked_train_step` on a batch gathered from device memory: (states, records, order, args) -> ..."""
  replicated = parallel.replicated_sharding(mesh)
  batch_sharding = parallel.folds_data_sharding(mesh)

  def device_step(states, records, order, args):
    batches = gather(records, order, states.step[0], batch_sharding)
    return steps.stacked_train_step(states, batches, args, batching=batching, graphdef=graphdef, settings=settings)

  return jax.jit(device_step, in_shardings=(replicated, replicated, replicated, replicated),
                 out_shardings=(replicated, replicated), donate_argnums=0)


def iterator_state(step: int) -> dict[str, int]:
  """The host pipeline's iterator state after `step` batches, so that either way of feeding resumes the other."""
  return {"next_index": int(step)}


class EvalBatches:
  """A source's evaluation batches (call it for them), read and placed on the mesh at the first call, then reused."""

  def __init__(self, source: Sequence[Any], *, batch_size: int, image_size: int, mesh: jax.sharding.Mesh,
               keys: Sequence[str], options: pipeline.PipelineOptions):
    self._args = dict(source=source, batch_size=batch_size, image_size=image_size, options=options)
    self._mesh, self._keys, self._batches = mesh, tuple(keys), None

  def __call__(self) -> list[dict[str, jax.Array]]:
    if self._batches is None:
      self._batches = [parallel.host_to_global({k: b[k] for k in self._keys}, self._mesh)
                       for b in pipeline.eval_dataset(**self._args)]
    return self._batches
