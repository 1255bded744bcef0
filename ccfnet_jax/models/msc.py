"""CCF-Net's multi-scale context (MSC) module: multi-dilation, multi-stride pooling, fusion, output conv.

Reference key names (see `ccfnet_jax.convert`): `multi_dilation` = `stage1_headnet.feat.0`, `multi_stride` =
`feat.1`, `fusion` = `feat.2`, `out` = `stage1_headnet.out`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from ccfnet_jax.models import layers
from ccfnet_jax.models.layers import Dtype
from ccfnet_jax.models.resnet import Bottleneck

POOL_SIZES: tuple[int, ...] = (2, 4, 8)
"""Kernel = stride of the three max-pools of the multi-stride pooling; map sides must be multiples of the largest."""


class MultiDilation(nnx.Module):
  """Four shared convs with bias, no BN: `dilate1` (3x3, d 1), `dilate3` (3x3, d 3), `dilate5` (3x3, d 5), `pointwise`.

  `out = x + relu(d1(x)) + relu(pw(d3(x))) + relu(pw(d3(d1(x)))) + relu(pw(d5(d3(d1(x)))))`, `[B,h,w,C] -> [B,h,w,C]`;
  `d1(x)` and `d3(d1(x))` are computed once (the reference recomputes them; same outputs, fewer FLOPs).
  """

  def __init__(self, features: int = 256, *, rngs: nnx.Rngs, dtype: Dtype = jnp.float32):
    self.dilate1 = layers.conv(features, features, 3, dilation=1, use_bias=True, rngs=rngs, dtype=dtype)
    self.dilate3 = layers.conv(features, features, 3, dilation=3, use_bias=True, rngs=rngs, dtype=dtype)
    self.dilate5 = layers.conv(features, features, 3, dilation=5, use_bias=True, rngs=rngs, dtype=dtype)
    self.pointwise = layers.conv(features, features, 1, use_bias=True, rngs=rngs, dtype=dtype)

  def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
    d1 = self.dilate1(x)
    d3 = self.dilate3(x)
    d3_d1 = self.dilate3(d1)
    d5_d3_d1 = self.dilate5(d3_d1)
    relu, pw = jax.nn.relu, self.pointwise
    return x + relu(d1) + relu(pw(d3)) + relu(pw(d3_d1)) + relu(pw(d5_d3_d1))


class MultiStridePooling(nnx.Module):
  """For k in (2, 4, 8): k x k max-pool (stride k), a shared 1x1 conv C -> 1 (bias), align_corners upsampling by k.

  `[B, h, w, C] -> [B, h, w, 3 + C]`, channels `[l2, l4, l8, x]`; h and w must be multiples of 8.
  """

  def __init__(self, features: int = 256, *, rngs: nnx.Rngs, dtype: Dtype = jnp.float32):
    self.conv = layers.conv(features, 1, 1, use_bias=True, rngs=rngs, dtype=dtype)

  def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
    _, h, w, _ = x.shape
    k_max = max(POOL_SIZES)
    if h % k_max or w % k_max:
      raise ValueError(f"multi-stride pooling needs map sides that are multiples of {k_max}, got {h}x{w}")
    pooled = [layers.upsample_align_corners(self.conv(layers.max_pool(x, k, k)), k) for k in POOL_SIZES]
    return jnp.concatenate([*pooled, x], axis=-1)


class MSCModule(nnx.Module):
  """The MSC module at width C: multi-dilation, multi-stride pooling, fusion, and optionally a 1x1 output conv.

  `[B, h, w, C] -> [B, h, w, C]` (or `[B, h, w, out_features]` with an output conv), h and w multiples of 8.
  Fusion: a Bottleneck (C + 3) -> C / 4 -> C with a projection shortcut (C = 256: CCF-Net's 259 -> 64 -> 256).
  Output (`out_features` given): 1x1 conv C -> out_features with bias and no activation (CCF-Net's head). Without
  it, the module replaces a backbone stage (the baselines' "-MSC" variants).
  """

  def __init__(self, features: int = 256, out_features: int | None = None, *, rngs: nnx.Rngs,
               dtype: Dtype = jnp.float32):
    if features % Bottleneck.expansion:
      raise ValueError(f"MSC width must be a multiple of {Bottleneck.expansion}, got {features}")
    self.multi_dilation = MultiDilation(features, rngs=rngs, dtype=dtype)
    self.multi_stride = MultiStridePooling(features, rngs=rngs, dtype=dtype)
    self.fusion = Bottleneck(features + len(POOL_SIZES), features // Bottleneck.expansion, rngs=rngs, dtype=dtype)
    self.out = (layers.conv(features, out_features, 1, use_bias=True, rngs=rngs, dtype=dtype)
                if out_features is not None else None)

  def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
    y = self.fusion(self.multi_stride(self.multi_dilation(x)))
    return y if self.out is None else self.out(y)
