"""Benchmark of the training step, inference, decode and the input pipeline: one JSON line per measurement.

    python -m ccfnet_jax.bench --config=configs/r18_msc.py [--batch=2] [--image_size=512] [--dtype=bfloat16] \
        [--steps=10] [--measure=compile,matmul,train,infer,decode,pipeline,memory[,folds]] [--num_devices=N] \
        [--cpu_devices=N] [--profile=DIR [--profile_top=25]] [--output=FILE]

On a CPU host the batch is split over one XLA device per core (`--cpu_devices`, as `run.py` does: see
`parallel.configure_cpu_devices`); `--cpu_devices=1` times JAX's single CPU device.

What is timed is what trains: the jitted train and eval steps of training (`ccfnet_jax.perf.train_step`), on one
synthetic batch that stays on the device (the input pipeline is measured on its own, `pipeline_images_per_s`). A
figure is the median over `--steps` timed calls after `--warmup` untimed ones; the line also gives the fastest and
slowest call.

Lines (key `metric`): `compile_s` (lowering + XLA compile of the train step), `matmul_flops_per_s` (one device on an
N x N matrix product in `--dtype`, `--matmul_size`), `train_images_per_s`, `train_step_ms`, `flops_per_step` (XLA
cost analysis of the compiled train step, all devices), `achieved_flops_per_s`, `mfu` (achieved over the measured
matmul rate, times the devices on accelerators; a host's CPU devices share its cores), `infer_images_per_s` (eval
mode, flip TTA, decode and the mapping back to native pixels), `decode_us_per_batch` (`decode.decode` alone),
`pipeline_images_per_s` (the host Grain pipeline on in-memory phantom studies: read, resize to `image_size`, batch;
the device-augmentation and combined figures ride along: `ccfnet_jax.perf.pipeline`), `peak_memory_bytes` (device
`memory_stats()['peak_bytes_in_use']` where the backend reports it, else the process's peak host RSS). Optional
`folds` (`--folds=4`): the stacked train step of `config.parallel_folds` (`folds_compile_s`,
`folds_train_images_per_s`, `folds_speedup` against the single-fold step). `--profile=DIR` traces the train step and
prints its slowest ops (`op_ms`) and their sums by pass and by primitive (`op_ms_by_pass`, `op_ms_by_kind`): see
`ccfnet_jax.perf.op_profile`. Each line also carries the config name, batch, image size, dtype, device kind, the
number of devices and `XLA_FLAGS`. `--output=FILE` also writes the lines to FILE.

The side-by-side with the PyTorch twin of the reference is `python -m benchmarks.compare_torch` (needs torch).
"""

from __future__ import annotations

import os
from collections.abc import Sequence

from absl import flags
from ml_collections import config_flags

from ccfnet_jax import cli
from ccfnet_jax.perf import suite, timing, train_step


FLAGS = flags.FLAGS


def define_flags() -> None:
  """The command's flags (defined only when it runs as the program, so importing this module defines none)."""
  config_flags.DEFINE_config_file("config", "configs/r18_msc.py", "Experiment config file.")
  flags.DEFINE_integer("batch", 2, "Global batch size of the timed steps.")
  flags.DEFINE_integer("image_size", 512, "Input size S (images are S x S).")
  flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "Compute dtype (parameters stay float32).")
  flags.DEFINE_integer("steps", 10, "Timed calls per measurement (the median is reported).")
  flags.DEFINE_integer("warmup", 2, "Untimed calls before the timed ones (after compilation).")
  flags.DEFINE_list("measure", list(suite.MEASUREMENTS), "Which measurements to run, of "
                    f"{suite.MEASUREMENTS + suite.OPTIONAL_MEASUREMENTS}.")
  flags.DEFINE_integer("folds", 4, "Folds stacked by the optional `folds` measurement.")
  flags.DEFINE_enum("fold_batching", "", ["", *train_step.FOLD_BATCHING],
                    "How the `folds` measurement stacks the folds (default: the platform's).")
  flags.DEFINE_integer("pipeline_studies", 8, "Phantom studies held in memory for the pipeline figures.")
  flags.DEFINE_integer("pipeline_threads", 2, "Grain reader threads of the pipeline.")
  flags.DEFINE_integer("pipeline_workers", 0, "Grain worker processes of the pipeline (0: threads of this process).")
  flags.DEFINE_integer("num_devices", 0, "Devices of the data-parallel mesh (0: all).")
  flags.DEFINE_integer("matmul_size", 0, "Side N of the N x N matrix product timed for the MFU reference (0: 8192 "
                       "on accelerators, 2048 on CPU).")
  flags.DEFINE_bool("augment", True, "Run the config's on-device augmentation in the train step.")
  flags.DEFINE_string("profile", "", "Also trace --steps train steps into this folder and print the slowest ops "
                      "(`op_ms` lines).")
  flags.DEFINE_integer("profile_top", 25, "How many of the slowest ops --profile prints.")
  flags.DEFINE_string("output", "", "Also write the JSON lines to this file.")
  cli.define_device_flags()


def options_from_flags() -> suite.Options:
  """The suite's options from the parsed flags."""
  return suite.Options(
      batch_size=FLAGS.batch, image_size=FLAGS.image_size, dtype=FLAGS.dtype, steps=FLAGS.steps,
      warmup=FLAGS.warmup, measure=FLAGS.measure, augment=FLAGS.augment, num_devices=FLAGS.num_devices,
      matmul_size=FLAGS.matmul_size, pipeline_studies=FLAGS.pipeline_studies,
      pipeline_threads=FLAGS.pipeline_threads, pipeline_workers=FLAGS.pipeline_workers, num_folds=FLAGS.folds,
      fold_batching=FLAGS.fold_batching, profile_dir=FLAGS.profile, profile_top=FLAGS.profile_top,
      config_name=os.path.basename(config_flags.get_config_filename(FLAGS["config"])))


def main(argv: Sequence[str]) -> None:
  del argv
  cli.configure_devices((FLAGS.batch,))
  try:
    options = options_from_flags()
  except ValueError as e:
    raise cli.UserError(str(e)) from None
  lines = suite.run(FLAGS.config, options)
  if FLAGS.output:
    timing.write_lines(FLAGS.output, lines)


if __name__ == "__main__":
  cli.run(main, define_flags)
