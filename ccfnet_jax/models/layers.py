"""Building blocks with PyTorch's conventions (docs/method.md#model): symmetric padding, BN eps 1e-5 / momentum 0.1,
N(0, 0.001) init.

Everything here is NHWC. `conv` and `batch_norm` return plain `nnx.Conv` / `nnx.BatchNorm` modules configured like the
reference's `nn.Conv2d` / `nn.BatchNorm2d`, so their variables are the ones `ccfnet_jax.convert` maps to PyTorch keys.
`max_pool` and `upsample_align_corners` are pure functions (jnp in, jnp out).
"""

from __future__ import annotations

import functools
from typing import Any

import jax
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

  Never `'SAME'`: XLA pads stride-2 convs asymmetrically, which shifts the sampling grid (docs/method.md#model).
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
      bias_init=nnx.initializers.zeros_init(), conv_general_dilated=conv_general_dilated, rngs=rngs)


_NHWC_HWIO = jax.lax.ConvDimensionNumbers(lhs_spec=(0, 3, 1, 2), rhs_spec=(3, 2, 0, 1), out_spec=(0, 3, 1, 2))


def conv_general_dilated(lhs: jnp.ndarray, rhs: jnp.ndarray, window_strides: Any, padding: Any, lhs_dilation: Any = None,
                         rhs_dilation: Any = None, dimension_numbers: Any = None, feature_group_count: int = 1,
                         precision: Any = None, **kwargs: Any) -> jnp.ndarray:
  """`jax.lax.conv_general_dilated`, except that an unpadded 1x1 NHWC conv is computed as a 2-D matrix product.

  The same function (`y[b, i, j] = x[b, s*i, s*j] @ kernel[0, 0]`), but XLA:CPU runs the product form several times
  faster than its convolution kernels, forward and backward (ResNet-50 bottlenecks are mostly 1x1 convs;
  docs/performance.md). Everything else,
  and any call with `kwargs` (sharding, preferred element type), goes to `jax.lax.conv_general_dilated` unchanged.
  """
  unpadded = padding == "VALID" or tuple(map(tuple, padding)) == ((0, 0), (0, 0))
  undilated = tuple(lhs_dilation or (1, 1)) == (1, 1) and tuple(rhs_dilation or (1, 1)) == (1, 1)
  plain_call = not kwargs.get("preferred_element_type") and kwargs.get("out_sharding") is None
  pointwise = (rhs.ndim == 4 and rhs.shape[:2] == (1, 1) and feature_group_count == 1 and unpadded and undilated
               and plain_call
               and jax.lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers) == _NHWC_HWIO)
  if not pointwise:
    return jax.lax.conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation, rhs_dilation,
                                        dimension_numbers, feature_group_count, precision=precision, **kwargs)
  sh, sw = window_strides
  x = lhs if (sh, sw) == (1, 1) else lhs[:, ::sh, ::sw, :]
  c, out = rhs.shape[2:]
  y = jnp.matmul(x.reshape(-1, c), rhs.reshape(c, out), precision=precision)  # -1: the batch may be symbolic (export)
  return y.reshape(*x.shape[:-1], out)


def kaiming_normal_fan_out(key: jax.Array, shape: tuple[int, ...], dtype: Any = jnp.float32) -> jnp.ndarray:
  """torchvision's ResNet conv init for an HWIO kernel: N(0, 2 / fan_out), fan_out = kh * kw * out (ReLU gain)."""
  fan_out = int(np.prod(shape[:-2])) * shape[-1]
  return jax.random.normal(key, shape, dtype) * np.sqrt(2.0 / fan_out).astype(dtype)


