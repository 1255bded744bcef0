"""Mesh, shardings, distributed start-up, and the data-parallel train step (8 fake CPU devices vs 1)."""

from __future__ import annotations

import jax
import numpy as np
import pytest

import tiny_training
from ccfnet_jax import parallel


def test_mesh_spans_all_devices_and_shards_the_batch_axis():
  mesh = parallel.make_mesh()
  assert mesh.axis_names == ("data",)
  assert parallel.num_data_shards(mesh) == jax.device_count() == 8
  x = jax.device_put(np.arange(16.0).reshape(8, 2), parallel.data_sharding(mesh))
  assert {tuple(s.data.shape) for s in x.addressable_shards} == {(1, 2)}
  y = parallel.replicate({"w": np.ones((3, 3), np.float32)}, mesh)["w"]
  assert all(s.data.shape == (3, 3) for s in y.addressable_shards) and len(y.addressable_shards) == 8


def test_global_batch_must_split_over_the_devices():
  mesh = parallel.make_mesh()
  parallel.check_global_batch_size(16, mesh)
  with pytest.raises(ValueError, match="batch_size = 12 must be a positive multiple"):
    parallel.check_global_batch_size(12, mesh)
  with pytest.raises(ValueError, match="eval_batch_size"):
    parallel.check_global_batch_size(0, mesh, "eval_batch_size")


def test_distributed_init_is_skipped_on_a_single_host(monkeypatch):
  for name in ("JAX_COORDINATOR_ADDRESS", "SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE", "JAX_NUM_PROCESSES",
               "TPU_WORKER_HOSTNAMES", "CCFNET_DISTRIBUTED"):
    monkeypatch.delenv(name, raising=False)
  calls = []
  monkeypatch.setattr(jax.distributed, "initialize", lambda **kw: calls.append(kw))
  assert parallel.maybe_initialize_distributed() is False
  monkeypatch.setenv("SLURM_NTASKS", "1")
  assert parallel.maybe_initialize_distributed() is False
  assert not calls
  # A multi-task SLURM job, or explicit arguments, do initialise (here: the recorded call).
  monkeypatch.setenv("SLURM_NTASKS", "4")
  assert parallel.maybe_initialize_distributed() is True
  monkeypatch.setenv("CCFNET_DISTRIBUTED", "0")
  assert parallel.maybe_initialize_distributed() is False
  assert parallel.maybe_initialize_distributed("localhost:1234", 2, 1) is True
  assert calls[-1] == {"coordinator_address": "localhost:1234", "num_processes": 2, "process_id": 1}
  assert len(calls) == 2


def _one_step(devices, config, host_batches, batching=None):
  """One jitted train step (augmentation on) of len(host_batches) stacked folds on a mesh of `devices`; returns
  (state, scalars) on the host."""
  mesh = parallel.make_mesh(devices)
  step, state, args, _ = tiny_training.jit_step(config, mesh, folds=tuple(range(len(host_batches))), key=3,
                                                batching=batching)
  state, scalars = step(state, tiny_training.stacked_global(host_batches, mesh), args)
  return parallel.to_host(state), parallel.to_host(scalars)


@pytest.mark.parametrize("num_folds,batching", [(1, None), (2, "unroll"), (2, "vmap")],
                         ids=["one_fold", "stacked_unroll", "stacked_vmap"])
def test_train_step_on_8_devices_equals_the_single_device_step(num_folds, batching):
  config = tiny_training.tiny_config()
  host_batches = [tiny_training.fake_batch(8, seed=k) for k in range(num_folds)]
  state_1, scalars_1 = _one_step(jax.devices()[:1], config, host_batches, batching)
  state_8, scalars_8 = _one_step(jax.devices(), config, host_batches, batching)
  np.testing.assert_allclose(scalars_8["loss"], scalars_1["loss"], rtol=1e-5)
  np.testing.assert_allclose(scalars_8["grad_norm"], scalars_1["grad_norm"], rtol=1e-4)
  # Parameters after the AdamW step and the BatchNorm running statistics: the statistics only agree if BatchNorm
  # normalised over the GLOBAL batch of 8 (one example per device would give other means and variances).
  for a, b in zip(jax.tree.leaves(state_1.params), jax.tree.leaves(state_8.params)):
    np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-6)
  for a, b in zip(jax.tree.leaves(state_1.batch_stats), jax.tree.leaves(state_8.batch_stats)):
    np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-6)
  assert np.all(state_8.step == 1) and np.all(state_1.step == 1)
  # The step changed the parameters (the comparison above is not between two untouched initialisations).
  fresh = tiny_training.initial_state(config, key=3)[2]
  moved = [not np.allclose(a, b[0]) for a, b in zip(jax.tree.leaves(fresh.params), jax.tree.leaves(state_8.params))]
  assert all(moved)
