"""Host input pipeline: Grain over a random-access source of study records -> fixed-size batches -> global arrays.

Source: anything with `__len__` and `__getitem__` returning a study record (`ccfnet_jax.data.records`: a
`tfds.data_source` of the `lumbar_spine` builder, or a plain list of dicts in tests): `image` uint16 `[H, W, 3]`,
`pixel_spacing_mm [2]` (row, col), `points_xy [11, 2]` native px, `point_valid [11]`, `disease [11]`, ...

Each record is stretched (not letterboxed) to `image_size` x `image_size` on the host: uint16 -> float32 in [0, 1]
(/ 65535), resized per channel with PIL's bilinear filter (which widens its support when shrinking, so downsizing is
antialiased; it uses the continuous pixel convention of docs/method.md#coordinates: pixel i covers [i, i + 1)).
Points are scaled with `ccfnet_jax.coords.scale_points` (x_input = x_native * S / W_native).

Batch contract (host numpy; `parallel.host_to_global` makes them global arrays split on the mesh's "data" axis):
  image float32 `[B, S, S, 3]` in [0, 1]; points_xy float32 `[B, 11, 2]` input px; points_xy_native float32
  `[B, 11, 2]`; native_hw int32 `[B, 2]`; pixel_spacing_mm float32 `[B, 2]`; point_valid bool `[B, 11]`;
  disease int32 `[B, 11]`; example_valid bool `[B]` (False for evaluation padding); record_index int32 `[B]` (index
  of the record in the source, -1 for padding: look up `study_uid` etc. there).

Batch sizes given here are GLOBAL. Training: every host draws the same global order (one shuffle of the whole
source per epoch, from the seed) and loads its block of rows of each global batch (host p: rows
`[p * local, (p + 1) * local)`, `local = batch_size / process_count`), so the global batches, and hence training,
do not depend on the number of hosts. Evaluation: each host reads an interleaved shard (`source[p::process_count]`).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any

import grain
import jax
import numpy as np
from absl import flags
from PIL import Image

from ccfnet_jax import coords, objects
from ccfnet_jax.data import dicom, records

Record = dict[str, Any]
Batch = dict[str, np.ndarray]

BATCH_KEYS: tuple[str, ...] = ("image", "points_xy", "points_xy_native", "native_hw", "pixel_spacing_mm",
                               "point_valid", "disease", "example_valid", "record_index")


# ---------------------------------------------------------------------------------------------------------------
# One record -> one example.
# ---------------------------------------------------------------------------------------------------------------


def _describe(record: Record, index: int) -> str:
  uid = record.get("study_uid", "?") if isinstance(record, dict) else "?"
  if isinstance(uid, bytes):
    uid = uid.decode("utf-8", "replace")
  return f"record {index} (study_uid {uid})"


def resize_image(image: np.ndarray, size: int) -> np.ndarray:
  """uint16 `[H, W, C]` -> float32 `[size, size, C]` in [0, 1], stretched with a bilinear (antialiased) filter."""
  scaled = dicom.to_float01(image)
  if scaled.shape[:2] == (size, size):
    return scaled
  out = np.empty((size, size, scaled.shape[-1]), np.float32)
  for c in range(scaled.shape[-1]):
    # The filter's weights are non-negative and sum to 1, so the result stays in [0, 1] (no clip needed).
    out[..., c] = np.asarray(Image.fromarray(np.ascontiguousarray(scaled[..., c])).resize((size, size),
                                                                                            Image.BILINEAR))
  return out


def to_example(record: Record, image_size: int, index: int = -1) -> Batch:
  """Validates one record (`records.validate_record`) and converts it to one example of the batch contract.

  Raises:
    StudyError: naming the record index, its study_uid and what is wrong.
  """
  if not isinstance(record, dict):
    raise TypeError(f"record {index}: expected a dict of arrays, got {type(record).__name__}")
  record = records.validate_record(record, study=_describe(record, index))
  image = record["image"]
  native_hw = np.asarray(image.shape[:2], np.int32)
  return {
      "image": resize_image(image, image_size),
      "points_xy": coords.scale_points(record["points_xy"], native_hw, (image_size, image_size)).astype(np.float32),
      "points_xy_native": record["points_xy"],
      "native_hw": native_hw,
      "pixel_spacing_mm": record["pixel_spacing_mm"],
      "point_valid": record["point_valid"],
      "disease": record["disease"],
      "example_valid": np.bool_(True),
      "record_index": np.int32(index),
  }


def padding_example(image_size: int) -> Batch:
  """An all-zero example with `example_valid=False`, disease -1 and `record_index=-1` (fills the last eval batch)."""
  n = objects.NUM_OBJECTS
  return {
      "image": np.zeros((image_size, image_size, 3), np.float32),
      "points_xy": np.zeros((n, 2), np.float32),
      "points_xy_native": np.zeros((n, 2), np.float32),
      "native_hw": np.asarray([image_size, image_size], np.int32),
      "pixel_spacing_mm": np.ones((2,), np.float32),
      "point_valid": np.zeros((n,), bool),
      "disease": np.full((n,), objects.UNKNOWN, np.int32),
      "example_valid": np.bool_(False),
      "record_index": np.int32(-1),
  }


@dataclasses.dataclass(frozen=True)
class _LoadExample(grain.transforms.Map):
  """Reads source[index] and converts it (a picklable transform, so worker processes can run it)."""

  source: Sequence[Record]
  image_size: int

  def map(self, index):
    index = int(index)
    if index < 0:
      return padding_example(self.image_size)
    return to_example(self.source[index], self.image_size, index)


@dataclasses.dataclass(frozen=True)
class _LoadBlock(grain.transforms.Map):
  """Reads this host's block `[start, stop)` of a global batch of source indices and stacks it into a batch."""

  source: Sequence[Record]
  image_size: int
  start: int
  stop: int

  def map(self, indices):
    examples = [to_example(self.source[int(i)], self.image_size, int(i)) for i in indices[self.start:self.stop]]
    return {key: np.stack([example[key] for example in examples]) for key in examples[0]}


