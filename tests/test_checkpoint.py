"""Orbax checkpoints: exact round trip with typed optimizer state, last-N + best retention, restore on other meshes."""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import tiny_training
from ccfnet_jax import checkpoint as checkpoint_lib
from ccfnet_jax import parallel, train


def _state(seed: int = 0):
  _, _, state = tiny_training.initial_state(tiny_training.tiny_config(), key=seed)
  # Make every leaf distinctive (the optimizer moments start at zero).
  leaves, treedef = jax.tree.flatten(state)
  rng = np.random.default_rng(seed)
  leaves = [jnp.asarray(rng.normal(size=x.shape).astype(x.dtype)) if x.dtype.kind == "f" else x + 7 for x in leaves]
  return jax.tree.unflatten(treedef, leaves)


def _assert_equal_trees(a, b):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    assert x.dtype == y.dtype and np.array_equal(np.asarray(x), np.asarray(y))


def test_round_trip_is_exact_and_keeps_types(tmp_path):
  mesh = parallel.make_mesh()
  state = parallel.replicate(_state(), mesh)
  extra = {"data_iterator": {"next_index": 17}, "evals": [{"score": 1.5, "step": 3}], "fold": 2}
  with checkpoint_lib.Checkpointer(tmp_path / "ckpt") as ckpt:
    assert ckpt.save(3, state, extra)
    assert not ckpt.save(3, state, extra)  # an existing step is not overwritten
  with checkpoint_lib.Checkpointer(tmp_path / "ckpt") as ckpt:
    assert ckpt.latest_step() == 3
    restored, restored_extra = ckpt.restore(3, checkpoint_lib.abstract_like(state,
                                                                            parallel.replicated_sharding(mesh)))
    with pytest.raises(FileNotFoundError, match="no checkpoint for step 4"):
      ckpt.restore(4, state)
  _assert_equal_trees(parallel.to_host(state), parallel.to_host(restored))
  assert restored_extra == extra
  assert isinstance(restored, train.TrainState)
  adam_states = [s for s in jax.tree.leaves(restored.opt_state, is_leaf=lambda x: isinstance(x, tuple) and
                                            hasattr(x, "_fields")) if isinstance(s, optax.ScaleByAdamState)]
  assert len(adam_states) == 1  # the optax NamedTuples come back as themselves, not as lists


def test_keeps_the_last_few_and_the_best(tmp_path):
  state = _state()
  scores = {2: 70.0, 4: 50.0, 6: 60.0}  # evaluated steps; step 2 is the best
  with checkpoint_lib.Checkpointer(tmp_path, keep=2, asynchronous=False) as ckpt:
    for step in range(1, 8):
      metrics = {"score": scores[step]} if step in scores else None
      ckpt.save(step, state, {"step": step}, metrics=metrics)
    assert ckpt.all_steps() == [2, 6, 7]
    assert ckpt.best_step() == 2 and ckpt.latest_step() == 7
  # After a restart (new manager, as a resumed run) the best is still known and kept.
  with checkpoint_lib.Checkpointer(tmp_path, keep=2, asynchronous=False) as ckpt:
    for step in (8, 9):
      ckpt.save(step, state, {"step": step})
    assert ckpt.all_steps() == [2, 8, 9] and ckpt.best_step() == 2


@pytest.mark.parametrize("num_devices", [1, 2])
def test_checkpoint_written_on_8_devices_restores_on_fewer(tmp_path, num_devices):
  state8 = parallel.replicate(_state(1), parallel.make_mesh())
  with checkpoint_lib.Checkpointer(tmp_path) as ckpt:
    ckpt.save(5, state8, {})
  small_mesh = parallel.make_mesh(jax.devices()[:num_devices])
  with checkpoint_lib.Checkpointer(tmp_path) as ckpt:
    restored, _ = ckpt.restore(5, checkpoint_lib.abstract_like(state8, parallel.replicated_sharding(small_mesh)))
  leaf = jax.tree.leaves(restored.params)[0]
  assert leaf.sharding.mesh.devices.size == num_devices and len(leaf.addressable_shards) == num_devices
  _assert_equal_trees(parallel.to_host(state8), parallel.to_host(restored))


def test_a_tie_keeps_the_earliest_best_the_one_every_reader_names(tmp_path):
  """Retention, best_step and the results' rule agree on ties: the earliest of equal scores is kept and named."""
  from ccfnet_jax.train import results  # pylint: disable=g-import-not-at-top
  state = _state()
  scores = {2: 60.0, 4: 60.0, 6: 60.0}
  with checkpoint_lib.Checkpointer(tmp_path, keep=1, asynchronous=False) as ckpt:
    for step in range(1, 9):
      ckpt.save(step, state, {}, metrics={"score": scores[step]} if step in scores else None)
    assert ckpt.all_steps() == [2, 8] and ckpt.best_step() == 2
  history = [{"score": v, "step": k, "epoch": k, "disc_recall": 0.0, "vertebra_recall": 0.0, "disc_auc": 0.0,
              "vertebra_auc": 0.0} for k, v in scores.items()]
  assert results.summarize_history(history)["best"]["step"] == 2
  assert checkpoint_lib.best_of([(4, 1.0), (2, 1.0), (3, 0.5)]) == 2


def test_a_damaged_checkpoint_is_set_aside_and_the_step_can_be_written_again(tmp_path):
  state = _state()
  with checkpoint_lib.Checkpointer(tmp_path / "checkpoints", asynchronous=False) as ckpt:
    for step in (1, 2):
      ckpt.save(step, state, {"step": step})
    moved = ckpt.set_aside(2)
    assert ckpt.all_steps() == [1] and os.path.isdir(moved)
    assert os.path.dirname(moved) == str(tmp_path / "damaged_checkpoints")
    assert ckpt.save(2, state, {"step": 2})  # the step is free again
