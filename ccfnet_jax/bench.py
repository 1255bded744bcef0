"""Benchmark of the training step, inference, decode and the input pipeline: one JSON line per measurement.

    python -m ccfnet_jax.bench --config=configs/r18_msc.py [--batch=2] [--image_size=512] [--dtype=bfloat16] \
        [--steps=10] [--measure=compile,train,infer,decode,pipeline,memory[,folds]] [--num_devices=N] \
        [--cpu_devices=N] [--profile=DIR [--profile_top=25]]

On a CPU host the batch is split over one XLA device per core (`--cpu_devices`, as `run.py` does: see
`parallel.configure_cpu_devices`); `--cpu_devices=1` times JAX's single CPU device.

What is timed is what trains: the jitted train and eval steps of `ccfnet_jax.train` (`train.jit_steps`: forward,
loss, backward and the AdamW update with on-device augmentation, the state donated), on one synthetic batch that stays
on the device (so the input pipeline is measured on its own, `pipeline_images_per_s`). Every timed call ends with
`jax.block_until_ready`; a figure is the median over `--steps` timed calls after `--warmup` untimed ones, and the
line also gives the fastest and slowest call so the noise can be read off.

Lines (key `metric`): `compile_s` (lowering + XLA compile of the train step), `matmul_flops_per_s` (one device on an
N x N matrix product in `--dtype`, `--matmul_size`), `train_images_per_s`, `train_step_ms`, `flops_per_step` (XLA
cost analysis of the compiled train step, all devices), `achieved_flops_per_s`, `mfu` (achieved over the measured
matmul rate, times the devices on accelerators; a host's CPU devices share its cores),
`infer_images_per_s` (eval mode, flip TTA, decode and the mapping back to native pixels: `train.eval_step`),
`decode_us_per_batch` (`decode.decode` alone on maps of the batch's size), `pipeline_images_per_s` (the host Grain
pipeline on in-memory phantom studies: read, resize to `image_size`, batch; `ccfnet_jax.bench_pipeline`, whose
device-augmentation and combined figures ride along on the line), `peak_memory_bytes` (device
`memory_stats()['peak_bytes_in_use']` where the backend reports it, else the process's peak host RSS). Optional
`folds` (`--folds=4`): the stacked train step of `ccfnet_jax.parallel_folds`
(`folds_compile_s`, `folds_train_images_per_s`, `folds_speedup` against the single-fold step). `--profile=DIR`
traces the train step and prints its slowest ops (`op_ms`) and their sums by pass and by primitive (`op_ms_by_pass`,
`op_ms_by_kind`): see `ccfnet_jax.op_profile`. Each line also
carries the config name, batch, image size, dtype, device kind, the number of devices and `XLA_FLAGS`.
"""

from __future__ import annotations

import dataclasses
import json
import os
import resource
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from ml_collections import config_flags

from ccfnet_jax import bench_pipeline
from ccfnet_jax import decode, losses, objects, op_profile, parallel, parallel_folds, train
from ccfnet_jax.data import pipeline
from ccfnet_jax.maps import Maps

MEASUREMENTS: tuple[str, ...] = ("compile", "matmul", "train", "infer", "decode", "pipeline", "memory")
OPTIONAL_MEASUREMENTS: tuple[str, ...] = ("folds",)
"""Not run by default: `folds` times the stacked train step of `ccfnet_jax.parallel_folds` over `--folds` folds."""

_CONFIG = config_flags.DEFINE_config_file("config", "configs/r18_msc.py", "Experiment config file.")
_BATCH = flags.DEFINE_integer("batch", 2, "Global batch size of the timed steps.")
_IMAGE_SIZE = flags.DEFINE_integer("image_size", 512, "Input size S (images are S x S).")
_DTYPE = flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "Compute dtype (parameters stay float32).")
_STEPS = flags.DEFINE_integer("steps", 10, "Timed calls per measurement (the median is reported).")
_WARMUP = flags.DEFINE_integer("warmup", 2, "Untimed calls before the timed ones (after compilation).")
_MEASURE = flags.DEFINE_list("measure", list(MEASUREMENTS),
                              f"Which measurements to run, of {MEASUREMENTS + OPTIONAL_MEASUREMENTS}.")
