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
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import ml_collections
import orbax.checkpoint as ocp
from absl import logging
from flax import nnx

from ccfnet_jax import checkpoint as checkpoint_lib
from ccfnet_jax import config as config_lib
from ccfnet_jax import forward, parallel, rundir

RESTORED_GROUPS: tuple[str, ...] = ("params", "batch_stats")
"""The parts of the train state inference needs (the optimizer state and step are not read)."""


CheckpointError = checkpoint_lib.CheckpointError
CheckpointRef, WHICH = checkpoint_lib.CheckpointRef, checkpoint_lib.WHICH
find_checkpoint, find_config = checkpoint_lib.find_checkpoint, checkpoint_lib.find_config


class CheckpointMismatchError(CheckpointError):
  """The checkpoint's parameters do not fit the model that the config describes."""


# ---------------------------------------------------------------------------------------------------------------
# Restoring.
# ---------------------------------------------------------------------------------------------------------------


def _key_name(key: Any) -> str:
  for attr in ("key", "name", "idx"):
    if hasattr(key, attr):
      return str(getattr(key, attr))
  return str(key)


def _shapes_by_name(tree: Any) -> dict[str, tuple[int, ...]]:
  """'params/backbone/conv1/kernel' -> shape for every array leaf (a trailing 'value' of NNX Variables dropped)."""
  out = {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
    names = [_key_name(k) for k in path]
    if names and names[-1] == "value":
      names = names[:-1]
    shape = getattr(leaf, "shape", None)
    if shape is not None:
      out["/".join(names)] = tuple(int(s) for s in shape)
  return out


def check_compatible(saved: Mapping[str, tuple[int, ...]], expected: Mapping[str, tuple[int, ...]], *,
                     where: str, model: str, max_listed: int = 3,
                     groups: Sequence[str] = RESTORED_GROUPS) -> None:
  """Raises CheckpointMismatchError unless the two name -> shape tables agree.

  Args:
    saved: shapes in the checkpoint (only names under `groups`, default `RESTORED_GROUPS`, are compared).
    expected: shapes of the model built from the config.
    where: the checkpoint directory (for the message); model: the config's model (`config.describe_model`).
  """
  def params_first(names):  # stable: trainable parameters are listed before BatchNorm statistics
    return sorted(names, key=lambda name: name.split("/")[0] != "params")

  saved = {k: v for k, v in saved.items() if k.split("/")[0] in groups}
  differing = [f"{name}: checkpoint {saved[name]}, model {expected[name]}"
               for name in params_first(expected) if name in saved and saved[name] != expected[name]]
  missing = params_first([name for name in expected if name not in saved])
  unexpected = params_first([name for name in saved if name not in expected])
  if not (differing or missing or unexpected):
    return
  problems = []
  if differing:
    problems.append(f"{len(differing)} shape mismatch(es), e.g. " + "; ".join(differing[:max_listed]))
  if missing:
    problems.append(f"{len(missing)} model parameter(s) absent from the checkpoint, e.g. "
                    + ", ".join(missing[:max_listed]))
  if unexpected:
    problems.append(f"{len(unexpected)} checkpoint parameter(s) the model does not have, e.g. "
                    + ", ".join(unexpected[:max_listed]))
  raise CheckpointMismatchError(f"checkpoint {where} does not fit the model of the config ({model}): "
                                + " | ".join(problems) + ". Pass the config the checkpoint was trained with "
                                "(--config) or the matching checkpoint.")


def _saved_shapes(state_dir: str) -> dict[str, tuple[int, ...]]:
  try:
    metadata = ocp.PyTreeCheckpointer().metadata(state_dir)
  except Exception as e:  # Orbax raises several types for a directory that is not a checkpoint.
    raise CheckpointError(f"cannot read the checkpoint metadata in {state_dir}: {type(e).__name__}: {e}") from e
  tree = getattr(metadata, "item_metadata", metadata)
  shapes = _shapes_by_name(tree)
  if not shapes:
    raise CheckpointError(f"the checkpoint in {state_dir} holds no arrays")
  return shapes


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
  graphdef, params, batch_stats, rest = nnx.split(abstract_model, nnx.Param, nnx.BatchStat, ...)
  if jax.tree.leaves(rest):
    raise CheckpointError(f"the model {config_lib.describe_model(config)} has state other than Param / BatchStat")
  sharding = parallel.replicated_sharding(mesh)
  averaged = float(config.get("ema_decay", 0.0)) > 0
  target = checkpoint_lib.weights_target(*checkpoint_lib.abstract_like((params, batch_stats), sharding),
                                         averaged=averaged)
  check_compatible(_saved_shapes(ref.state_dir), _shapes_by_name(target), where=ref.step_dir,
                   model=config_lib.describe_model(config),
                   groups=(checkpoint_lib.EMA_KEY,) if averaged else RESTORED_GROUPS)
  restored = checkpoint_lib.restore_weights(ref.state_dir, target)
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
