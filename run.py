"""Trains and cross-validates CCF-Net: `python run.py --config=configs/r18_msc.py[:fold=2] --workdir=runs/r18`.

Only flags here; everything else is in `ccfnet_jax.train`. The same command runs on one CPU, a GPU or every host of
a TPU pod (multi-host launches initialise `jax.distributed` first: see `ccfnet_jax.parallel`).
"""

from __future__ import annotations

from absl import flags

from ccfnet_jax import cli, parallel

FLAGS = flags.FLAGS


def define_flags() -> None:
  from ml_collections import config_flags  # pylint: disable=g-import-not-at-top

  config_flags.DEFINE_config_file("config", "configs/default.py", "Experiment config file[:fold=K,steps=N].",
                                  lock_config=True)
  flags.DEFINE_string("workdir", None, "Run directory: checkpoints, logs, results.json.", required=True)
  flags.DEFINE_bool("allow_config_change", False, "Resume a run directory even though the config differs from the "
                    "one it was started with in fields that change the trained model (recorded there).")
  flags.DEFINE_string("coordinator_address", None, "host:port of process 0 (multi-process runs).")
  flags.DEFINE_integer("num_processes", None, "Number of processes (multi-process runs).")
  flags.DEFINE_integer("process_id", None, "Index of this process (multi-process runs).")
  cli.define_device_flags()
  cli.define_compilation_cache_flag()


def main(argv: list[str]) -> None:
  del argv
  distributed = parallel.maybe_initialize_distributed(FLAGS.coordinator_address, FLAGS.num_processes,
                                                      FLAGS.process_id)
  from ccfnet_jax import train  # pylint: disable=g-import-not-at-top  (importing starts no backend)

  config = FLAGS.config
  cli.configure_devices((config.batch_size, config.eval_batch_size or config.batch_size), multi_process=distributed)
  cli.enable_compilation_cache()
  train.train_and_evaluate(config, FLAGS.workdir, allow_config_change=FLAGS.allow_config_change)


if __name__ == "__main__":
  cli.run(main, define_flags)
