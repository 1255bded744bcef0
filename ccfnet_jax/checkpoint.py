"""Orbax checkpoints of a training run: the last few and the best by validation score, resumable on any mesh.

One checkpoint = two items:
- `state`: the train state pytree (step, parameters, BatchNorm statistics, optimizer state and, in a run with
  `config.ema_decay` > 0, their moving averages under `EMA_KEY`). No PRNG state is stored: every random key of the
  run is derived from (seed, fold, step).
- `extra`: JSON: the data iterator's state (Grain `get_state()`), the evaluation history so far, anything else
  small that a resumed run needs to continue exactly.

"The best checkpoint" has one rule, `best_rank`: the highest validation score, the earliest step among equal
scores. Retention (`_KeepBest`), `Checkpointer.best_step` (what `predict --which=best` loads) and the run's
`results.json` (`train.results.summarize_history`) all rank by it, so the step a run reports as best is the one kept.

Restoring takes an abstract target (`jax.ShapeDtypeStruct`s with the shardings of the current mesh), so optax
states come back as their NamedTuples and a checkpoint written on N devices restores onto any other device count.
Saving is asynchronous; a process killed mid-save leaves only a temporary directory that Orbax ignores and removes.
"""

from __future__ import annotations

import dataclasses
import os
import pathlib
import time
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import orbax.checkpoint as ocp
from absl import logging
from jax.sharding import Sharding

from ccfnet_jax import rundir

SCORE_KEY = "score"
"""The metric (from `metrics.evaluate`) that ranks checkpoints for 'best'."""
STATE_ITEM, EXTRA_ITEM = "state", "extra"
EMA_KEY = "ema"
"""The part of a saved train state that holds the moving averages {'params', 'batch_stats'} (`TrainState.ema`)."""


class CheckpointError(ValueError):
  """No usable checkpoint; the message names the directory and what was looked for."""


def best_rank(score: float, step: int) -> tuple[float, int]:
  """Sort key of "the best evaluation": the highest score, and the earliest step among equal scores."""
  return (score, -step)


def abstract_like(tree: Any, sharding: Sharding) -> Any:
  """`jax.ShapeDtypeStruct`s of a pytree's arrays, each placed with `sharding` (the restore target)."""
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), tree)


def _score(metrics: Mapping[str, float] | None) -> float | None:
  if not metrics or SCORE_KEY not in metrics:
    return None
  return float(metrics[SCORE_KEY])


def best_of(scored_steps: Sequence[tuple[int, float]]) -> int | None:
  """The step of `(step, score)` pairs that `best_rank` puts first, None when there are none."""
  if not scored_steps:
    return None
  return max(scored_steps, key=lambda item: best_rank(item[1], item[0]))[0]


@dataclasses.dataclass
class _KeepBest(ocp.checkpoint_managers.PreservationPolicy):
  """Orbax retention of the one checkpoint `best_rank` puts first (Orbax's own BestN keeps the latest on ties)."""

  def should_preserve(self, checkpoints, *, context) -> Sequence[bool]:
    del context
    best = best_of([(c.step, _score(c.metrics)) for c in checkpoints if _score(c.metrics) is not None])
    return [c.step == best for c in checkpoints]


