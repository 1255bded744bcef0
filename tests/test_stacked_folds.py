"""Folds trained together (stacked, one program) against the same folds trained one after another, and the one
compiled step that sequential folds share."""

from __future__ import annotations

import json
import logging
import os

import jax
import numpy as np
import pytest

import tiny_training
from ccfnet_jax import checkpoint as checkpoint_lib
from ccfnet_jax import parallel, rundir, train
from ccfnet_jax.train import steps

NUM_STUDIES = 8  # divisible by the 4 folds: every training set has 6 studies, so both ways take the same steps
STEPS = 3


def test_stack_and_unstack_round_trip():
  trees = [{"a": np.full((2, 3), k, np.float32), "b": (np.int32(k),)} for k in range(3)]
  stacked = steps.stack(trees)
  assert stacked["a"].shape == (3, 2, 3) and stacked["b"][0].shape == (3,)
  for k in range(3):
    back = steps.unstack(stacked, k)
    np.testing.assert_array_equal(back["a"], trees[k]["a"])
    assert int(back["b"][0]) == k
  with pytest.raises(ValueError, match="no trees"):
    steps.stack([])


def test_stacked_batches_keep_each_folds_data():
  mesh = parallel.make_mesh()
  batches = [tiny_training.fake_batch(batch_size=8, image_size=128, seed=k) for k in range(2)]
  stacked = tiny_training.stacked_global(batches, mesh)
  assert stacked["image"].shape == (2, 8, 128, 128, 3)
  for k in range(2):
    np.testing.assert_array_equal(np.asarray(stacked["points_xy"][k]), batches[k]["points_xy"])


@pytest.fixture(scope="module")
def phantom_dir(tmp_path_factory) -> str:
  import tfds_spine  # pylint: disable=g-import-not-at-top
  path = str(tmp_path_factory.mktemp("tfds_stacked_folds"))
  tfds_spine.prepare("phantom", path, num_studies=NUM_STUDIES, seed=0)
  return path


def _restore_params(config, workdir: str, fold: int, step: int):
  """The parameters of fold `fold`'s checkpoint `step` as numpy (restored onto a fresh state's structure)."""
  _, _, template = tiny_training.initial_state(config)
  sharding = parallel.replicated_sharding(parallel.make_mesh())
  with checkpoint_lib.Checkpointer(rundir.checkpoints_dir(workdir, fold)) as checkpoints:
    assert checkpoints.latest_step() == step
    state, _ = checkpoints.restore(step, checkpoint_lib.abstract_like(template, sharding))
  return jax.tree.map(np.asarray, (state.params, state.batch_stats))


class _CompileCounter(logging.Handler):
  """Counts JAX's "Compiling <name>" log lines (jax_log_compiles) per jitted function name."""

  def __init__(self):
    super().__init__(logging.DEBUG)
    self.names: list[str] = []

  def emit(self, record):
    message = record.getMessage()
    if message.startswith("Compiling "):
      self.names.append(message.split()[1])


@pytest.mark.parametrize("batching", steps.FOLD_BATCHING)
def test_stacked_folds_match_sequential_training(phantom_dir, tmp_path, batching):
  # Augmentation on (reference values) and a learning rate that moves the parameters: each fold must get its own
  # initialisation, data stream, augmentation keys and pos_weight for the two runs to agree.
  config = tiny_training.tiny_config(batch_size=2, eval_batch_size=4, phantom_studies=NUM_STUDIES,
                                     num_steps=STEPS, eval_every_steps=2, data_dir=phantom_dir, fold="0,1",
                                     schedule="cosine")
  mesh = parallel.make_mesh(jax.devices()[:2])  # batch 2 split over 2 devices: the stacked batch is sharded too
  sequential_dir, stacked_dir = str(tmp_path / "sequential"), str(tmp_path / "stacked")
  counter = _CompileCounter()
  logger = logging.getLogger("jax")
  logger.addHandler(counter)
  try:
    with jax.log_compiles(True):
      sequential = train.train_and_evaluate(config, sequential_dir, mesh=mesh)
  finally:
    logger.removeHandler(counter)
  # One compiled train step and one compiled eval step for both folds (pos_weight, fold and schedule are traced).
  assert counter.names.count("jit(stacked_step)") == 1, counter.names
  assert counter.names.count("jit(<lambda>)") <= 2, counter.names  # the eval step (and the fold selection)
  config.parallel_folds = True
  config.fold_batching = batching  # vmap (accelerators' default) and unroll (CPU's) must both match
  stacked = train.train_and_evaluate(config, stacked_dir, mesh=mesh)

  for k in ("0", "1"):
    seq, par = sequential["folds"][k], stacked["folds"][k]
    for which in ("best", "last"):
      assert par[which]["step"] == seq[which]["step"] and par[which]["epoch"] == seq[which]["epoch"]
      for name in ("disc_recall", "vertebra_recall", "disc_auc", "vertebra_auc", "score"):
        assert par[which][name] == pytest.approx(seq[which][name], abs=1e-3), (k, which, name)
    with open(os.path.join(stacked_dir, f"fold_{k}", rundir.RESULTS_FILE), encoding="utf-8") as f:
      assert json.load(f)["last"]["step"] == STEPS
    seq_params = _restore_params(config, sequential_dir, int(k), STEPS)
    par_params = _restore_params(config, stacked_dir, int(k), STEPS)
    for a, b in zip(jax.tree.leaves(seq_params), jax.tree.leaves(par_params)):
      np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-6)
  # The folds really differ from each other (not one model trained twice).
  first = jax.tree.leaves(_restore_params(config, stacked_dir, 0, STEPS))
  second = jax.tree.leaves(_restore_params(config, stacked_dir, 1, STEPS))
  assert any(not np.allclose(a, b) for a, b in zip(first, second))
