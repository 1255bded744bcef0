"""Orbax checkpoints of a training run: the last few and the best by validation score, resumable on any mesh.

One checkpoint = two items:
- `state`: the train state pytree (step, parameters, BatchNorm statistics, optimizer state). No PRNG state is
  stored: every random key of the run is derived from (seed, fold, step).
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
import time
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import orbax.checkpoint as ocp
from jax.sharding import Sharding

SCORE_KEY = "score"
"""The metric (from `metrics.evaluate`) that ranks checkpoints for 'best'."""
STATE_ITEM, EXTRA_ITEM = "state", "extra"


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
    restored = self._manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state),
                                                                   extra=ocp.args.JsonRestore()))
    return restored.state, dict(restored.extra or {})

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
