"""1x1 convs computed as matrix products (ccfnet_jax.models.layers.conv_general_dilated) against XLA's convolution."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from ccfnet_jax.models import layers

_DN = ("NHWC", "HWIO", "NHWC")


@pytest.mark.parametrize("shape,out,stride,bias", [
    ((2, 8, 6, 5), 7, 1, True),
    ((2, 9, 7, 4), 3, 2, False),  # the ResNet downsample shortcut: odd sides keep the first row/col of each pair
    ((1, 6, 6, 259), 1, 1, True),  # the multi-stride pooling's C -> 1 conv, after the fusion's odd width
])
def test_pointwise_conv_matches_xla_values_and_gradients(shape, out, stride, bias):
  conv = layers.conv(shape[-1], out, 1, stride=stride, use_bias=bias, rngs=nnx.Rngs(0))
  conv.kernel[...] = jax.random.normal(jax.random.key(1), conv.kernel.shape)
  if bias:
    conv.bias[...] = jax.random.normal(jax.random.key(2), conv.bias.shape)
  x = jax.random.normal(jax.random.key(3), shape)

  graphdef, state = nnx.split(conv)

  def ours(kernel, x):
    module = nnx.merge(graphdef, state)
    module.kernel = nnx.Param(kernel)
    return module(x)

  def xla(kernel, x):
    y = jax.lax.conv_general_dilated(x, kernel, (stride, stride), ((0, 0), (0, 0)), dimension_numbers=_DN)
    return y + conv.bias[...] if bias else y

  kernel = conv.kernel[...]
  np.testing.assert_allclose(ours(kernel, x), xla(kernel, x), rtol=1e-5, atol=1e-5)
  cotangent = jax.random.normal(jax.random.key(4), xla(kernel, x).shape)
  grads = [jax.grad(lambda k, x, f=f: jnp.sum(f(k, x) * cotangent), argnums=(0, 1))(kernel, x) for f in (ours, xla)]
  for a, b in zip(*grads):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)


def test_only_unpadded_pointwise_nhwc_convs_become_products(monkeypatch):
  calls = []
  real = jax.lax.conv_general_dilated
  monkeypatch.setattr(jax.lax, "conv_general_dilated", lambda *a, **k: calls.append(a[1].shape) or real(*a, **k))
  x = jnp.ones((1, 8, 8, 4))
  layers.conv(4, 2, 1, rngs=nnx.Rngs(0))(x)
  layers.conv(4, 2, 1, stride=2, rngs=nnx.Rngs(0))(x)
  assert calls == []
  layers.conv(4, 2, 3, rngs=nnx.Rngs(0))(x)
  layers.conv(4, 2, 3, dilation=3, rngs=nnx.Rngs(0))(x)
  nchw = layers.conv_general_dilated(jnp.ones((1, 4, 8, 8)), jnp.ones((1, 1, 4, 2)), (1, 1), "VALID",
                                     dimension_numbers=("NCHW", "HWIO", "NCHW"))
  assert calls == [(3, 3, 4, 2), (3, 3, 4, 2), (1, 1, 4, 2)]
  np.testing.assert_allclose(nchw, jnp.full((1, 2, 8, 8), 4.0))
