"""BatchNorm recalibration ("precise BN"): statistics of unaugmented training images replace the running averages."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import tiny_training
from ccfnet_jax import parallel, train
from ccfnet_jax.train import recalibrate, setup
from ccfnet_jax.data import pipeline
from test_train import _restore_params, phantom_data_dir  # noqa: F401  (fixture)


def _state(config):
  train_graphdef, _, state = tiny_training.initial_state(config)
  return train_graphdef, state


def _recalibrated(state, batches, graphdef, mesh):
  return state.replace(batch_stats=recalibrate.recalibrated_batch_stats(
      state.params, state.batch_stats, batches, graphdef=graphdef, mesh=mesh))


def _first_bn_input(state, graphdef, image: np.ndarray) -> np.ndarray:
  """The input of TinyNet's first BatchNorm (its first conv's output), computed outside the library code."""
  model = nnx.merge(graphdef, state.params, state.batch_stats)
  return np.asarray(model.convs[0](jnp.asarray(image)))


def test_statistics_are_the_mean_of_per_batch_statistics():
  config = tiny_training.tiny_config()
  graphdef, state = _state(config)
  mesh = parallel.make_mesh()  # 8 devices: the statistics are over the global batch
  batches = [tiny_training.fake_batch(8, seed=s) for s in (1, 2, 3)]
  new = parallel.to_host(_recalibrated(parallel.replicate(state, mesh), batches, graphdef, mesh))
  features = [_first_bn_input(state, graphdef, b["image"]) for b in batches]
  expected_mean = np.mean([f.mean(axis=(0, 1, 2)) for f in features], axis=0)
  expected_var = np.mean([f.var(axis=(0, 1, 2)) for f in features], axis=0)  # biased, as BatchNorm normalises
  got = new.batch_stats["norms"][0]
  np.testing.assert_allclose(got["mean"][...], expected_mean, rtol=1e-4, atol=1e-7)
  np.testing.assert_allclose(got["var"][...], expected_var, rtol=1e-3)  # flax: E[x^2] - E[x]^2 in float32
  assert not np.allclose(expected_mean, state.batch_stats["norms"][0]["mean"][...])  # it did change something
  for a, b in zip(jax.tree.leaves(new.params), jax.tree.leaves(state.params)):
    np.testing.assert_array_equal(a, b)
  unchanged = recalibrate.recalibrated_batch_stats(state.params, state.batch_stats, [], graphdef=graphdef,
                                                   mesh=parallel.make_mesh(jax.devices()[:1]))
  assert unchanged is state.batch_stats


@pytest.mark.parametrize("stacked", [False, True], ids=["sequential", "stacked"])
def test_training_evaluates_and_checkpoints_the_recalibrated_statistics(tmp_path, phantom_data_dir,  # noqa: F811
                                                                       stacked):
  config = tiny_training.tiny_config(data_dir=phantom_data_dir, num_steps=2, eval_every_steps=2,
                                     recalibrate_bn=True, fold="0,1", parallel_folds=stacked)
  train.train_and_evaluate(config, str(tmp_path))
  graphdef, _ = _state(config)
  mesh = parallel.make_mesh(jax.devices()[:1])
  for fold in (0, 1):
    saved, _ = _restore_params(str(tmp_path), fold, 2, config)
    train_source = setup.open_fold(config, fold, str(tmp_path)).train_source
    expected = _recalibrated(saved, pipeline.calibration_dataset(
        train_source, batch_size=config.batch_size, image_size=config.image_size), graphdef, mesh)
    for a, b in zip(jax.tree.leaves(saved.batch_stats), jax.tree.leaves(expected.batch_stats)):
      np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
