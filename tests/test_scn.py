"""SCN: how its two networks combine, the 22-channel head, and training steps at stride 4.

(Parameter counts, output shapes, stride, input checks and configs: tests/test_baselines.py; MACs:
tests/test_complexity.py; training through run.py: tests/test_table_rows_hrnet_scn.py.)
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import tiny_training
from ccfnet_jax.models import create_model, heads, layers
from ccfnet_jax.models.scn import SCN


def _image(size: int, batch: int = 1, seed: int = 0) -> jnp.ndarray:
  return jnp.asarray(np.random.default_rng(seed).uniform(size=(batch, size, size, 3)), jnp.float32)


@pytest.fixture(scope="module")
def scn() -> SCN:
  """SCN R18 (plain), built once: its random initialisation compiles one XLA program per kernel shape."""
  return SCN(18, False, rngs=nnx.Rngs(0))


def test_spatial_branch_scales_the_local_maps(scn):
  model = nnx.clone(scn)
  layers.reinitialize_convs(model, jax.random.key(1))  # outputs of order 1 (N(0, 0.001) convs shrink them to ~0)
  model.eval()
  x = _image(64)
  local = np.asarray(model.channels(x))  # the SimpleBaseline part alone
  spatial = np.asarray(model.spatial_channels(x))  # a 2 x 2 stride-32 map upsampled by 8
  assert local.shape == spatial.shape == (1, 16, 16, 44)
  assert np.ptp(spatial[0, :, :, 0]) > 0
  np.testing.assert_allclose(np.asarray(model(x).heatmap), local[..., :11] * (1 + spatial[..., :11]), rtol=1e-4,
                             atol=1e-10)
  # A constant spatial map c (zero kernel, bias c) scales every output channel by 1 + c.
  model.spatial_out.kernel[...] = jnp.zeros_like(model.spatial_out.kernel[...])
  model.spatial_out.bias[...] = jnp.full_like(model.spatial_out.bias[...], 2.0)
  out = model(x)
  np.testing.assert_allclose(np.asarray(out.offset_x), 3 * local[..., 22:33], rtol=1e-4, atol=1e-10)
  np.testing.assert_allclose(np.asarray(out.logits), 3 * local[..., 33:], rtol=1e-4, atol=1e-10)


def test_msc_variant_runs_its_spatial_branch_at_stride_16():
  model = nnx.eval_shape(lambda: SCN(18, True, rngs=nnx.Rngs(0)))
  assert (model.spatial_backbone.stride, model.spatial_upsample, model.stride) == (16, 4, 4)
  model.eval()
  out = nnx.eval_shape(lambda m, x: m.spatial_channels(x), model, jax.ShapeDtypeStruct((2, 128, 256, 3), jnp.float32))
  assert out.shape == (2, 32, 64, 44)


def test_22_channel_head_has_zero_offsets():
  channels = jnp.asarray(np.random.default_rng(0).normal(size=(2, 4, 5, 22)), jnp.float32)
  maps = heads.to_maps(channels)
  np.testing.assert_array_equal(maps.heatmap, channels[..., :11])
  np.testing.assert_array_equal(maps.logits, channels[..., 11:])
  assert not np.any(np.asarray(maps.offset_y)) and not np.any(np.asarray(maps.offset_x))
  model = nnx.eval_shape(lambda: create_model("scn", depth=18, msc=False, out_channels=22, rngs=nnx.Rngs(0)))
  assert model.out.kernel.shape[-1] == model.spatial_out.kernel.shape[-1] == 22
  model.eval()
  out = nnx.eval_shape(lambda m, x: m(x), model, jax.ShapeDtypeStruct((1, 64, 64, 3), jnp.float32))
  assert all(m.shape == (1, 16, 16, 11) for m in out)
  with pytest.raises(ValueError, match="out_channels must be one of"):
    create_model("scn", depth=18, msc=False, out_channels=33, rngs=nnx.Rngs(0))


def test_train_steps_lower_the_loss_on_a_fixed_batch(scn):
  size, batch_size = 64, 2
  step, state = tiny_training.model_step(nnx.clone(scn), size, 3e-4)
  rng = np.random.default_rng(0)
  batch = {"image": _image(size, batch_size),
           "points_xy": jnp.asarray(rng.uniform(8, size - 8, size=(batch_size, 11, 2)), jnp.float32),
           "point_valid": jnp.ones((batch_size, 11), bool),
           "disease": jnp.asarray(rng.integers(0, 2, size=(batch_size, 11)), jnp.int32)}

  def spatial_kernel(s):
    return np.asarray(jax.tree.leaves(s.params["spatial_out"]["kernel"])[0])

  before = spatial_kernel(state)
  losses = []
  for _ in range(3):
    state, scalars = step(state, batch)
    losses.append(float(scalars["loss"]))
  assert all(np.isfinite(losses))
  assert losses[2] < losses[1] < losses[0]
  assert not np.allclose(before, spatial_kernel(state))  # the spatial branch learns too