# ---------------------------------------------------------------------------------------------------------------
# Datasets and iterators.
# ---------------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class PipelineOptions:
  """Host-side performance knobs (they never change the data or its order).

  num_threads: threads reading batches in each process; prefetch: batches read ahead per process;
  worker_count: extra worker processes (Grain `mp_prefetch`; 0 = read in this process).
  """

  num_threads: int = 2
  prefetch: int = 4
  worker_count: int = 0


def _process(process_index: int | None, process_count: int | None) -> tuple[int, int]:
  index = jax.process_index() if process_index is None else process_index
  count = jax.process_count() if process_count is None else process_count
  if not 0 <= index < count:
    raise ValueError(f"process_index {index} must be in [0, process_count={count})")
  return index, count


def local_batch_size(batch_size: int, process_count: int) -> int:
  """The per-host share of a global batch; the global size must divide evenly among the hosts."""
  if batch_size < 1 or batch_size % process_count:
    raise ValueError(f"global batch_size {batch_size} must be a positive multiple of process_count {process_count}")
  return batch_size // process_count


def _indices(source: Sequence[Record], process_index: int, process_count: int) -> grain.MapDataset:
  """This host's interleaved shard of the source's indices."""
  if len(source) == 0:
    raise ValueError("the data source is empty")
  return grain.MapDataset.range(len(source))[process_index::process_count]


def _finish(ds: grain.MapDataset, options: PipelineOptions) -> grain.IterDataset:
  read = grain.ReadOptions(num_threads=options.num_threads, prefetch_buffer_size=max(options.prefetch,
                                                                                     options.num_threads))
  it = ds.to_iter_dataset(read)
  if options.worker_count > 0:
    if not flags.FLAGS.is_parsed():  # Grain's worker processes read absl flags; outside app.run nobody parsed them.
      flags.FLAGS.mark_as_parsed()
    it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=options.worker_count))
  return it


