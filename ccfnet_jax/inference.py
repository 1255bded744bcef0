"""The inference core shared by `predict`, `evaluate` and `export`: find a checkpoint, restore the model, run it.

Finding a checkpoint (`find_checkpoint`): the path may be a training workdir (`run.py --workdir`), one fold's
directory (`workdir/fold_K`), its `checkpoints/` directory (the checkpoint is then picked by `which`: 'best' = the
kept checkpoint with the highest validation score, 'last' = the newest), or one checkpoint's step directory
(`.../checkpoints/<step>`). The training config is the `config.json` that `train.train_and_evaluate` wrote into the
workdir (found by walking up from the checkpoint), unless one is given.

Restoring (`restore_model`): the model of the config is built abstractly (`nnx.eval_shape`, no weights computed),
its parameter and BatchNorm-statistic shapes are compared with the checkpoint's metadata (a checkpoint of another
depth / MSC setting is refused with `CheckpointMismatchError` naming the first differing parameters), then only
`params` and `batch_stats` are read (the optimizer state is skipped), placed replicated on the mesh, and the model is
switched to eval mode. Checkpoints are opened read-only: inference never deletes or cleans anything in a run
directory, even while the run is still writing to it.

Running (`Predictor`): the training loop's own evaluation step (`train.eval_step`: eval-mode BatchNorm, flip TTA via
`decode.merge_flip`, `decode.decode`, mapping back to native pixels with `coords.scale_points`) jitted with the batch
sharded over the mesh's "data" axis and the weights replicated. Inputs are built by the training pipeline's own
`pipeline.to_example` (stretch-resize with `pipeline.resize_image`), so train-time evaluation and inference see the
same pixels and give the same points.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import re
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from flax import nnx

from ccfnet_jax import checkpoint as checkpoint_lib
from ccfnet_jax import objects, parallel, train
from ccfnet_jax.data import pipeline

CONFIG_FILE = "config.json"
"""The training config that `train.train_and_evaluate` writes into the workdir."""
WHICH: tuple[str, ...] = ("best", "last")
STATE_ITEM = "state"
"""The Orbax item of a checkpoint step that holds the train state (see `ccfnet_jax.checkpoint`)."""
RESTORED_GROUPS: tuple[str, ...] = ("params", "batch_stats")
"""The parts of the train state inference needs (the optimizer state and step are not read)."""


class CheckpointError(ValueError):
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
    return os.path.join(self.step_dir, STATE_ITEM)


# ---------------------------------------------------------------------------------------------------------------
# Finding the checkpoint and the config.
# ---------------------------------------------------------------------------------------------------------------


class _ReadOnlyCheckpoints(checkpoint_lib.Checkpointer):
  """`checkpoint.Checkpointer`'s step queries (`best_step`, `latest_step`, `all_steps`) on a read-only Orbax manager.

  The training `Checkpointer` opens its directory with `cleanup_tmp_directories=True`, which would delete the
  temporary directory of a save in progress; here nothing is created, cleaned or deleted.
  """

  def __init__(self, directory: str | os.PathLike):  # pylint: disable=super-init-not-called
    self.directory = os.path.abspath(os.fspath(directory))
    self._manager = ocp.CheckpointManager(self.directory, options=ocp.CheckpointManagerOptions(read_only=True),
                                          item_names=(STATE_ITEM, "extra"))


def _best_step(manager: _ReadOnlyCheckpoints) -> int | None:
  """The kept checkpoint with the highest validation score.

  `Checkpointer.best_step` (scores stored with the checkpoints by Orbax) when it knows one; else the evaluation
  history that training stores in the newest checkpoint's `extra` item, restricted to the kept steps and ranked by
  `train.summarize_history`. None when neither holds a score.
  """
  step = manager.best_step()
  if step is not None:
    return step
  latest = manager.latest_step()
  if latest is None:
    return None
  try:
    orbax_manager = manager._manager  # pylint: disable=protected-access
    extra = orbax_manager.restore(latest, args=ocp.args.Composite(extra=ocp.args.JsonRestore())).extra
  except Exception as e:  # an unreadable `extra` only means no history: fall back to the last checkpoint.
    logging.warning("cannot read the evaluation history of %s step %s: %s", manager.directory, latest, e)
    return None
  kept = set(manager.all_steps())
  history = [h for h in (extra or {}).get("evals", []) if isinstance(h, dict) and h.get("step") in kept]
  if not history:
    return None
  return int(train.summarize_history(history)["best"]["step"])


def _is_step_dir(path: pathlib.Path) -> bool:
  return (path / STATE_ITEM).is_dir()


def _fold_dirs(workdir: pathlib.Path) -> dict[int, pathlib.Path]:
  found = {}
  for child in workdir.iterdir():
    match = re.fullmatch(r"fold_(\d+)", child.name)
    if match and (child / "checkpoints").is_dir():
      found[int(match.group(1))] = child
  return dict(sorted(found.items()))


def find_config(start: str | os.PathLike, levels: int = 4) -> str | None:
  """The nearest `config.json` in `start` or one of its `levels` parent directories, or None."""
  path = pathlib.Path(start).resolve()
  for candidate in [path, *path.parents][:levels + 1]:
    if (candidate / CONFIG_FILE).is_file():
      return str(candidate / CONFIG_FILE)
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
  if (root / "checkpoints").is_dir():
    checkpoints_dir = root / "checkpoints"
  else:
    folds = _fold_dirs(root)
    if folds:
      if fold is None:
        if len(folds) > 1:
          raise CheckpointError(f"{root} holds the checkpoints of folds {list(folds)}: choose one with --fold")
        fold = next(iter(folds))
      if fold not in folds:
        raise CheckpointError(f"{root} has no checkpoints for fold {fold} (folds with checkpoints: {list(folds)})")
      checkpoints_dir = folds[fold] / "checkpoints"
  steps = [p for p in checkpoints_dir.iterdir() if p.name.isdigit() and _is_step_dir(p)] if checkpoints_dir.is_dir() \
      else []
  if not steps:
    raise CheckpointError(f"no checkpoint found in {root}: expected a training workdir (fold_K/checkpoints/<step>/), "
                          "a fold directory, a checkpoints directory or a checkpoint step directory (holding state/)")
  manager = _ReadOnlyCheckpoints(checkpoints_dir)
  step = _best_step(manager) if which == "best" else manager.latest_step()
  chosen = which
  if step is None:
    step, chosen = manager.latest_step(), "last"
    logging.warning("no checkpoint in %s carries a validation score: using the last one (step %s)", checkpoints_dir,
                    step)
  if step is None:
    raise CheckpointError(f"Orbax finds no complete checkpoint in {checkpoints_dir}")
  step_dir = checkpoints_dir / str(step)
  return CheckpointRef(str(step_dir), int(step), chosen, find_config(step_dir))


def load_config(path: str | os.PathLike) -> ml_collections.ConfigDict:
  """A training config from the `config.json` a run wrote (or any JSON of the same fields)."""
  path = os.fspath(path)
  try:
    with open(path, encoding="utf-8") as f:
      values = json.load(f)
  except (OSError, json.JSONDecodeError) as e:
    raise CheckpointError(f"cannot read the training config {path}: {e}") from e
  if not isinstance(values, dict):
    raise CheckpointError(f"training config {path} holds a {type(values).__name__}, expected an object")
  for key in ("model", "image_size"):
    if key not in values:
      raise CheckpointError(f"training config {path} lacks the field {key!r}")
  return ml_collections.ConfigDict(values)


def describe_model(config: ml_collections.ConfigDict) -> str:
  """e.g. 'ccfnet depth=18 msc=True' (the config fields that decide the parameter shapes)."""
  return f"{config.model.name} depth={config.model.depth} msc={config.model.msc}"


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
    where: the checkpoint directory (for the message); model: the config's model (`describe_model`).
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
  abstract_model = nnx.eval_shape(lambda: train.create_model(config, jax.random.key(0)))
  graphdef, params, batch_stats, rest = nnx.split(abstract_model, nnx.Param, nnx.BatchStat, ...)
  if jax.tree.leaves(rest):
    raise CheckpointError(f"the model {describe_model(config)} has state other than Param / BatchStat")
  sharding = parallel.replicated_sharding(mesh)
  target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding),
                        {"params": params, "batch_stats": batch_stats})
  check_compatible(_saved_shapes(ref.state_dir), _shapes_by_name(target), where=ref.step_dir,
                   model=describe_model(config))
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
      raise CheckpointError(f"no {CONFIG_FILE} found above {ref.step_dir}: pass the training config (--config)")
    config = load_config(ref.config_path)
  elif not isinstance(config, ml_collections.ConfigDict):
    config = load_config(config)
  model = restore_model(ref, config, mesh)
  logging.info("restored %s from %s (%s, step %s)", describe_model(config), ref.step_dir, ref.which, ref.step)
  return LoadedModel(model=model, config=config, checkpoint=ref)


# ---------------------------------------------------------------------------------------------------------------
# Running.
# ---------------------------------------------------------------------------------------------------------------


def step_settings(stride: int, image_size: int, flip_tta: bool) -> train.StepSettings:
  """The `train.StepSettings` of evaluation (only image size, stride and flip TTA matter to `train.eval_step`)."""
  return train.StepSettings(image_size=int(image_size), stride=int(stride), loss="reference", pos_weight=(1.0, 1.0),
                            augment=None, flip_tta=bool(flip_tta), seed=0, fold=0)


def eval_state(model: nnx.Module) -> tuple[nnx.GraphDef, train.TrainState]:
  """(eval-mode graphdef, a `train.TrainState` holding the model's weights and no optimizer state)."""
  model.eval()
  graphdef, params, batch_stats, rest = nnx.split(model, nnx.Param, nnx.BatchStat, ...)
  if jax.tree.leaves(rest):
    raise ValueError("the model has state other than Param / BatchStat")
  return graphdef, train.TrainState(step=jnp.zeros((), jnp.int32), params=params, batch_stats=batch_stats,
                                    opt_state=())


DEFAULT_BATCH_SIZE = 8
"""Inference's batch where none is asked for (raised to a multiple of the data shards)."""


def default_batch_size(mesh: jax.sharding.Mesh, per_device: int = 1, minimum: int = DEFAULT_BATCH_SIZE) -> int:
  """The smallest multiple of the mesh's data shards that is >= max(minimum, shards * per_device)."""
  shards = parallel.num_data_shards(mesh)
  wanted = max(minimum, shards * per_device)
  return -(-wanted // shards) * shards


class Predictor:
  """Batched inference on the mesh with the training loop's evaluation step.

  Call with a host batch (`pipeline` batch contract; at least `image [B, S, S, 3]` and `native_hw [B, 2]`) whose
  size `B` is the predictor's `batch_size`; returns numpy `pred_xy [B, 11, 2]` native px and `pred_prob [B, 11]`.
  """

  def __init__(self, model: nnx.Module, *, image_size: int, flip_tta: bool = True,
               mesh: jax.sharding.Mesh | None = None, batch_size: int | None = None):
    self.mesh = parallel.make_mesh() if mesh is None else mesh
    self.image_size = int(image_size)
    self.batch_size = default_batch_size(self.mesh) if batch_size is None else int(batch_size)
    parallel.check_global_batch_size(self.batch_size, self.mesh, "batch_size")
    graphdef, state = eval_state(model)
    self.state = parallel.replicate(state, self.mesh)
    settings = step_settings(model.stride, self.image_size, flip_tta)
    self._step = jax.jit(lambda state, batch: train.eval_step(state, batch, graphdef=graphdef, settings=settings),
                         in_shardings=(parallel.replicated_sharding(self.mesh), parallel.data_sharding(self.mesh)),
                         out_shardings=parallel.replicated_sharding(self.mesh))

  def __call__(self, host_batch: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    size = len(host_batch["image"])
    if size != self.batch_size:
      raise ValueError(f"Predictor: batch of {size} examples, expected batch_size {self.batch_size}")
    batch = pipeline.to_global({k: host_batch[k] for k in train.EVAL_KEYS}, self.mesh)
    out = jax.device_get(self._step(self.state, batch))
    return {"pred_xy": np.asarray(out["pred_xy"]), "pred_prob": np.asarray(out["pred_prob"])}


def stack_examples(examples: Sequence[Mapping[str, np.ndarray]], batch_size: int, image_size: int
                   ) -> dict[str, np.ndarray]:
  """Stacks `pipeline.to_example` outputs into one batch, padded to `batch_size` with `pipeline.padding_example`."""
  if len(examples) > batch_size:
    raise ValueError(f"{len(examples)} examples do not fit a batch of {batch_size}")
  padded = list(examples) + [pipeline.padding_example(image_size)] * (batch_size - len(examples))
  return {key: np.stack([np.asarray(e[key]) for e in padded]) for key in padded[0]}


def unlabelled_record(image: np.ndarray, pixel_spacing_mm: np.ndarray, study_uid: str = "", series_uid: str = "",
                      instance_uid: str = "") -> dict[str, Any]:
  """A data record (`ccfnet_jax.data.records`) without labels: every point absent, disease unknown."""
  n = objects.NUM_OBJECTS
  return {
      "image": image, "pixel_spacing_mm": np.asarray(pixel_spacing_mm, np.float32),
      "points_xy": np.zeros((n, 2), np.float32), "point_valid": np.zeros(n, bool),
      "disease": np.full(n, objects.UNKNOWN, np.int32), "tags": np.asarray([""] * n, np.str_),
      "study_uid": study_uid, "series_uid": series_uid, "instance_uid": instance_uid,
  }


def define_checkpoint_flags() -> None:
  """The flags that say which trained model a command loads (shared by predict and export; defined on demand)."""
  from absl import flags  # pylint: disable=g-import-not-at-top
  from ml_collections import config_flags  # pylint: disable=g-import-not-at-top

  flags.DEFINE_string("workdir", None, "Training run directory (run.py --workdir).")
  flags.DEFINE_string("checkpoint", None, "A fold directory, its checkpoints/ directory or one checkpoint step "
                      "directory (instead of --workdir).")
  config_flags.DEFINE_config_file("config", None, "Training config file[:args] (default: the run's config.json).",
                                  lock_config=False)
  flags.DEFINE_enum("which", "best", list(WHICH), "Checkpoint: best validation score or the last one.")
  flags.DEFINE_integer("fold", None, "Fold of a workdir with several trained folds.")


def load_model_from_flags(mesh: jax.sharding.Mesh | None = None) -> LoadedModel:
  """Quiets Orbax's INFO logging unless -v was given, checks --workdir/--checkpoint and loads the model.

  A wrong path or a checkpoint that does not fit the config ends the program with the message and no traceback.
  """
  from absl import app, flags  # pylint: disable=g-import-not-at-top

  flag_values = flags.FLAGS
  if not flag_values["verbosity"].present:  # Orbax logs every read at INFO; -v 0 shows it.
    logging.set_verbosity(logging.WARNING)
  if (flag_values.workdir is None) == (flag_values.checkpoint is None):
    raise app.UsageError("give exactly one of --workdir and --checkpoint")
  try:
    return load_model(flag_values.workdir or flag_values.checkpoint, config=flag_values.config,
                      which=flag_values.which, fold=flag_values.fold, mesh=mesh)
  except CheckpointError as e:
    raise SystemExit(f"error: {e}") from None
