"""Batched inference on a device mesh: study inputs in, points in native pixels and disease probabilities out."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np
from flax import nnx

from ccfnet_jax import forward, objects, parallel
from ccfnet_jax.data import pipeline


DEFAULT_BATCH_SIZE = 8
"""Inference's batch where none is asked for (raised to a multiple of the data shards)."""


def default_batch_size(mesh: jax.sharding.Mesh, per_device: int = 1, minimum: int = DEFAULT_BATCH_SIZE) -> int:
  """The smallest multiple of the mesh's data shards that is >= max(minimum, shards * per_device)."""
  shards = parallel.num_data_shards(mesh)
  wanted = max(minimum, shards * per_device)
  return -(-wanted // shards) * shards


class Predictor:
  """Batched inference on the mesh with the one eval computation (`forward.predict`).

  Call with a host batch (`pipeline` batch contract; at least `image [B, S, S, 3]` and `native_hw [B, 2]`) whose
  size `B` is the predictor's `batch_size`; returns numpy `pred_xy [B, 11, 2]` native px and `pred_prob [B, 11]`.
  """

  def __init__(self, model: nnx.Module, *, image_size: int, options: forward.EvalOptions = forward.EvalOptions(),
               mesh: jax.sharding.Mesh | None = None, batch_size: int | None = None):
    self.mesh = parallel.make_mesh() if mesh is None else mesh
    self.image_size = int(image_size)
    self.batch_size = default_batch_size(self.mesh) if batch_size is None else int(batch_size)
    parallel.check_global_batch_size(self.batch_size, self.mesh, "batch_size")
    model.eval()
    graphdef, params, batch_stats = nnx.split(model, nnx.Param, nnx.BatchStat)
    self._weights = parallel.replicate((params, batch_stats), self.mesh)
    self._predict = forward.jit_predict(graphdef, self.mesh, options)

  def __call__(self, host_batch: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    size = len(host_batch["image"])
    if size != self.batch_size:
      raise ValueError(f"Predictor: batch of {size} examples, expected batch_size {self.batch_size}")
    batch = parallel.host_to_global({k: host_batch[k] for k in ("image", "native_hw")}, self.mesh)
    pred = jax.device_get(self._predict(*self._weights, batch["image"], batch["native_hw"]))
    return {"pred_xy": np.asarray(pred.xy), "pred_prob": np.asarray(pred.prob)}


def stack_examples(examples: Sequence[Mapping[str, np.ndarray]], batch_size: int, image_size: int
                   ) -> dict[str, np.ndarray]:
  """Stacks `pipeline.to_example` outputs into one batch, padded to `batch_size` with `pipeline.padding_example`."""
  if len(examples) > batch_size:
    raise ValueError(f"{len(examples)} examples do not fit a batch of {batch_size}")
  padded = list(examples) + [pipeline.padding_example(image_size)] * (batch_size - len(examples))
  return {key: np.stack([np.asarray(e[key]) for e in padded]) for key in padded[0]}


def unlabelled_record(image: np.ndarray, pixel_spacing_mm: np.ndarray, study_uid: str = "", series_uid: str = "",
                      instance_uid: str = "") -> dict[str, Any]:
  """A data record (`ccfnet_jax.data.records`) without labels: every point absent, disease unknown."""
  n = objects.NUM_OBJECTS
  return {
      "image": image, "pixel_spacing_mm": np.asarray(pixel_spacing_mm, np.float32),
      "points_xy": np.zeros((n, 2), np.float32), "point_valid": np.zeros(n, bool),
      "disease": np.full(n, objects.UNKNOWN, np.int32), "tags": np.asarray([""] * n, np.str_),
      "study_uid": study_uid, "series_uid": series_uid, "instance_uid": instance_uid,
  }
