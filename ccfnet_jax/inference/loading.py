"""Finding a trained model on disk and restoring it for inference (no training code involved).

A path may be a training workdir (`run.py --workdir`), one fold's directory (`workdir/fold_K`), its `checkpoints/`
directory (the checkpoint is then picked by `which`: 'best' = the kept checkpoint that `checkpoint.best_rank` puts
first, 'last' = the newest), or one checkpoint's step directory (`.../checkpoints/<step>`). The training config is
the `config.json` the run wrote (found by walking up from the checkpoint; fields an older version did not write get
their defaults), unless one is given.

Restoring: the model of the config is built abstractly (`nnx.eval_shape`, no weights computed), its parameter and
BatchNorm-statistic shapes are compared with the checkpoint's metadata (a checkpoint of another depth / MSC setting
is refused with `CheckpointMismatchError` naming the first differing parameters), then only `params` and
`batch_stats` are read (the optimizer state is skipped), placed replicated on the mesh, and the model is switched to
eval mode. Checkpoints are opened read-only: inference never deletes or cleans anything in a run directory, even
while the run is still writing to it.
"""

from __future__ import annotations

import dataclasses
import os

import jax
import ml_collections
from absl import logging
from flax import nnx

from ccfnet_jax import checkpoint as checkpoint_lib
from ccfnet_jax import config as config_lib
from ccfnet_jax import forward, parallel, rundir

CheckpointError = checkpoint_lib.CheckpointError
CheckpointRef, WHICH = checkpoint_lib.CheckpointRef, checkpoint_lib.WHICH
find_checkpoint, find_config = checkpoint_lib.find_checkpoint, checkpoint_lib.find_config
CheckpointMismatchError = checkpoint_lib.CheckpointMismatchError


# ---------------------------------------------------------------------------------------------------------------
# Restoring.
# ---------------------------------------------------------------------------------------------------------------


def restore_model(ref: CheckpointRef, config: ml_collections.ConfigDict,
                  mesh: jax.sharding.Mesh | None = None) -> nnx.Module:
  """The model of `config` with the checkpoint's weights, in eval mode, replicated on `mesh` (default: all devices).

  The weights are those the run evaluated: the moving averages when it kept them (`config.ema_decay` > 0).

  Raises:
    CheckpointMismatchError: the checkpoint's parameter names or shapes differ from the config's model.
    CheckpointError: the directory holds no readable checkpoint.
  """
  mesh = parallel.make_mesh() if mesh is None else mesh
  abstract_model = nnx.eval_shape(lambda: config_lib.build_model(config, jax.random.key(0)))
  config_lib.check_against_model(config, abstract_model.stride)
  graphdef, params, batch_stats, rest = nnx.split(abstract_model, nnx.Param, nnx.BatchStat, ...)
  if jax.tree.leaves(rest):
    raise CheckpointError(f"the model {config_lib.describe_model(config)} has state other than Param / BatchStat")
  sharding = parallel.replicated_sharding(mesh)
  averaged = float(config.get("ema_decay", 0.0)) > 0
  target = checkpoint_lib.weights_target(*checkpoint_lib.abstract_like((params, batch_stats), sharding),
                                         averaged=averaged)
  restored = checkpoint_lib.restore_weights(ref.state_dir, target, where=ref.step_dir,
                                            model=config_lib.describe_model(config))
  if averaged:
    restored = restored[checkpoint_lib.EMA_KEY]
  model = nnx.merge(graphdef, restored["params"], restored["batch_stats"])
  model.eval()
  return model


@dataclasses.dataclass
class LoadedModel:
  """A restored model and what inference needs to know about it."""
  model: nnx.Module
  config: ml_collections.ConfigDict
  checkpoint: CheckpointRef

  @property
  def image_size(self) -> int:
    return int(self.config.image_size)

  @property
  def eval_options(self) -> forward.EvalOptions:
    """The test-time augmentation and decoder the run evaluated with, so prediction decodes as evaluation did."""
    return forward.eval_options(self.config)


def load_model(path: str | os.PathLike, *, config: ml_collections.ConfigDict | str | None = None,
               which: str = "best", fold: int | None = None, mesh: jax.sharding.Mesh | None = None) -> LoadedModel:
  """`find_checkpoint` + the training config (given, or the workdir's `config.json`) + `restore_model`."""
  ref = find_checkpoint(path, which=which, fold=fold)
  if config is None:
    if ref.config_path is None:
      raise CheckpointError(f"no {rundir.CONFIG_FILE} found above {ref.step_dir}: pass the training config "
                            "(--config)")
    config, filled = config_lib.load_run_config(ref.config_path)
    if filled:
      logging.info("%s predates the fields %s: their defaults are used", ref.config_path, ", ".join(filled))
  elif not isinstance(config, ml_collections.ConfigDict):
    config, _ = config_lib.load_run_config(config)
  model = restore_model(ref, config, mesh)
  logging.info("restored %s from %s (%s, step %s)", config_lib.describe_model(config), ref.step_dir, ref.which,
               ref.step)
  return LoadedModel(model=model, config=config, checkpoint=ref)
