"""Trains and cross-validates CCF-Net: `python run.py --config=configs/r18_msc.py[:fold=2] --workdir=runs/r18`.

Only flags here; everything else is in `ccfnet_jax.train`. The same command runs on one CPU, a GPU or every host of
a TPU pod (multi-host launches initialise `jax.distributed` first: see `ccfnet_jax.parallel`).
"""

from absl import app, flags, logging
from ml_collections import config_flags

from ccfnet_jax import parallel

_CONFIG = config_flags.DEFINE_config_file("config", "configs/default.py", "Experiment config file[:fold=K,steps=N].",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory: checkpoints, logs, results.json.", required=True)
_COORDINATOR = flags.DEFINE_string("coordinator_address", None, "host:port of process 0 (multi-process runs).")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Number of processes (multi-process runs).")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "Index of this process (multi-process runs).")
_COMPILATION_CACHE = flags.DEFINE_string(
    "compilation_cache", parallel.DEFAULT_COMPILATION_CACHE, "JAX's persistent compilation cache: resumed and repeated "
    "runs load their compiled steps from here ('' turns it off; JAX_COMPILATION_CACHE_DIR, where set, wins).")
_CPU_DEVICES = flags.DEFINE_integer(
    "cpu_devices", 0, "XLA devices a CPU host is split into, the batch data-parallel over them (0: one per core that "
    "divides the batch sizes, in single-process runs; 1: JAX's single CPU device). GPUs and TPUs are not affected.")


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if not flags.FLAGS["verbosity"].present:  # Orbax logs every save at INFO; -v 0 shows it.
    logging.set_verbosity(logging.WARNING)
  distributed = parallel.maybe_initialize_distributed(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
  import jax  # pylint: disable=g-import-not-at-top
  from ccfnet_jax import train  # pylint: disable=g-import-not-at-top  (importing starts no backend)

  config = _CONFIG.value
  parallel.configure_cpu_devices(_CPU_DEVICES.value, (config.batch_size, train.global_eval_batch_size(config)),
                                 multi_process=distributed)
  parallel.enable_compilation_cache(_COMPILATION_CACHE.value)

  logging.info("process %d / %d, devices %s", jax.process_index(), jax.process_count(), jax.devices())
  train.train_and_evaluate(config, _WORKDIR.value)


if __name__ == "__main__":
  app.run(main)
