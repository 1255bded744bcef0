"""The training loop's own speed: steps fed by the host pipeline or gathered on the devices (`config.data_on_device`).

The train step's figure (`perf.train_step`) has its batch on the device already; this measures what a run gets:
`train_and_evaluate` on a phantom data set for `2 n` steps, logging after `n` (compile and warm-up included there)
and after `2 n`; the rate is the `n` steps between the two log lines' timestamps (`rundir.METRICS_FILE`).
"""

from __future__ import annotations

import os

import jax
import ml_collections

from ccfnet_jax import logging_utils, rundir
from ccfnet_jax.train import loop


def loop_images_per_s(config: ml_collections.ConfigDict, workdir: str, *, steps: int,
                      mesh: jax.sharding.Mesh | None = None) -> float:
  """Steady-state training images/s of `config` (fold 0) over `steps` steps after `steps` warm-up steps."""
  if steps < 1:
    raise ValueError(f"steps = {steps}: expected >= 1")
  config = config.copy_and_resolve_references()
  with config.unlocked():
    config.fold = "0"
    config.num_steps = 2 * steps
    config.log_every_steps = steps
    config.eval_every_steps = 2 * steps
    config.checkpoint_every_steps = 2 * steps
  loop.train_and_evaluate(config, workdir, mesh=mesh)
  lines = [r for r in logging_utils.read_metrics(os.path.join(rundir.fold_dir(workdir, 0), rundir.METRICS_FILE))
           if r["split"] == "train"]
  first, last = lines[-2], lines[-1]
  return steps * config.batch_size / (last["time"] - first["time"])