_FOLDS = flags.DEFINE_integer("folds", 4, "Folds stacked by the optional `folds` measurement.")
_FOLD_BATCHING = flags.DEFINE_enum("fold_batching", "", ["", *parallel_folds.FOLD_BATCHING],
                                   "How the `folds` measurement stacks the folds (default: the platform's).")
_PIPELINE_STUDIES = flags.DEFINE_integer("pipeline_studies", 8, "Phantom studies held in memory for the pipeline.")
_NUM_DEVICES = flags.DEFINE_integer("num_devices", 0, "Devices of the data-parallel mesh (0: all).")
_CPU_DEVICES = flags.DEFINE_integer("cpu_devices", 0, "XLA devices a CPU host is split into, as in run.py (0: one "
                                    "per core that divides --batch; 1: JAX's single CPU device).")
_MATMUL_SIZE = flags.DEFINE_integer("matmul_size", 0, "Side N of the N x N matrix product timed for the MFU "
                                    "reference (0: 8192 on accelerators, 2048 on CPU).")
_AUGMENT = flags.DEFINE_bool("augment", True, "Run the config's on-device augmentation inside the train step.")
_PROFILE = flags.DEFINE_string("profile", "", "Also trace --steps train steps into this folder and print the slowest "
                               "ops (`op_ms` lines, ccfnet_jax.op_profile).")
_PROFILE_TOP = flags.DEFINE_integer("profile_top", 25, "How many of the slowest ops --profile prints.")


def emit(metric: str, value: float, unit: str, context: dict[str, Any], **extra: Any) -> dict[str, Any]:
  """Prints one JSON line `{"metric", "value", "unit", **context, **extra}` to stdout and returns it."""
  line = {"metric": metric, "value": value, "unit": unit, **context, **extra}
  print(json.dumps(line), flush=True)
  return line


def time_calls(fn: Callable[[], Any], steps: int, warmup: int) -> list[float]:
  """Seconds of each of `steps` calls of `fn` (each waited for with `jax.block_until_ready`) after `warmup` calls."""

  for _ in range(warmup):
    jax.block_until_ready(fn())
  seconds = []
  for _ in range(steps):
    started = time.perf_counter()
    jax.block_until_ready(fn())
    seconds.append(time.perf_counter() - started)
  return seconds


class DonatingStep:
  """Calls a compiled step that donates its first argument, keeping the returned state for the next call.

  `step()` runs `compiled(state, *args)`, stores the new state in `.state` and returns the step's other output.
  """

  def __init__(self, compiled: Callable[..., Any], state: Any, *args: Any):
    self.compiled, self.state, self.args = compiled, state, args

  def __call__(self) -> Any:
    self.state, out = self.compiled(self.state, *self.args)
    return out


def spread(seconds: Sequence[float]) -> dict[str, float]:
  """Median, min and max of a list of durations, in seconds (the JSON lines' `median_s`, `min_s`, `max_s`)."""
  return {"median_s": statistics.median(seconds), "min_s": min(seconds), "max_s": max(seconds), "n": len(seconds)}


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


def matmul_flops_per_s(size: int, dtype: str, *, steps: int, warmup: int,
                       device: jax.Device | None = None) -> tuple[float, list[float]]:
  """FLOP/s of one device on an N x N x N matrix product in `dtype` (2 N^3 FLOPs a call), and the call seconds.

  The measured reference for the model FLOP utilisation (`mfu` = achieved FLOP/s of the train step over this rate
  times the mesh's devices): what the device reaches on the work it does best, in the step's own dtype.
  """
  if size < 1:
    raise ValueError(f"matmul size {size}: expected >= 1")
  device = device or jax.devices()[0]
  keys = jax.random.split(jax.random.key(0))
  a, b = (jax.device_put(jax.random.normal(k, (size, size), jnp.float32).astype(dtype), device) for k in keys)
  product = jax.jit(jnp.matmul)
  seconds = time_calls(lambda: product(a, b), steps, max(warmup, 1))
  return 2.0 * size ** 3 / statistics.median(seconds), seconds