def reinitialize_convs(module: nnx.Module, key: jax.Array) -> int:
  """Redraws the kernel of every `nnx.Conv` inside `module` with `kaiming_normal_fan_out` (in place).

  The reference's N(0, 0.001) suits layers trained on top of an ImageNet backbone; a backbone trained from scratch
  starts better at torchvision's own scale (biases and BatchNorm are left as they are). Returns the number of convs.
  """
  convs = [m for _, m in nnx.iter_graph(module) if isinstance(m, nnx.Conv)]
  for i, m in enumerate(convs):
    m.kernel[...] = kaiming_normal_fan_out(jax.random.fold_in(key, i), m.kernel.shape, m.kernel.dtype)
  return len(convs)


class BatchNorm(nnx.BatchNorm):
  """`nnx.BatchNorm` with the same variables, configuration and results, traced in linear rather than quadratic time.

  In train mode nnx writes the running statistics with an indexed write, which compares the new value's `.sharding`;
  on a tracer that attribute raises an error whose message is built by walking the whole trace so far. Over a
  network that is quadratic, and HRNet-W32 has 292 BatchNorm calls. Here train mode computes what nnx computes --
  batch statistics in float32 or wider (E[x^2] - E[x]^2 clipped at 0, over every axis but the last),
  `(x - mean) * (rsqrt(var + eps) * scale) + bias` with them, the result in `dtype` -- and assigns the running
  statistics whole. Eval mode, masks and other axes are nnx's own code.
  """

  def __call__(self, x: jnp.ndarray, use_running_average: bool | None = None, *,
               mask: jnp.ndarray | None = None) -> jnp.ndarray:
    running = self.use_running_average if use_running_average is None else use_running_average
    if (running or mask is not None or self.axis_name is not None or self.axis not in (-1, x.ndim - 1)
        or self.scale is None or self.bias is None):
      return super().__call__(x, use_running_average, mask=mask)
    x, scale, bias = self.promote_dtype((x, self.scale.get_value(), self.bias.get_value()), dtype=self.dtype)
    axes = tuple(range(x.ndim - 1))
    xs = x.astype(jnp.promote_types(x.dtype, jnp.float32))
    mean = xs.mean(axes)
    var = jnp.maximum(0.0, jnp.square(xs).mean(axes) - jnp.square(mean))
    y = (x - mean) * (jax.lax.rsqrt(var + self.epsilon) * scale) + bias
    m = self.momentum
    self.mean.set_value(jax.lax.stop_gradient(m * self.mean.get_value() + (1 - m) * mean))
    self.var.set_value(jax.lax.stop_gradient(m * self.var.get_value() + (1 - m) * var))
    return y.astype(self.dtype or x.dtype)


def batch_norm(num_features: int, *, rngs: nnx.Rngs, dtype: Dtype = jnp.float32) -> BatchNorm:
  """`nn.BatchNorm2d(num_features)` over the last axis: eps 1e-5, PyTorch momentum 0.1, gamma 1, beta 0.

  Train mode normalises with the batch statistics and updates the running ones; eval mode (`model.eval()`) uses the
  running statistics. (PyTorch updates `running_var` with the unbiased batch variance, Flax with the biased one; eval
  outputs do not depend on this.)
  """
  return BatchNorm(num_features, momentum=BN_MOMENTUM, epsilon=BN_EPSILON, dtype=dtype,
                       param_dtype=jnp.float32, rngs=rngs)


def max_pool(x: jnp.ndarray, window: int, stride: int, padding: int = 0) -> jnp.ndarray:
  """Max pooling `[B, H, W, C] -> [B, H', W', C]` like `nn.MaxPool2d(window, stride, padding)`.

  Padded cells hold -inf, so they never win (PyTorch's semantics). Overlapping windows (`window > stride`, the
  stem's 3x3/2) use `_overlapping_max_pool`: the same values and the same gradient (to the first maximum of each
  window, as XLA's select-and-scatter), computed with slices and pads, because XLA:CPU's select-and-scatter
  backward is far slower than the forward pass (docs/performance.md).
  """
  if window > stride:
    return _overlapping_max_pool(x, window, stride, padding)
  return nnx.max_pool(x, (window, window), strides=(stride, stride),
                      padding=((padding, padding), (padding, padding)))


