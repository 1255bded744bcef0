"""layers.BatchNorm (linear-time tracing) against nnx.BatchNorm: outputs, gradients and running statistics."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from ccfnet_jax.models import layers


def _pair(features: int, dtype):
  ours = layers.batch_norm(features, rngs=nnx.Rngs(0), dtype=dtype)
  theirs = nnx.BatchNorm(features, momentum=layers.BN_MOMENTUM, epsilon=layers.BN_EPSILON, dtype=dtype,
                         param_dtype=jnp.float32, rngs=nnx.Rngs(0))
  for bn in (ours, theirs):  # non-trivial scale, shift and running statistics
    bn.scale.set_value(jnp.linspace(0.5, 1.5, features))
    bn.bias.set_value(jnp.linspace(-0.2, 0.3, features))
    bn.mean.set_value(jnp.linspace(-1.0, 1.0, features))
    bn.var.set_value(jnp.linspace(0.5, 2.0, features))
  return ours, theirs


@pytest.mark.parametrize("dtype,tol", [(jnp.float32, 1e-5), (jnp.bfloat16, 2e-2)])
def test_train_mode_matches_nnx(dtype, tol):
  ours, theirs = _pair(6, dtype)
  x = 3.0 + 2.0 * jax.random.normal(jax.random.key(1), (2, 5, 4, 6))  # mean far from 0: E[x^2] - E[x]^2 matters
  weights = jax.random.normal(jax.random.key(2), x.shape)

  def loss(bn, x):
    return jnp.sum(bn(x).astype(jnp.float32) * weights)

  ys = [bn(x) for bn in (ours, theirs)]
  assert ys[0].dtype == ys[1].dtype == dtype
  np.testing.assert_allclose(np.asarray(ys[0], np.float32), np.asarray(ys[1], np.float32), rtol=tol, atol=tol)
  for name in ("mean", "var"):  # both updated once, by the same batch
    np.testing.assert_allclose(getattr(ours, name).get_value(), getattr(theirs, name).get_value(), rtol=1e-5)
  grads = [nnx.grad(loss, argnums=(0, 1))(bn, x) for bn in _pair(6, dtype)]
  np.testing.assert_allclose(grads[0][1], grads[1][1], rtol=tol, atol=tol)  # through the batch statistics
  for name in ("scale", "bias"):
    np.testing.assert_allclose(getattr(grads[0][0], name).get_value(), getattr(grads[1][0], name).get_value(),
                               rtol=tol, atol=tol)


def test_eval_mode_and_jit_match_nnx():
  ours, theirs = _pair(3, jnp.float32)
  x = jax.random.normal(jax.random.key(3), (4, 3, 3, 3))

  @nnx.jit
  def train_then_eval(bn, x):
    bn.train()
    bn(x)
    bn.eval()
    return bn(x)

  np.testing.assert_allclose(train_then_eval(ours, x), train_then_eval(theirs, x), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(ours.var.get_value(), theirs.var.get_value(), rtol=1e-6)
