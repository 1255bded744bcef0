"""Data on the devices trains exactly as the host pipeline: the same batches in the same order, folds in turn or
stacked, and a run may switch between the two when it resumes."""

from __future__ import annotations

import jax
import numpy as np
import pytest

import tiny_training
from ccfnet_jax import parallel, train
from ccfnet_jax.data import pipeline
from ccfnet_jax.train import device_data
from test_stacked_folds import NUM_STUDIES, _restore_params, phantom_dir  # noqa: F401  (fixture)


def test_the_gathered_batches_are_the_host_pipelines():
  source = [tiny_training.fake_record(i) for i in range(10)]
  mesh = parallel.make_mesh(jax.devices()[:2])
  on_device = device_data.load([source], [7], batch_size=4, image_size=64, num_steps=6, mesh=mesh)
  host = iter(pipeline.train_dataset(source, batch_size=4, image_size=64, seed=7))
  gather = jax.jit(lambda r, o, s: device_data.gather(r, o, s, parallel.folds_data_sharding(mesh)))
  for step in range(6):
    expected = next(host)
    got = jax.device_get(gather(on_device.records, on_device.order, np.int32(step)))
    for key in device_data.TRAIN_KEYS:
      np.testing.assert_array_equal(got[key][0], expected[key], err_msg=f"{key} at step {step}")
  assert on_device.num_bytes >= 10 * 64 * 64 * 3 * 4


@pytest.mark.parametrize("stacked", [False, True], ids=["sequential", "stacked"])
def test_training_on_device_equals_the_host_pipeline(phantom_dir, tmp_path, stacked):  # noqa: F811
  config = tiny_training.tiny_config(batch_size=2, eval_batch_size=4, phantom_studies=NUM_STUDIES, num_steps=4,
                                     eval_every_steps=2, data_dir=phantom_dir, fold="0,1", parallel_folds=stacked)
  mesh = parallel.make_mesh(jax.devices()[:2])
  host = train.train_and_evaluate(config, str(tmp_path / "host"), mesh=mesh)
  config.data_on_device = True
  device = train.train_and_evaluate(config, str(tmp_path / "device"), mesh=mesh)
  assert device == host  # the same evaluations, step by step
  for fold in (0, 1):
    a = _restore_params(config, str(tmp_path / "host"), fold, 4)
    b = _restore_params(config, str(tmp_path / "device"), fold, 4)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
      np.testing.assert_allclose(y, x, rtol=1e-6, atol=1e-7)
  # A run started on the host continues on the devices from its checkpoint, and ends where the others did.
  config.data_on_device = False
  config.num_steps = 2
  train.train_and_evaluate(config, str(tmp_path / "switch"), mesh=mesh)
  config.data_on_device = True
  config.num_steps = 4
  switched = train.train_and_evaluate(config, str(tmp_path / "switch"), mesh=mesh, allow_config_change=True)
  assert switched["folds"]["0"]["last"] == host["folds"]["0"]["last"]
