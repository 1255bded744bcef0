"""The max-pool with a hand-written gradient (ccfnet_jax.models.layers.max_pool, overlapping windows) against XLA's
own reduce-window max pool and its select-and-scatter gradient."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from ccfnet_jax.models import layers


def _xla_max_pool(x, window, stride, padding):
  return nnx.max_pool(x, (window, window), strides=(stride, stride), padding=((padding, padding), (padding, padding)))


@pytest.mark.parametrize("shape,window,stride,padding", [
    ((2, 16, 16, 4), 3, 2, 1),  # the ResNet stem
    ((1, 7, 9, 3), 3, 2, 1),  # odd sides: the last input row/col is reached by one window only
    ((1, 11, 10, 2), 5, 2, 2),
    ((1, 9, 9, 2), 3, 2, 0),  # no padding: the last row/col is reached by no window
])
def test_values_and_gradient_match_xla(shape, window, stride, padding):
  x = jax.nn.relu(jax.random.normal(jax.random.key(0), shape))  # ties at 0, as after the stem's ReLU
  x = x.at[:, ::3, ::2].set(1.0)  # and ties at a positive value, where the first maximum must win
  weights = jax.random.normal(jax.random.key(1), _xla_max_pool(x, window, stride, padding).shape)

  def loss(pool):
    return lambda x: jnp.sum(pool(x, window, stride, padding) * weights)

  np.testing.assert_array_equal(layers.max_pool(x, window, stride, padding), _xla_max_pool(x, window, stride, padding))
  ours = jax.jit(jax.grad(loss(layers.max_pool)))(x)
  xla = jax.jit(jax.grad(loss(_xla_max_pool)))(x)
  # Same positions get the same sums of output gradients; only the order of the additions may differ.
  np.testing.assert_allclose(ours, xla, rtol=1e-6, atol=1e-6)
  assert np.count_nonzero(np.asarray(ours)) == np.count_nonzero(np.asarray(xla))


def test_tied_window_sends_gradient_to_its_first_maximum():
  x = jnp.ones((1, 4, 4, 1))  # every window is one tie
  grad = jax.jit(jax.grad(lambda x: jnp.sum(layers.max_pool(x, 3, 2, 1) * jnp.arange(1.0, 5.0).reshape(1, 2, 2, 1))))(x)
  # Output (r, c) reads rows 2r-1..2r+1, cols 2c-1..2c+1 of the -inf padded input: its first real cell is
  # (max(2r-1, 0), max(2c-1, 0)) in row-major order.
  expected = np.zeros((4, 4))
  expected[0, 0], expected[0, 1], expected[1, 0], expected[1, 1] = 1, 2, 3, 4
  np.testing.assert_array_equal(np.asarray(grad)[0, :, :, 0], expected)