class Checkpointer:
  """A thin wrapper around `ocp.CheckpointManager` for one fold's checkpoints directory.

  Keeps the `keep` most recent checkpoints plus the best (`best_rank`; checkpoints saved without metrics count only
  as recent ones). `read_only=True` opens a directory that another process may be writing: nothing is created,
  cleaned or deleted, so a save in progress is left alone.
  """

  def __init__(self, directory: str | os.PathLike, *, keep: int = 3, asynchronous: bool = True,
               read_only: bool = False):
    if keep < 1:
      raise ValueError(f"config.keep_checkpoints must be >= 1, got {keep}")
    self.directory = os.path.abspath(os.fspath(directory))
    if read_only:
      options = ocp.CheckpointManagerOptions(read_only=True, save_interval_steps=0)
    else:
      options = ocp.CheckpointManagerOptions(
          # best_fn makes Orbax write each checkpoint's metrics to disk, so 'best' survives a restart.
          best_fn=_score, best_mode="max",
          preservation_policy=ocp.checkpoint_managers.AnyPreservationPolicy(
              [ocp.checkpoint_managers.LatestN(n=keep), _KeepBest()]),
          enable_async_checkpointing=asynchronous, cleanup_tmp_directories=True, create=True)
    self._manager = ocp.CheckpointManager(self.directory, options=options, item_names=(STATE_ITEM, EXTRA_ITEM))

  def latest_step(self) -> int | None:
    """Step of the newest complete checkpoint, or None."""
    return self._manager.latest_step()

  def all_steps(self) -> list[int]:
    """Steps of every kept checkpoint, ascending."""
    return sorted(self._manager.all_steps())

  def best_step(self) -> int | None:
    """The kept checkpoint `best_rank` puts first, or None when none carries a score."""
    scored = []
    for step in self.all_steps():
      score = _score(self._manager.metrics(step))
      if score is not None:
        scored.append((step, score))
    return best_of(scored)

  def save(self, step: int, state: Any, extra: Mapping[str, Any], metrics: Mapping[str, float] | None = None) -> bool:
    """Starts saving (asynchronously) `state` and the JSON `extra` as checkpoint `step`.

    Args:
      step: the number of optimizer steps taken so far.
      state: the train state pytree (global jax arrays).
      extra: JSON-serialisable dict (data iterator state, evaluation history, ...).
      metrics: evaluation metrics of this state (with 'score') when it was just evaluated, else None.
    Returns:
      Whether a save was started (False when checkpoint `step` exists already).
    """
    if step in self._manager.all_steps():
      return False
    args = ocp.args.Composite(state=ocp.args.StandardSave(state), extra=ocp.args.JsonSave(dict(extra)))
    return bool(self._manager.save(step, args=args, metrics=dict(metrics) if metrics is not None else None,
                                   force=True))

  def restore(self, step: int, abstract_state: Any) -> tuple[Any, dict[str, Any]]:
    """Restores checkpoint `step` onto the shardings given in `abstract_state` (see `abstract_like`).

    Returns:
      (state with the structure and types of `abstract_state`, the `extra` dict).
    """
    if step not in self._manager.all_steps():
      raise FileNotFoundError(f"no checkpoint for step {step} in {self.directory} (have {self.all_steps()})")
    absent = _empty_fields_not_saved(abstract_state, os.path.join(self.step_dir(step), STATE_ITEM))
    target = abstract_state
    if absent:
      target = {f.name: getattr(abstract_state, f.name) for f in dataclasses.fields(abstract_state)
                if f.name not in absent}
    restored = self._manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target),
                                                                   extra=ocp.args.JsonRestore()))
    state = abstract_state.replace(**restored.state) if absent else restored.state
    return state, dict(restored.extra or {})

  def set_aside(self, step: int) -> str:
    """Moves checkpoint `step` out of the managed folder (into `damaged_checkpoints/` beside it); returns where.

    For a checkpoint that cannot be restored: kept for inspection, no longer in the way of a new save of `step`.
    """
    target_dir = os.path.join(os.path.dirname(self.directory), "damaged_checkpoints")
    os.makedirs(target_dir, exist_ok=True)
    target = os.path.join(target_dir, f"{step}-{int(time.time())}")
    os.replace(self.step_dir(step), target)
    self._manager.reload()
    return target

  def restore_extra(self, step: int) -> dict[str, Any]:
    """The `extra` item of checkpoint `step` alone."""
    restored = self._manager.restore(step, args=ocp.args.Composite(extra=ocp.args.JsonRestore()))
    return dict(restored.extra or {})

  def step_dir(self, step: int) -> str:
    return os.path.join(self.directory, str(step))

  def wait(self) -> None:
    """Blocks until pending asynchronous saves are on disk."""
    self._manager.wait_until_finished()

  def close(self) -> None:
    """Waits for pending saves and releases the manager."""
    self._manager.wait_until_finished()
    self._manager.close()

  def __enter__(self) -> Checkpointer:
    return self

  def __exit__(self, *exc) -> None:
    self.close()


def _empty_fields_not_saved(abstract_state: Any, state_dir: str) -> set[str]:
  """The fields of a dataclass state that are None and absent from the saved state: fields added after the
  checkpoint was written, with nothing in them (e.g. `TrainState.ema` without EMA), restored as None."""
  if not dataclasses.is_dataclass(abstract_state):
    return set()
  empty = {f.name for f in dataclasses.fields(abstract_state) if getattr(abstract_state, f.name) is None}
  if not empty:
    return set()
  saved = saved_tree(state_dir)
  saved_names = set(saved.keys()) if hasattr(saved, "keys") else set()
  return empty - saved_names


