"""Orbax checkpoints of a training run: the last few and the best by validation score, resumable on any mesh.

One checkpoint = two items:
- `state`: the train state pytree (step, parameters, BatchNorm statistics, optimizer state). No PRNG state is
  stored: every random key of the run is derived from (seed, fold, step).
- `extra`: JSON: the data iterator's state (Grain `get_state()`), the evaluation history so far, anything else
  small that a resumed run needs to continue exactly.

Restoring takes an abstract target (`jax.ShapeDtypeStruct`s with the shardings of the current mesh), so optax
states come back as their NamedTuples and a checkpoint written on N devices restores onto any other device count.
Saving is asynchronous; a process killed mid-save leaves only a temporary directory that Orbax ignores and removes.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import jax
import orbax.checkpoint as ocp
from jax.sharding import Sharding

SCORE_KEY = "score"
"""The metric (from `metrics.evaluate`) that ranks checkpoints for 'best'."""


def best_rank(score: float, step: int) -> tuple[float, int]:
  """Sort key of "the best evaluation": the highest score, and the earliest step among equal scores."""
  return (score, -step)


def abstract_like(tree: Any, sharding: Sharding) -> Any:
  """`jax.ShapeDtypeStruct`s of a pytree's arrays, each placed with `sharding` (the restore target)."""
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), tree)


def _score(metrics: Mapping[str, float]) -> float:
  return float(metrics[SCORE_KEY])


class Checkpointer:
  """A thin wrapper around `ocp.CheckpointManager` for one fold's run directory.

  Keeps the `keep` most recent checkpoints plus the one with the highest `metrics['score']` (checkpoints saved
  without metrics count only as recent ones).
  """

  def __init__(self, directory: str | os.PathLike, *, keep: int = 3, keep_best: bool = True,
               asynchronous: bool = True):
    if keep < 1:
      raise ValueError(f"config.keep_checkpoints must be >= 1, got {keep}")
    policies: list[Any] = [ocp.checkpoint_managers.LatestN(n=keep)]
    if keep_best:
      policies.append(ocp.checkpoint_managers.BestN(get_metric_fn=_score, reverse=False, n=1,
                                                    keep_checkpoints_without_metrics=False))
    options = ocp.CheckpointManagerOptions(
        # best_fn makes Orbax write each checkpoint's metrics to disk, so 'best' survives a restart.
        best_fn=_score if keep_best else None,
        best_mode="max",
        preservation_policy=ocp.checkpoint_managers.AnyPreservationPolicy(policies),
        enable_async_checkpointing=asynchronous,
        cleanup_tmp_directories=True,
        create=True,
    )
    self.directory = os.path.abspath(os.fspath(directory))
    self._manager = ocp.CheckpointManager(self.directory, options=options, item_names=("state", "extra"))

  def latest_step(self) -> int | None:
    """Step of the newest complete checkpoint, or None."""
    return self._manager.latest_step()

  def best_step(self) -> int | None:
    """Step of the kept checkpoint with the highest `metrics['score']` (earliest on ties, see `best_rank`), or None
    when none carries metrics."""
    scored = []
    for step in self._manager.all_steps():
      metrics = self._manager.metrics(step)
      if metrics and SCORE_KEY in metrics:
        scored.append((float(metrics[SCORE_KEY]), step))
    return max(scored, key=lambda item: best_rank(*item))[1] if scored else None

  def all_steps(self) -> list[int]:
    """Steps of every kept checkpoint, ascending."""
    return sorted(self._manager.all_steps())

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
