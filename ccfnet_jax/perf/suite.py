"""The benchmark suite behind `python -m ccfnet_jax.bench`: which measurements run, in what order, and their lines.

`run(config, Options(...))` builds the config's train and eval steps once (`perf.train_step.build_steps`) and runs
the chosen measurements on them, each printing its JSON lines (`perf.timing.emit`); it returns the lines as dicts.
Every line carries the context it was measured in (`context`): config, model, batch, image size, dtype, device kind
and platform, devices, `XLA_FLAGS`.
"""

from __future__ import annotations

import dataclasses
import os
import resource
import statistics
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections

from ccfnet_jax import decode, parallel
from ccfnet_jax.maps import Maps
from ccfnet_jax.perf import flops, op_profile, pipeline, timing, train_step

MEASUREMENTS: tuple[str, ...] = ("compile", "matmul", "train", "infer", "decode", "pipeline", "memory")
"""Run by default."""
OPTIONAL_MEASUREMENTS: tuple[str, ...] = ("folds",)
"""Run only when named: `folds` times the stacked train step of `--folds` folds (`config.parallel_folds`)."""

Line = dict[str, Any]


@dataclasses.dataclass(frozen=True)
class Options:
  """What to measure and at which sizes (the flags of `ccfnet_jax.bench`)."""

  batch_size: int = 2
  image_size: int = 512
  dtype: str = "float32"
  steps: int = 10  # timed calls per measurement (the median is reported)
  warmup: int = 2  # untimed calls before them
  measure: Sequence[str] = MEASUREMENTS
  augment: bool = True  # the config's on-device augmentation inside the train step
  num_devices: int = 0  # devices of the data-parallel mesh (0: all)
  matmul_size: int = 0  # side of the reference matrix product (0: `flops.default_matmul_size`)
  pipeline_studies: int = 8  # phantom studies held in memory for the pipeline figures
  pipeline_threads: int = 2  # Grain reader threads
  pipeline_workers: int = 0  # Grain worker processes (0: threads of this process)
  num_folds: int = 4  # folds stacked by the `folds` measurement
  fold_batching: str = ""  # how they are stacked (`train_step.FOLD_BATCHING`; "": the platform's default)
  profile_dir: str = ""  # also trace the train step into this folder and print its slowest ops
  profile_top: int = 25  # how many of them
  config_name: str = ""  # the config file's name, for the lines

  def __post_init__(self):
    object.__setattr__(self, "measure", tuple(self.measure))
    known = MEASUREMENTS + OPTIONAL_MEASUREMENTS
    unknown = sorted(set(self.measure) - set(known))
    if unknown:
      raise ValueError(f"--measure: unknown measurement(s) {unknown}; known: {known}")
    if self.batch_size < 1 or self.steps < 1 or self.warmup < 0:
      raise ValueError(f"--batch ({self.batch_size}) and --steps ({self.steps}) must be >= 1, --warmup "
                       f"({self.warmup}) >= 0")
    if self.fold_batching and self.fold_batching not in train_step.FOLD_BATCHING:
      raise ValueError(f"--fold_batching {self.fold_batching!r}: expected one of {train_step.FOLD_BATCHING}")


@dataclasses.dataclass
class Session:
  """The built steps and what earlier measurements found (the matmul rate, the train step's median)."""

  setup: train_step.Steps
  options: Options
  context: dict[str, Any]
  matmul_rate: float | None = None
  train_step_s: float | None = None


def context(setup: train_step.Steps, options: Options) -> dict[str, Any]:
  """The fields every line of a run carries."""
  device = jax.devices()[0]
  return {"config": options.config_name, "model": setup.label, "batch": options.batch_size,
          "image_size": options.image_size, "dtype": options.dtype, "device": device.device_kind,
          "platform": device.platform, "num_devices": int(setup.mesh.devices.size),
          "xla_flags": os.environ.get("XLA_FLAGS", "")}