class CheckpointMismatchError(CheckpointError):
  """The checkpoint's parameters do not fit the model they are restored into."""


def saved_tree(state_dir: str | os.PathLike) -> Any:
  """The saved `state` item's tree of array metadata (shapes, dtypes), read without loading any array."""
  try:
    metadata = ocp.PyTreeCheckpointer().metadata(os.fspath(state_dir))
  except Exception as e:  # Orbax raises several types for a directory that is not a checkpoint.
    raise CheckpointError(f"cannot read the checkpoint metadata in {state_dir}: {type(e).__name__}: {e}") from e
  return getattr(metadata, "item_metadata", metadata)


def _key_name(key: Any) -> str:
  for attr in ("key", "name", "idx"):
    if hasattr(key, attr):
      return str(getattr(key, attr))
  return str(key)


def shapes_by_name(tree: Any) -> dict[str, tuple[int, ...]]:
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
                     where: str, model: str, groups: Sequence[str], max_listed: int = 3) -> None:
  """Raises CheckpointMismatchError unless the two name -> shape tables agree on the names under `groups`.

  Args:
    saved: shapes in the checkpoint; expected: shapes of the model restored into.
    where: the checkpoint directory and model: a description of the model (both for the message).
  """
  def params_first(names):  # stable: trainable parameters are listed before BatchNorm statistics
    return sorted(names, key=lambda name: "params" not in name.split("/")[:2])

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
  raise CheckpointMismatchError(f"checkpoint {where} does not fit the model ({model}): " + " | ".join(problems)
                                + ". Use the config the checkpoint was trained with, or a checkpoint of this model.")


def weights_target(params: Any, batch_stats: Any, *, averaged: bool) -> dict[str, Any]:
  """The part of a saved train state that holds a model's weights: {'params', 'batch_stats'}, or with `averaged`
  their moving averages {EMA_KEY: {'params', 'batch_stats'}} (what a run with `config.ema_decay` > 0 evaluated)."""
  weights = {"params": params, "batch_stats": batch_stats}
  return {EMA_KEY: weights} if averaged else weights


def restore_weights(state_dir: str | os.PathLike, target: Mapping[str, Any], *, model: str,
                    where: str | None = None) -> Any:
  """Reads only the parts of a saved train state that `target` names (e.g. `weights_target`) from `state_dir` (a
  step's `state` item), with `target`'s structure, shapes, dtypes and shardings (`jax.ShapeDtypeStruct`s or
  arrays); the optimizer state is not read.

  Every name and shape under `target`'s top-level keys is first compared with the checkpoint's metadata, so a
  checkpoint of another model is refused before anything is read.

  Raises:
    CheckpointMismatchError: naming `where` (default `state_dir`), `model` and the first differing parameters.
    CheckpointError: `state_dir` holds no readable checkpoint or no arrays.
  """
  saved = shapes_by_name(saved_tree(state_dir))
  if not saved:
    raise CheckpointError(f"the checkpoint in {state_dir} holds no arrays")
  check_compatible(saved, shapes_by_name(dict(target)), where=os.fspath(where or state_dir), model=model,
                   groups=tuple(target))
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)),
                          dict(target))
  restore_args = ocp.checkpoint_utils.construct_restore_args(abstract)
  return ocp.PyTreeCheckpointer().restore(
      os.fspath(state_dir), args=ocp.args.PyTreeRestore(item=abstract, restore_args=restore_args,
                                                        partial_restore=True))


# ---------------------------------------------------------------------------------------------------------------
# Finding a run's checkpoint and config (inference, and a warm start from another run).
# ---------------------------------------------------------------------------------------------------------------

WHICH: tuple[str, ...] = ("best", "last")


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


def _best_step(manager: Checkpointer) -> int | None:
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
  return best_of(scored)


def _is_step_dir(path: pathlib.Path) -> bool:
  return (path / STATE_ITEM).is_dir()


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
  with Checkpointer(checkpoints_dir, read_only=True) as manager:
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