def train_index_batches(num_records: int, *, batch_size: int, seed: int) -> grain.MapDataset:
  """The global training order: batch k's record indices are `[k]` of this (random access, infinite).

  The whole source is reshuffled every epoch from `seed`; an epoch's last batch continues into the next epoch.
  `train_dataset` loads these batches on the host; `config.data_on_device` gathers them from device memory.
  """
  if num_records < batch_size:
    raise ValueError(f"the training source has {num_records} examples, fewer than one batch of {batch_size}")
  return grain.MapDataset.range(num_records).shuffle(seed=seed).repeat(None).batch(batch_size, drop_remainder=True)


def train_dataset(source: Sequence[Record], *, batch_size: int, image_size: int, seed: int,
                  options: PipelineOptions = PipelineOptions(), process_index: int | None = None,
                  process_count: int | None = None) -> grain.IterDataset:
  """Infinite training batches: the whole source reshuffled every epoch from `seed`; this host's rows of each batch.

  `batch_size` is global. The global stream of indices is the same on every host and for any number of hosts
  (an epoch's last batch continues into the next epoch); host `process_index` loads rows
  `[process_index * local, (process_index + 1) * local)` of every global batch. Iterate with `iter(...)`; the
  iterator's `get_state()` / `set_state(state)` checkpoint the position (the training loop saves it with Orbax;
  resuming from it gives the same following batches, also onto another number of hosts).
  """
  process_index, process_count = _process(process_index, process_count)
  local = local_batch_size(batch_size, process_count)
  if len(source) == 0:
    raise ValueError("the data source is empty")
  ds = train_index_batches(len(source), batch_size=batch_size, seed=seed)
  ds = ds.map(_LoadBlock(source, image_size, process_index * local, (process_index + 1) * local))
  return _finish(ds, options)


def calibration_dataset(source: Sequence[Record], *, batch_size: int, image_size: int,
                        options: PipelineOptions = PipelineOptions(), process_index: int | None = None,
                        process_count: int | None = None) -> grain.IterDataset:
  """One pass in source order over the full global batches (the last partial batch is left out), unaugmented.

  For statistics that padding would bias (BatchNorm recalibration); each host loads its block of rows of each
  global batch, as in training. Yields nothing when the source holds fewer than `batch_size` examples.
  """
  process_index, process_count = _process(process_index, process_count)
  local = local_batch_size(batch_size, process_count)
  full = len(source) // batch_size * batch_size
  ds = grain.MapDataset.range(full).batch(batch_size, drop_remainder=True)
  ds = ds.map(_LoadBlock(source, image_size, process_index * local, (process_index + 1) * local))
  return _finish(ds, options)


def eval_dataset(source: Sequence[Record], *, batch_size: int, image_size: int,
                 options: PipelineOptions = PipelineOptions(), process_index: int | None = None,
                 process_count: int | None = None) -> grain.IterDataset:
  """One pass over this host's shard in source order; the last batch is padded with `example_valid=False`.

  Every host yields the same number of batches (hosts with a shorter shard pad more), as global arrays need.
  """
  process_index, process_count = _process(process_index, process_count)
  local = local_batch_size(batch_size, process_count)
  indices = _indices(source, process_index, process_count)
  longest_shard = math.ceil(len(source) / process_count)
  padded = math.ceil(longest_shard / local) * local
  shard = [int(i) for i in indices]
  all_indices = shard + [-1] * (padded - len(shard))
  ds = grain.MapDataset.source(all_indices).map(_LoadExample(source, image_size))
  return _finish(ds.batch(local, drop_remainder=False), options)


def num_eval_batches(num_examples: int, batch_size: int) -> int:
  """Batches of one evaluation pass over `num_examples` with global `batch_size` (any process count)."""
  return math.ceil(num_examples / batch_size) if batch_size else 0