def _pool_windows(x: jnp.ndarray, window: int, stride: int, padding: int
                  ) -> tuple[list[tuple[int, int, jnp.ndarray]], tuple[int, int]]:
  """The `window**2` strided views of the -inf padded `x [B, H, W, C]`, row-major: [(i, j, x_pad[:, i::s, j::s])]."""
  b, h, w, c = x.shape
  out_h, out_w = (h + 2 * padding - window) // stride + 1, (w + 2 * padding - window) // stride + 1
  xp = jnp.pad(x, ((0, 0), (padding, padding), (padding, padding), (0, 0)), constant_values=-jnp.inf)
  views = []
  for i in range(window):
    for j in range(window):
      end = (b, i + (out_h - 1) * stride + 1, j + (out_w - 1) * stride + 1, c)
      views.append((i, j, jax.lax.slice(xp, (0, i, j, 0), end, (1, stride, stride, 1))))
  return views, (out_h, out_w)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2, 3))
def _overlapping_max_pool(x: jnp.ndarray, window: int, stride: int, padding: int) -> jnp.ndarray:
  views, _ = _pool_windows(x, window, stride, padding)
  return functools.reduce(jnp.maximum, [v for _, _, v in views])


def _overlapping_max_pool_fwd(x, window, stride, padding):
  y = _overlapping_max_pool(x, window, stride, padding)
  return y, (x, y)


def _overlapping_max_pool_bwd(window, stride, padding, residuals, grad):
  """Routes each output's gradient to the first (row-major) maximum of its window, then interleaves the strided
  contributions back onto the input grid (pads and a reshape, no scatter)."""
  x, y = residuals
  b, h, w, c = x.shape
  out_h, out_w = y.shape[1:3]
  shifts = (window - 1) // stride  # window offset i = stride * q + r lands q cells down, in phase r
  taken = jnp.zeros(y.shape, bool)
  zero = jnp.zeros((), grad.dtype)
  phases: dict[tuple[int, int], jnp.ndarray] = {}
  views, _ = _pool_windows(x, window, stride, padding)
  for i, j, view in views:
    hit = (view == y) & ~taken
    taken = taken | hit
    (qi, ri), (qj, rj) = divmod(i, stride), divmod(j, stride)
    part = jnp.pad(jnp.where(hit, grad, zero), ((0, 0), (qi, shifts - qi), (qj, shifts - qj), (0, 0)))
    phases[(ri, rj)] = part if (ri, rj) not in phases else phases[(ri, rj)] + part
  empty = jnp.zeros((b, out_h + shifts, out_w + shifts, c), grad.dtype)
  grid = jnp.stack([jnp.stack([phases.get((ri, rj), empty) for rj in range(stride)], axis=3)
                    for ri in range(stride)], axis=2)  # [B, out_h + q, stride, out_w + q, stride, C]
  grad_padded = grid.reshape(b, (out_h + shifts) * stride, (out_w + shifts) * stride, c)
  grad_x = grad_padded[:, padding:padding + h, padding:padding + w, :]
  missing_h, missing_w = h - grad_x.shape[1], w - grad_x.shape[2]  # input rows/cols no window reached
  return (jnp.pad(grad_x, ((0, 0), (0, missing_h), (0, missing_w), (0, 0))),)


_overlapping_max_pool.defvjp(_overlapping_max_pool_fwd, _overlapping_max_pool_bwd)


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
  `jax.image.resize(..., 'bilinear')`, which uses the half-pixel convention (docs/method.md#model).
  """
  if x.ndim != 4:
    raise ValueError(f"upsample_align_corners expects [B, h, w, C], got shape {x.shape}")
  if factor < 1:
    raise ValueError(f"factor must be a positive integer, got {factor}")
  return _lerp_axis(_lerp_axis(x, 1, factor), 2, factor)
