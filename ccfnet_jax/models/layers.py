"""Building blocks with PyTorch's conventions (SPEC §2): symmetric padding, BN eps 1e-5 / momentum 0.1, N(0, 0.001).

Everything here is NHWC. `conv` and `batch_norm` return plain `nnx.Conv` / `nnx.BatchNorm` modules configured like the
reference's `nn.Conv2d` / `nn.BatchNorm2d`, so their variables are the ones `ccfnet_jax.convert` maps to PyTorch keys.
`max_pool` and `upsample_align_corners` are pure functions (jnp in, jnp out).
"""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp
import numpy as np
from flax import nnx

Dtype = Any

CONV_INIT_STD = 0.001
"""Standard deviation of the reference's conv weight init N(0, 0.001) (biases 0, BN gamma 1, beta 0)."""

BN_EPSILON = 1e-5
BN_MOMENTUM = 0.9
"""Flax momentum (weight of the old running statistic): PyTorch's momentum 0.1."""


def symmetric_padding(kernel_size: int, dilation: int = 1) -> tuple[tuple[int, int], tuple[int, int]]:
  """PyTorch-style padding `((p, p), (p, p))` with `p = dilation * (kernel_size - 1) // 2` (3x3 -> 1, 7x7 -> 3).

  Never `'SAME'`: XLA pads stride-2 convs asymmetrically, which shifts the sampling grid (SPEC §2).
  """
  if kernel_size % 2 != 1:
    raise ValueError(f"symmetric padding needs an odd kernel size, got {kernel_size}")
  p = dilation * (kernel_size - 1) // 2
  return ((p, p), (p, p))


def conv(in_features: int, out_features: int, kernel_size: int, *, stride: int = 1, dilation: int = 1,
         use_bias: bool = False, rngs: nnx.Rngs, dtype: Dtype = jnp.float32) -> nnx.Conv:
  """A square conv like `nn.Conv2d(in, out, k, stride, padding=dilation * (k - 1) // 2, dilation, bias=use_bias)`.

  Kernel `[k, k, in, out]` (HWIO) drawn from N(0, 0.001), bias zeros; parameters float32, computation in `dtype`.
  """
  return nnx.Conv(
      in_features, out_features, (kernel_size, kernel_size), strides=(stride, stride),
      padding=symmetric_padding(kernel_size, dilation), kernel_dilation=(dilation, dilation), use_bias=use_bias,
      dtype=dtype, param_dtype=jnp.float32, kernel_init=nnx.initializers.normal(stddev=CONV_INIT_STD),
      bias_init=nnx.initializers.zeros_init(), rngs=rngs)


def batch_norm(num_features: int, *, rngs: nnx.Rngs, dtype: Dtype = jnp.float32) -> nnx.BatchNorm:
  """`nn.BatchNorm2d(num_features)` over the last axis: eps 1e-5, PyTorch momentum 0.1, gamma 1, beta 0.

  Train mode normalises with the batch statistics and updates the running ones; eval mode (`model.eval()`) uses the
  running statistics. (PyTorch updates `running_var` with the unbiased batch variance, Flax with the biased one; eval
  outputs do not depend on this.)
  """
  return nnx.BatchNorm(num_features, momentum=BN_MOMENTUM, epsilon=BN_EPSILON, dtype=dtype,
                       param_dtype=jnp.float32, rngs=rngs)


def max_pool(x: jnp.ndarray, window: int, stride: int, padding: int = 0) -> jnp.ndarray:
  """Max pooling `[B, H, W, C] -> [B, H', W', C]` like `nn.MaxPool2d(window, stride, padding)`.

  Padded cells hold -inf, so they never win (PyTorch's semantics).
  """
  return nnx.max_pool(x, (window, window), strides=(stride, stride),
                      padding=((padding, padding), (padding, padding)))


def _align_corners_taps(n_in: int, factor: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Static lerp taps of a 1-D align_corners=True resize from `n_in` to `n_in * factor` samples.

  Output i samples input position `p = i * (n_in - 1) / (n_out - 1)`; returns (lower index, upper index, weight of
  the upper one), each `[n_out]`. With `n_in == 1` every output reads the single input (broadcast).
  """
  n_out = n_in * factor
  if n_in == 1 or n_out == 1:
    zeros = np.zeros(n_out, np.int32)
    return zeros, zeros, np.zeros(n_out, np.float64)
  position = np.arange(n_out, dtype=np.float64) * (n_in - 1) / (n_out - 1)
  lower = np.minimum(np.floor(position).astype(np.int32), n_in - 1)
  upper = np.minimum(lower + 1, n_in - 1)
  return lower, upper, position - lower


def _lerp_axis(x: jnp.ndarray, axis: int, factor: int) -> jnp.ndarray:
  lower, upper, weight = _align_corners_taps(x.shape[axis], factor)
  shape = [1] * x.ndim
  shape[axis] = weight.size
  w = jnp.asarray(weight.reshape(shape), dtype=x.dtype)
  return jnp.take(x, lower, axis=axis) * (1 - w) + jnp.take(x, upper, axis=axis) * w


def upsample_align_corners(x: jnp.ndarray, factor: int) -> jnp.ndarray:
  """Bilinear upsampling by an integer factor with align_corners=True: `[B, h, w, C] -> [B, h*f, w*f, C]`.

  PyTorch's `F.interpolate(scale_factor=f, mode='bilinear', align_corners=True)`: output pixel i samples input
  position `i * (n_in - 1) / (n_out - 1)` (corners map onto corners), separably in y then x. Not
  `jax.image.resize(..., 'bilinear')`, which uses the half-pixel convention (SPEC §2).
  """
  if x.ndim != 4:
    raise ValueError(f"upsample_align_corners expects [B, h, w, C], got shape {x.shape}")
  if factor < 1:
    raise ValueError(f"factor must be a positive integer, got {factor}")
  return _lerp_axis(_lerp_axis(x, 1, factor), 2, factor)