def _compile(s: Session) -> list[Line]:
  return [timing.emit("compile_s", s.setup.compile_s, "s", s.context, what="train step: lower + XLA compile")]


def _matmul(s: Session) -> list[Line]:
  o, device = s.options, jax.devices()[0]
  size = o.matmul_size or flops.default_matmul_size(device.platform)
  s.matmul_rate, seconds = flops.matmul_flops_per_s(size, o.dtype, steps=max(o.steps, 5), warmup=o.warmup,
                                                    device=device)
  return [timing.emit("matmul_flops_per_s", s.matmul_rate, "FLOP/s", s.context, size=size, **timing.spread(seconds),
                      what="one device, N x N x N product in --dtype: the MFU reference")]


def _train(s: Session) -> list[Line]:
  o, setup = s.options, s.setup
  one_step = timing.DonatingStep(setup.compiled_train, setup.state, setup.train_batch)
  seconds = timing.time_calls(one_step, o.steps, o.warmup)
  setup.state = one_step.state
  s.train_step_s = median = statistics.median(seconds)
  lines = [timing.emit("train_images_per_s", o.batch_size / median, "images/s", s.context, **timing.spread(seconds)),
           timing.emit("train_step_ms", 1000 * median, "ms", s.context, **timing.spread(seconds))]
  if setup.flops is not None:
    lines.append(timing.emit("flops_per_step", setup.flops, "FLOP", s.context,
                             what="XLA cost analysis of the train step"))
    lines.append(timing.emit("achieved_flops_per_s", setup.flops / median, "FLOP/s", s.context))
    if s.matmul_rate:
      reference = flops.mfu_reference(s.matmul_rate, jax.devices()[0].platform, int(setup.mesh.devices.size))
      lines.append(timing.emit("mfu", setup.flops / median / reference, "fraction", s.context,
                               reference_flops_per_s=reference,
                               what="achieved FLOP/s / measured matmul FLOP/s (x devices on accelerators)"))
  return lines


def _profile(s: Session) -> list[Line]:
  """`op_ms` (one op: ms per step and device, HLO name, shape, JAX op_name, pass and kind) for the slowest ops, and
  `op_ms_by_pass` / `op_ms_by_kind` (the sums over all ops, in `by`). The live state is copied, not donated."""
  o, setup = s.options, s.setup
  one_step = timing.DonatingStep(setup.compiled_train, jax.tree.map(jnp.copy, setup.state), setup.train_batch)
  rows = op_profile.profile(one_step, setup.compiled_train.as_text(), steps=o.steps, trace_dir=o.profile_dir,
                            devices=parallel.num_data_shards(setup.mesh))
  total = sum(row["ms"] for row in rows)
  lines = [timing.emit("op_ms", row["ms"], "ms", s.context, share=row["ms"] / total if total else 0.0,
                       **{k: v for k, v in row.items() if k != "ms"}) for row in rows[:o.profile_top]]
  for key in ("pass", "kind"):
    lines.append(timing.emit(f"op_ms_by_{key}", total, "ms", s.context, by=op_profile.summarize(rows, key),
                             trace_dir=o.profile_dir))
  return lines


def _infer(s: Session) -> list[Line]:
  o, setup = s.options, s.setup
  seconds = timing.time_calls(lambda: setup.jit_eval(setup.state, setup.eval_batch), o.steps, o.warmup)
  return [timing.emit("infer_images_per_s", o.batch_size / statistics.median(seconds), "images/s", s.context,
                      flip_tta=setup.flip_tta, **timing.spread(seconds))]


def _decode(s: Session) -> list[Line]:
  o, stride = s.options, s.setup.settings.stride
  side = o.image_size // stride
  maps = Maps(*jax.random.normal(jax.random.key(1), (4, o.batch_size, side, side, 11), jnp.float32))
  jit_decode = jax.jit(decode.decode, static_argnums=1)
  seconds = timing.time_calls(lambda: jit_decode(maps, stride), max(o.steps, 20), max(o.warmup, 2))
  return [timing.emit("decode_us_per_batch", 1e6 * statistics.median(seconds), "us", s.context,
                      **timing.spread(seconds))]


