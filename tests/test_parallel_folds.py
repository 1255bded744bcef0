"""The stacked-fold trainer (ccfnet_jax.parallel_folds) against training the folds one after another."""

from __future__ import annotations

import json
import os

import jax
import numpy as np
import pytest

import tiny_training
from ccfnet_jax import checkpoint as checkpoint_lib
from ccfnet_jax import parallel, parallel_folds, train

NUM_STUDIES = 8  # divisible by the 4 folds: every training set has 6 studies, so both trainers take the same steps
STEPS = 3


def test_stack_and_unstack_round_trip():
  trees = [{"a": np.full((2, 3), k, np.float32), "b": (np.int32(k),)} for k in range(3)]
  stacked = parallel_folds.stack(trees)
  assert stacked["a"].shape == (3, 2, 3) and stacked["b"][0].shape == (3,)
  for k in range(3):
    back = parallel_folds.unstack(stacked, k)
    np.testing.assert_array_equal(back["a"], trees[k]["a"])
    assert int(back["b"][0]) == k
  with pytest.raises(ValueError, match="no trees"):
    parallel_folds.stack([])


def test_stacked_batches_keep_each_folds_data():
  mesh = parallel.make_mesh()
  batches = [tiny_training.fake_batch(batch_size=8, image_size=128, seed=k) for k in range(2)]
  stacked = parallel_folds.stacked_to_global(batches, mesh)
  assert stacked["image"].shape == (2, 8, 128, 128, 3)
  for k in range(2):
    np.testing.assert_array_equal(np.asarray(stacked["points_xy"][k]), batches[k]["points_xy"])


@pytest.fixture(scope="module")
def phantom_dir(tmp_path_factory) -> str:
  import tfds_spine  # pylint: disable=g-import-not-at-top
  path = str(tmp_path_factory.mktemp("tfds_parallel_folds"))
  tfds_spine.prepare("phantom", path, num_studies=NUM_STUDIES, seed=0)
  return path


def _restore_params(config, fold_dir: str, step: int):
  """The parameters of `fold_dir`'s checkpoint `step` as numpy (restored onto a fresh state's structure)."""
  model = train.create_model(config, jax.random.key(0))
  _, _, template = train.init_state(model, train.create_optimizer(config, train.create_schedule(config, STEPS, 1)))
  sharding = parallel.replicated_sharding(parallel.make_mesh())
  with checkpoint_lib.Checkpointer(os.path.join(fold_dir, "checkpoints")) as checkpoints:
    assert checkpoints.latest_step() == step
    state, _ = checkpoints.restore(step, checkpoint_lib.abstract_like(template, sharding))
  return jax.tree.map(np.asarray, (state.params, state.batch_stats))


@pytest.mark.parametrize("batching", parallel_folds.FOLD_BATCHING)
def test_parallel_folds_match_sequential_training(phantom_dir, tmp_path, batching):
  # Augmentation on (reference values) and a learning rate that moves the parameters: each fold must get its own
  # initialisation, data stream, augmentation keys and pos_weight for the two runs to agree. Two folds (not four)
  # keep the test fast: each sequential fold compiles its own step (its pos_weight is a compile-time constant); the
  # stacked code path is the same for any number of folds.
  config = tiny_training.tiny_config(batch_size=2, eval_batch_size=4, phantom_studies=NUM_STUDIES,
                                     num_steps=STEPS, eval_every_steps=2, data_dir=phantom_dir, fold="0,1")
  config.fold_batching = batching  # vmap (accelerators' default) and unroll (CPU's) must both match
  folds = train.parse_folds(config.fold, config.num_folds)
  mesh = parallel.make_mesh(jax.devices()[:2])  # batch 2 split over 2 devices: the stacked batch is sharded too
  sequential_dir, parallel_dir = str(tmp_path / "sequential"), str(tmp_path / "parallel")
  sequential = {k: train.train_fold(config, k, sequential_dir, mesh=mesh) for k in folds}
  stacked = parallel_folds.train_folds(config, folds, parallel_dir, mesh=mesh)

  assert sorted(stacked) == folds
  for k in folds:
    seq, par = sequential[k], stacked[k]
    assert par["params"] == seq["params"]
    for which in ("best", "last"):
      assert par[which]["step"] == seq[which]["step"] and par[which]["epoch"] == seq[which]["epoch"]
      for name in ("disc_recall", "vertebra_recall", "disc_auc", "vertebra_auc", "score"):
        assert par[which][name] == pytest.approx(seq[which][name], abs=1e-3), (k, which, name)
    with open(os.path.join(parallel_dir, f"fold_{k}", train.RESULTS_FILE), encoding="utf-8") as f:
      assert json.load(f)["last"]["step"] == STEPS
    seq_params = _restore_params(config, os.path.join(sequential_dir, f"fold_{k}"), STEPS)
    par_params = _restore_params(config, os.path.join(parallel_dir, f"fold_{k}"), STEPS)
    for a, b in zip(jax.tree.leaves(seq_params), jax.tree.leaves(par_params)):
      np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-6)
  # The folds really differ from each other (not one model trained four times).
  first = jax.tree.leaves(_restore_params(config, os.path.join(parallel_dir, "fold_0"), STEPS))
  second = jax.tree.leaves(_restore_params(config, os.path.join(parallel_dir, "fold_1"), STEPS))
  assert any(not np.allclose(a, b) for a, b in zip(first, second))