def peak_memory_bytes() -> tuple[int, str]:
  """(peak bytes, source): the first device's `memory_stats()['peak_bytes_in_use']`, else the peak host RSS."""

  stats = None
  try:
    stats = jax.local_devices()[0].memory_stats()
  except Exception:  # pylint: disable=broad-except
    stats = None
  if stats and "peak_bytes_in_use" in stats:
    return int(stats["peak_bytes_in_use"]), "device_memory_stats"
  # ru_maxrss is in KiB on Linux.
  return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024, "host_max_rss"


def synthetic_batch(batch_size: int, image_size: int, seed: int = 0) -> dict[str, Any]:
  """A host batch of the pipeline's contract (`ccfnet_jax.data.pipeline`) with random images and points.

  `image [B, S, S, 3]` uniform in [0, 1]; 11 valid points per image, uniform in the central 80 % (input px, native =
  input, `native_hw = (S, S)`, spacing 0.5 mm); disease labels 0/1 at random.
  """

  rng = np.random.default_rng(seed)
  n = objects.NUM_OBJECTS
  points = rng.uniform(0.1 * image_size, 0.9 * image_size, (batch_size, n, 2)).astype(np.float32)
  return {
      "image": rng.uniform(0.0, 1.0, (batch_size, image_size, image_size, 3)).astype(np.float32),
      "points_xy": points,
      "points_xy_native": points.copy(),
      "native_hw": np.full((batch_size, 2), image_size, np.int32),
      "pixel_spacing_mm": np.full((batch_size, 2), 0.5, np.float32),
      "point_valid": np.ones((batch_size, n), bool),
      "disease": rng.integers(0, 2, (batch_size, n)).astype(np.int32),
      "example_valid": np.ones((batch_size,), bool),
  }


@dataclasses.dataclass
class Steps:
  """The compiled train step of a config and what it runs on (see `build_steps`)."""

  compiled_train: Any  # (state, train_batch) -> (state, scalars); the state is donated
  jit_eval: Any  # (state, eval_batch) -> predictions
  state: Any
  train_batch: dict[str, Any]
  eval_batch: dict[str, Any]
  settings: Any
  label: str
  compile_s: float
  flops: float | None
  mesh: Any
  step_kwargs: dict[str, Any]  # graphdef, tx, schedule, settings of `train.train_step`