def _pipeline(s: Session) -> list[Line]:
  o = s.options
  figures = pipeline.pipeline_figures(batch_size=o.batch_size, image_size=o.image_size, num_batches=max(o.steps, 4),
                                      num_records=max(o.pipeline_studies, o.batch_size),
                                      worker_count=o.pipeline_workers, num_threads=o.pipeline_threads)
  extra = {k: figures[k] for k in ("augment_images_per_s", "combined_images_per_s", "num_threads", "worker_count",
                                   "num_batches", "native_hw_example")}
  return [timing.emit("pipeline_images_per_s", figures["host_images_per_s"], "images/s", s.context,
                      what="host: read + resize + batch (ccfnet_jax.perf.pipeline)", **extra)]


def _folds(s: Session) -> list[Line]:
  """`folds_compile_s`, `folds_train_images_per_s` (all folds' images per second) and, after `train`,
  `folds_speedup` = (folds x the single-fold step time) / the stacked step time."""
  o = s.options
  stacked = train_step.build_stacked_folds(s.setup, s.setup.state, o.num_folds, o.fold_batching)
  seconds = timing.time_calls(timing.DonatingStep(stacked.compiled, stacked.states, *stacked.args), o.steps,
                              o.warmup)
  median = statistics.median(seconds)
  ctx = {**s.context, "folds": o.num_folds, "fold_batching": stacked.batching}
  lines = [timing.emit("folds_compile_s", stacked.compile_s, "s", ctx),
           timing.emit("folds_train_images_per_s", o.num_folds * o.batch_size / median, "images/s", ctx,
                       **timing.spread(seconds))]
  if s.train_step_s is not None:
    lines.append(timing.emit("folds_speedup", o.num_folds * s.train_step_s / median, "x", ctx,
                             what="folds one after another / stacked, same images"))
  return lines


def peak_memory_bytes() -> tuple[int, str]:
  """(peak bytes, source): the first device's `memory_stats()['peak_bytes_in_use']`, else the peak host RSS."""
  try:
    stats = jax.local_devices()[0].memory_stats()
  except Exception:  # pylint: disable=broad-except  (not every backend implements it)
    stats = None
  if stats and "peak_bytes_in_use" in stats:
    return int(stats["peak_bytes_in_use"]), "device_memory_stats"
  return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024, "host_max_rss"  # KiB on Linux


def _memory(s: Session) -> list[Line]:
  peak, source = peak_memory_bytes()
  return [timing.emit("peak_memory_bytes", peak, "bytes", s.context, source=source)]


_ORDER: tuple[tuple[str, Callable[[Session], list[Line]]], ...] = (
    ("compile", _compile), ("matmul", _matmul), ("train", _train), ("profile", _profile), ("infer", _infer),
    ("decode", _decode), ("pipeline", _pipeline), ("folds", _folds), ("memory", _memory))
"""The order the measurements run in: the matmul rate before `train` (its MFU), `train` before `folds` (the
speed-up), `profile` (`Options.profile_dir`) after `train`, and memory last (the peak of them all)."""


def run(config: ml_collections.ConfigDict, options: Options) -> list[Line]:
  """Runs the measurements of `options` on `config` (a config of `configs/`), prints their lines, returns them."""
  setup = train_step.build_steps(config, batch_size=options.batch_size, image_size=options.image_size,
                                 dtype=options.dtype, augment=options.augment, num_devices=options.num_devices)
  session = Session(setup=setup, options=options, context=context(setup, options))
  lines: list[Line] = []
  for name, measure in _ORDER:
    if name in options.measure or (name == "profile" and options.profile_dir):
      lines.extend(measure(session))
  return lines
