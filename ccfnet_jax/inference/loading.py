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
import pathlib
from collections.abc import Mapping
from typing import Any

import jax
import ml_collections
import orbax.checkpoint as ocp
from absl import logging
from flax import nnx

from ccfnet_jax import checkpoint as checkpoint_lib
from ccfnet_jax import config as config_lib
from ccfnet_jax import parallel, rundir

WHICH: tuple[str, ...] = ("best", "last")
RESTORED_GROUPS: tuple[str, ...] = ("params", "batch_stats")
"""The parts of the train state inference needs (the optimizer state and step are not read)."""


class CheckpointError(checkpoint_lib.CheckpointError):
  """No usable checkpoint or config at the given path."""


class CheckpointMismatchError(CheckpointError):
  """The checkpoint's parameters do not fit the model that the config describes."""


@dataclasses.dataclass(frozen=True)
class CheckpointRef:
  """One checkpoint step on disk.

  step_dir: `.../checkpoints/<step>`; step: its step number (None when the directory name is not a number);
  which: how it was chosen ('best', 'last' or 'given'); config_path: the training config found beside it (or None).
  """
  step_dir: str
  step: int | None
  which: str
  config_path: str | None

  @property
  def state_dir(self) -> str:
    return os.path.join(self.step_dir, checkpoint_lib.STATE_ITEM)


# ---------------------------------------------------------------------------------------------------------------
# Finding the checkpoint and the config.
# ---------------------------------------------------------------------------------------------------------------


def _best_step(manager: checkpoint_lib.Checkpointer) -> int | None:
  """The kept checkpoint with the highest validation score.

  `Checkpointer.best_step` (scores stored with the checkpoints by Orbax) when it knows one; else the evaluation
  history that training stores in the newest checkpoint's `extra` item, restricted to the kept steps and ranked by
  `checkpoint.best_rank`. None when neither holds a score.
  """
  step = manager.best_step()
  if step is not None:
    return step
  latest = manager.latest_step()
  if latest is None:
    return None
  try:
    extra = manager.restore_extra(latest)
  except Exception as e:  # an unreadable `extra` only means no history: fall back to the last checkpoint.
    logging.warning("cannot read the evaluation history of %s step %s: %s", manager.directory, latest, e)
    return None
  kept = set(manager.all_steps())
  scored = [(h["step"], h["score"]) for h in (extra or {}).get("evals", [])
            if isinstance(h, dict) and h.get("step") in kept and isinstance(h.get("score"), (int, float))]
  return checkpoint_lib.best_of(scored)


def _is_step_dir(path: pathlib.Path) -> bool:
  return (path / checkpoint_lib.STATE_ITEM).is_dir()


def find_config(start: str | os.PathLike, levels: int = 4) -> str | None:
  """The nearest `config.json` in `start` or one of its `levels` parent directories, or None."""
  path = pathlib.Path(start).resolve()
  for candidate in [path, *path.parents][:levels + 1]:
    if (candidate / rundir.CONFIG_FILE).is_file():
      return str(candidate / rundir.CONFIG_FILE)
  return None


def find_checkpoint(path: str | os.PathLike, *, which: str = "best", fold: int | None = None) -> CheckpointRef:
  """Resolves a workdir, fold directory, checkpoints directory or step directory to one checkpoint step.

  Args:
    path: see the module docstring.
    which: 'best' (highest validation score among the kept checkpoints; the newest when none carries a score, with
      a warning) or 'last' (the newest). Ignored when `path` is a step directory.
    fold: the fold of a workdir with several trained folds (required then; optional with one).
  Raises:
    CheckpointError: nothing usable at `path`, naming what was looked for.
  """
  if which not in WHICH:
    raise CheckpointError(f"which must be one of {WHICH}, got {which!r}")
  root = pathlib.Path(path).expanduser().resolve()
  if not root.is_dir():
    raise CheckpointError(f"checkpoint path {root} is not a directory")
  if _is_step_dir(root):
    step = int(root.name) if root.name.isdigit() else None
    return CheckpointRef(str(root), step, "given", find_config(root))
  checkpoints_dir = root
  if (root / rundir.CHECKPOINTS_DIR).is_dir():
    checkpoints_dir = root / rundir.CHECKPOINTS_DIR
  else:
    folds = rundir.trained_folds(root)
    if folds:
      if fold is None:
        if len(folds) > 1:
          raise CheckpointError(f"{root} holds the checkpoints of folds {list(folds)}: choose one with --fold")
        fold = next(iter(folds))
      if fold not in folds:
        raise CheckpointError(f"{root} has no checkpoints for fold {fold} (folds with checkpoints: {list(folds)})")
      checkpoints_dir = folds[fold] / rundir.CHECKPOINTS_DIR
  steps = [p for p in checkpoints_dir.iterdir() if p.name.isdigit() and _is_step_dir(p)] if checkpoints_dir.is_dir() \
      else []
  if not steps:
    raise CheckpointError(f"no checkpoint found in {root}: expected a training workdir (fold_K/checkpoints/<step>/), "
                          "a fold directory, a checkpoints directory or a checkpoint step directory (holding state/)")
  final = rundir.parse_fold_dir(checkpoints_dir.parent.name) == rundir.FINAL_FOLD
  with checkpoint_lib.Checkpointer(checkpoints_dir, read_only=True) as manager:
    step = _best_step(manager) if which == "best" and not final else manager.latest_step()
    latest = manager.latest_step()
  chosen = "last" if final else which  # the run on every study evaluates nothing: its model is the last one
  if step is None:
    step, chosen = latest, "last"
    logging.warning("no checkpoint in %s carries a validation score: using the last one (step %s)", checkpoints_dir,
                    step)
  if step is None:
    raise CheckpointError(f"Orbax finds no complete checkpoint in {checkpoints_dir}")
  step_dir = checkpoints_dir / str(step)
  return CheckpointRef(str(step_dir), int(step), chosen, find_config(step_dir))


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
                     where: str, model: str, max_listed: int = 3) -> None:
  """Raises CheckpointMismatchError unless the two name -> shape tables agree.

  Args:
    saved: shapes in the checkpoint (only names under `RESTORED_GROUPS` are compared).
    expected: shapes of the model built from the config.
    where: the checkpoint directory (for the message); model: the config's model (`config.describe_model`).
  """
  def params_first(names):  # stable: trainable parameters are listed before BatchNorm statistics
    return sorted(names, key=lambda name: name.split("/")[0] != "params")

  saved = {k: v for k, v in saved.items() if k.split("/")[0] in RESTORED_GROUPS}
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
  target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding),
                        {"params": params, "batch_stats": batch_stats})
  check_compatible(_saved_shapes(ref.state_dir), _shapes_by_name(target), where=ref.step_dir,
                   model=config_lib.describe_model(config))
  restore_args = ocp.checkpoint_utils.construct_restore_args(target)
  restored = ocp.PyTreeCheckpointer().restore(
      ref.state_dir, args=ocp.args.PyTreeRestore(item=target, restore_args=restore_args, partial_restore=True))
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
  def flip_tta(self) -> bool:
    return bool(self.config.get("flip_tta", True))


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