def build_steps(config: Any, *, batch_size: int, image_size: int, dtype: str = "float32",
                augment: bool = True, num_devices: int = 0) -> Steps:
  """Builds the model, state and jitted steps of `ccfnet_jax.train` for `config` and compiles the train step.

  The batch is `synthetic_batch` placed on the mesh of all devices; the learning-rate schedule is the config's over
  1000 steps (its value does not change the cost). `pos_weight` is the reference's (SPEC §4). `num_devices` > 0
  uses the first that many devices for the mesh, 0 all of them.
  """
  config = config.copy_and_resolve_references()
  with config.unlocked():
    config.mixed_precision = dtype == "bfloat16"
    config.image_size = image_size
    config.batch_size = batch_size
  if num_devices < 0 or num_devices > jax.device_count():
    raise ValueError(f"--num_devices = {num_devices}: expected 0 (all) .. {jax.device_count()}")
  mesh = parallel.make_mesh(jax.devices()[:num_devices] if num_devices else None)
  parallel.check_global_batch_size(batch_size, mesh)
  model = train.create_model(config, jax.random.key(config.seed))
  if hasattr(model, "check_input"):  # CCFNet names the input sides it accepts before anything compiles
    model.check_input(jnp.zeros((1, image_size, image_size, 3), jnp.float32))
  schedule = train.create_schedule(config, num_steps=1000, epoch_steps=100)
  tx = train.create_optimizer(config, schedule)
  train_graphdef, eval_graphdef, state = train.init_state(model, tx)
  pos_weight = tuple(losses.REFERENCE_POS_WEIGHT)
  settings = train.StepSettings(image_size=image_size, stride=int(model.stride), loss=config.loss,
                                pos_weight=pos_weight, augment=train.augment_config(config) if augment else None,
                                flip_tta=bool(config.flip_tta), seed=int(config.seed), fold=0)
  state = parallel.replicate(state, mesh)
  jit_train, jit_eval = train.jit_steps(mesh, train_graphdef=train_graphdef, eval_graphdef=eval_graphdef, tx=tx,
                                        schedule=schedule, settings=settings)
  batch = pipeline.to_global(synthetic_batch(batch_size, image_size), mesh)
  train_keys = ("image", "points_xy", "point_valid", "disease", "pixel_spacing_mm", "native_hw")
  train_batch = {k: batch[k] for k in train_keys}
  eval_batch = {k: batch[k] for k in train.EVAL_KEYS}
  started = time.perf_counter()
  compiled = jit_train.lower(state, train_batch).compile()
  compile_s = time.perf_counter() - started
  return Steps(compiled_train=compiled, jit_eval=jit_eval, state=state, train_batch=train_batch,
               eval_batch=eval_batch, settings=settings, label=train.model_label(config), compile_s=compile_s,
               flops=xla_flops(compiled, mesh.devices.size), mesh=mesh,
               step_kwargs={"graphdef": train_graphdef, "tx": tx, "schedule": schedule, "settings": settings})


def profile_train_step(setup: Steps, state: Any, *, steps: int, trace_dir: str, top: int,
                       context: dict[str, Any]) -> list[dict[str, Any]]:
  """Traces `steps` train steps (`op_profile.profile`) and prints the `top` slowest ops and two summaries.

  Lines: `op_ms` (one op: ms per step and device, with its HLO name, shape, JAX op_name, pass and kind),
  `op_ms_by_pass` and `op_ms_by_kind` (the sums over all ops, in `by`). `state` is not donated: it stays valid.
  """
  one_step = DonatingStep(setup.compiled_train, jax.tree.map(jnp.copy, state), setup.train_batch)
  rows = op_profile.profile(one_step, setup.compiled_train.as_text(), steps=steps, trace_dir=trace_dir,
                            devices=parallel.num_data_shards(setup.mesh))
  total = sum(row["ms"] for row in rows)
  lines = [emit("op_ms", row["ms"], "ms", context, share=row["ms"] / total if total else 0.0,
                **{k: v for k, v in row.items() if k != "ms"}) for row in rows[:top]]
  for key in ("pass", "kind"):
    lines.append(emit(f"op_ms_by_{key}", total, "ms", context, by=op_profile.summarize(rows, key), trace_dir=trace_dir))
  return lines


