"""Input-pipeline figures: images/s of host loading + resize, of device augmentation, and of both together.

Uses phantom records held in memory (`ccfnet_jax.data.phantom.generate_study`, native sizes ~250-450 px, so the
host resize upsamples to 512) and the reference augmentation. `python -m ccfnet_jax.bench --measure=pipeline`
prints them beside a training step's images/s.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

import jax

from ccfnet_jax import parallel
from ccfnet_jax.data import augment, phantom, pipeline


def _images_per_s(num_images: int, seconds: float) -> float:
  return round(num_images / seconds, 2) if seconds > 0 else float("inf")


def pipeline_figures(batch_size: int = 8, image_size: int = 512, num_batches: int = 20, num_records: int = 16,
                     worker_count: int = 0, num_threads: int = 2, seed: int = 0) -> dict:
  """Measures the pipeline and returns a dict of figures (images/s and the settings that produced them).

  - `host_images_per_s`: the Grain train iterator alone (read record, validate, uint16 -> float, resize, batch).
  - `augment_images_per_s`: the jitted `augment_batch` (reference config) on a batch already on device.
  - `combined_images_per_s`: host iterator -> `to_global` -> augmentation, the host overlapping the device (a fresh
    iterator, its start-up included).
  """
  records = [phantom.generate_study(i, seed=seed) for i in range(num_records)]
  options = pipeline.PipelineOptions(num_threads=num_threads, worker_count=worker_count)
  mesh = parallel.make_mesh()
  cfg = augment.AugmentConfig.reference()
  augment_fn = jax.jit(augment.augment_batch, static_argnames="cfg")

  def batches() -> Iterator[dict]:
    return iter(pipeline.train_dataset(records, batch_size=batch_size, image_size=image_size, seed=seed,
                                       options=options))

  # Host only (the first batch, which starts the threads/workers, is not timed).
  it = batches()
  next(it)
  start = time.perf_counter()
  for _ in range(num_batches):
    host_batch = next(it)
  host_s = time.perf_counter() - start

  # Device augmentation only.
  device_batch = parallel.host_to_global(host_batch, mesh)
  key = jax.random.key(seed)
  jax.block_until_ready(augment_fn(key, device_batch, cfg=cfg))  # compile
  start = time.perf_counter()
  for step in range(num_batches):
    out = augment_fn(jax.random.fold_in(key, step), device_batch, cfg=cfg)
  jax.block_until_ready(out)
  augment_s = time.perf_counter() - start

  # Together: the host thread keeps reading while the device works (jax dispatch is asynchronous). A fresh
  # iterator, timed from its creation: the first one has read ahead during the device-only phase, and batches
  # waiting in its buffer would be counted as free (conservative: the threads' start-up is included).
  if hasattr(it, "close"):
    it.close()
  start = time.perf_counter()
  it = batches()
  for step in range(num_batches):
    out = augment_fn(jax.random.fold_in(key, step), parallel.host_to_global(next(it), mesh), cfg=cfg)
  jax.block_until_ready(out)
  combined_s = time.perf_counter() - start
  if hasattr(it, "close"):
    it.close()

  n = num_batches * batch_size
  return {
      "benchmark": "pipeline",
      "device": f"{jax.devices()[0].platform}:{jax.devices()[0].device_kind} x{jax.device_count()}",
      "batch_size": batch_size,
      "image_size": image_size,
      "num_batches": num_batches,
      "worker_count": worker_count,
      "num_threads": num_threads,
      "native_hw_example": list(records[0]["image"].shape[:2]),
      "host_images_per_s": _images_per_s(n, host_s),
      "augment_images_per_s": _images_per_s(n, augment_s),
      "combined_images_per_s": _images_per_s(n, combined_s),
  }