def measure_stacked_folds(setup: Steps, state: Any, num_folds: int, *, steps: int, warmup: int, context: dict[str, Any],
                          single_step_s: float | None = None, fold_batching: str = "") -> list[dict[str, Any]]:
  """Times `parallel_folds`' stacked train step: `num_folds` copies of `state` (live, not donated) and the batch.

  Prints `folds_compile_s`, `folds_train_images_per_s` (all folds' images per second) and, when the single-fold
  step's median `single_step_s` is given, `folds_speedup` = (num_folds * single step time) / stacked step time.
  `fold_batching` is one of `parallel_folds.FOLD_BATCHING` ("": the platform's default).
  """

  if num_folds < 1:
    raise ValueError(f"--folds = {num_folds}: expected >= 1")
  mesh = setup.mesh
  states = parallel.replicate(parallel_folds.stack([state] * num_folds), mesh)
  host = {k: np.asarray(v) for k, v in jax.device_get(setup.train_batch).items()}
  batches = parallel_folds.stacked_to_global([host] * num_folds, mesh)
  fold_ids = parallel.replicate(np.arange(num_folds, dtype=np.int32), mesh)
  pos_weights = parallel.replicate(np.tile(np.asarray(setup.settings.pos_weight, np.float32), (num_folds, 1)), mesh)
  batching = fold_batching or parallel_folds.default_fold_batching(mesh)
  jitted = parallel_folds.jit_stacked_train_step(mesh, batching=batching, **setup.step_kwargs)
  started = time.perf_counter()
  compiled = jitted.lower(states, batches, fold_ids, pos_weights).compile()
  compile_s = time.perf_counter() - started
  one_step = DonatingStep(compiled, states, batches, fold_ids, pos_weights)
  seconds = time_calls(one_step, steps, warmup)
  median = statistics.median(seconds)
  batch_size = int(context["batch"])
  context = {**context, "folds": num_folds, "fold_batching": batching}
  lines = [emit("folds_compile_s", compile_s, "s", context),
           emit("folds_train_images_per_s", num_folds * batch_size / median, "images/s", context, **spread(seconds))]
  if single_step_s is not None:
    lines.append(emit("folds_speedup", num_folds * single_step_s / median, "x", context,
                      what="folds one after another / stacked, same images"))
  return lines


def run(config: Any, *, batch_size: int, image_size: int, dtype: str, steps: int, warmup: int,
        measure: Sequence[str] = MEASUREMENTS, augment: bool = True, pipeline_studies: int = 8,
        num_devices: int = 0, num_folds: int = 4, config_name: str = "", profile_dir: str = "",
        profile_top: int = 25, fold_batching: str = "", matmul_size: int = 0) -> list[dict[str, Any]]:
  """Runs the chosen measurements on `config` (an `ml_collections.ConfigDict` of `configs/`) and prints them.

  Returns:
    The printed lines as dicts.
  Raises:
    ValueError: for an unknown measurement name or a bad batch / image size.
  """
  unknown = sorted(set(measure) - set(MEASUREMENTS + OPTIONAL_MEASUREMENTS))
  if unknown:
    raise ValueError(f"--measure: unknown measurement(s) {unknown}; known: {MEASUREMENTS + OPTIONAL_MEASUREMENTS}")
  if batch_size < 1 or steps < 1 or warmup < 0:
    raise ValueError(f"--batch ({batch_size}) and --steps ({steps}) must be >= 1, --warmup ({warmup}) >= 0")


  setup = build_steps(config, batch_size=batch_size, image_size=image_size, dtype=dtype, augment=augment,
                      num_devices=num_devices)
  state, train_batch, eval_batch, settings = setup.state, setup.train_batch, setup.eval_batch, setup.settings
  device = jax.devices()[0]
  context = {"config": config_name, "model": setup.label, "batch": batch_size, "image_size": image_size,
             "dtype": dtype, "device": device.device_kind, "platform": device.platform,
             "num_devices": num_devices or jax.device_count(), "xla_flags": os.environ.get("XLA_FLAGS", "")}
  lines: list[dict[str, Any]] = []
  compiled, compile_s, flops = setup.compiled_train, setup.compile_s, setup.flops
  jit_eval = setup.jit_eval
  if "compile" in measure:
    lines.append(emit("compile_s", compile_s, "s", context, what="train step: lower + XLA compile"))

  matmul_rate = None
  if "matmul" in measure:
    size = matmul_size or (2048 if device.platform == "cpu" else 8192)
    matmul_rate, seconds = matmul_flops_per_s(size, dtype, steps=max(steps, 5), warmup=warmup, device=device)
    lines.append(emit("matmul_flops_per_s", matmul_rate, "FLOP/s", context, size=size, **spread(seconds),
                      what="one device, N x N x N product in --dtype: the MFU reference"))

  if "train" in measure:
    one_step = DonatingStep(compiled, state, train_batch)
    seconds = time_calls(one_step, steps, warmup)
    state = one_step.state
    median = statistics.median(seconds)
    lines.append(emit("train_images_per_s", batch_size / median, "images/s", context, **spread(seconds)))
    lines.append(emit("train_step_ms", 1000 * median, "ms", context, **spread(seconds)))
    if flops is not None:
      lines.append(emit("flops_per_step", flops, "FLOP", context, what="XLA cost analysis of the train step"))
      lines.append(emit("achieved_flops_per_s", flops / median, "FLOP/s", context))
      if matmul_rate:
        # Accelerators add up; CPU devices are slices of the same cores, whose product above already used them all.
        reference = matmul_rate * (1 if device.platform == "cpu" else int(setup.mesh.devices.size))
        lines.append(emit("mfu", flops / median / reference, "fraction", context, reference_flops_per_s=reference,
                          what="achieved FLOP/s / measured matmul FLOP/s (x devices on accelerators)"))

  if profile_dir:
    lines.extend(profile_train_step(setup, state, steps=steps, trace_dir=profile_dir, top=profile_top,
                                    context=context))

  if "infer" in measure:
    seconds = time_calls(lambda: jit_eval(state, eval_batch), steps, warmup)
    lines.append(emit("infer_images_per_s", batch_size / statistics.median(seconds), "images/s", context,
                      flip_tta=settings.flip_tta, **spread(seconds)))

  if "decode" in measure:
    side = image_size // settings.stride
    maps = Maps(*jax.random.normal(jax.random.key(1), (4, batch_size, side, side, 11), jnp.float32))
    jit_decode = jax.jit(decode.decode, static_argnums=1)
    seconds = time_calls(lambda: jit_decode(maps, settings.stride), max(steps, 20), max(warmup, 2))
    lines.append(emit("decode_us_per_batch", 1e6 * statistics.median(seconds), "us", context, **spread(seconds)))

  if "pipeline" in measure:
    figures = bench_pipeline.pipeline_figures(batch_size=batch_size, image_size=image_size,
                                              num_batches=max(steps, 4),
                                              num_records=max(pipeline_studies, batch_size))
    lines.append(emit("pipeline_images_per_s", figures["host_images_per_s"], "images/s", context,
                      what="host: read + resize + batch (ccfnet_jax.bench_pipeline)",
                      augment_images_per_s=figures["augment_images_per_s"],
                      combined_images_per_s=figures["combined_images_per_s"],
                      num_threads=figures["num_threads"], worker_count=figures["worker_count"]))

  if "folds" in measure:
    lines.extend(measure_stacked_folds(setup, state, num_folds, steps=steps, warmup=warmup, context=context,
                                       single_step_s=median if "train" in measure else None,
                                       fold_batching=fold_batching))

  if "memory" in measure:
    peak, source = peak_memory_bytes()
    lines.append(emit("peak_memory_bytes", peak, "bytes", context, source=source))
  return lines


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  config_path = config_flags.get_config_filename(flags.FLAGS["config"])
  parallel.configure_cpu_devices(_CPU_DEVICES.value, (_BATCH.value,))
  run(_CONFIG.value, batch_size=_BATCH.value, image_size=_IMAGE_SIZE.value, dtype=_DTYPE.value, steps=_STEPS.value,
      warmup=_WARMUP.value, measure=_MEASURE.value, augment=_AUGMENT.value, pipeline_studies=_PIPELINE_STUDIES.value,
      num_devices=_NUM_DEVICES.value, num_folds=_FOLDS.value, config_name=os.path.basename(config_path) or "",
      profile_dir=_PROFILE.value, profile_top=_PROFILE_TOP.value, fold_batching=_FOLD_BATCHING.value,
      matmul_size=_MATMUL_SIZE.value)


if __name__ == "__main__":
  sys.exit(app.run(main))
