"""CCF-Net (docs/method.md#model): ResNet backbone + (projection + MSC head | plain 1x1 output) -> four `Maps`.

With MSC (the paper's model): ResNet stem + layer1..3 (stride 16), 1x1 projection C3 -> 256 (bias, no BN/ReLU),
MSC head -> 44 channels. Plain variant: the full ResNet (layer4, stride 32) + 1x1 conv with bias -> 44 channels.
"""

from __future__ import annotations

import jax.numpy as jnp
from flax import nnx

from ccfnet_jax import maps as maps_lib
from ccfnet_jax.models import layers
from ccfnet_jax.models.layers import Dtype
from ccfnet_jax.models.msc import POOL_SIZES, MSCModule
from ccfnet_jax.models.resnet import ResNet

MSC_FEATURES = 256
"""Channels of the projection and of the MSC head."""


class CCFNet(nnx.Module):
  """CCF-Net in Flax NNX. `__call__(x [B, H, W, 3] float in [0, 1]) -> Maps`, each `[B, H / S, W / S, 11]` float32.

  `S = model.stride` is 16 with MSC (input sides multiples of 128) and 32 without (multiples of 32).
  `dtype=jnp.bfloat16` computes in bf16 with float32 parameters; the maps are returned in float32 either way.
  `model.train()` / `model.eval()` switch BatchNorm between batch and running statistics.

  Submodules: `backbone` (ResNet), and with MSC `projection` + `head` (MSCModule with its output conv), else `out`.
  """

  def __init__(self, depth: int = 18, msc: bool = True, *, rngs: nnx.Rngs, dtype: Dtype = jnp.float32):
    self.depth = depth
    self.msc = msc
    self.dtype = dtype
    self.backbone = ResNet(depth, num_stages=3 if msc else 4, rngs=rngs, dtype=dtype)
    self.stride = self.backbone.stride
    if msc:
      self.projection = layers.conv(self.backbone.out_features, MSC_FEATURES, 1, use_bias=True, rngs=rngs, dtype=dtype)
      self.head = MSCModule(MSC_FEATURES, maps_lib.NUM_CHANNELS, rngs=rngs, dtype=dtype)
    else:
      self.out = layers.conv(self.backbone.out_features, maps_lib.NUM_CHANNELS, 1, use_bias=True, rngs=rngs,
                             dtype=dtype)

  @property
  def input_multiple(self) -> int:
    """Input sides must be multiples of this: 128 with MSC (map sides multiples of 8), else the stride (32)."""
    return self.stride * max(POOL_SIZES) if self.msc else self.stride

  def check_input(self, x: jnp.ndarray) -> None:
    """Raises ValueError unless `x` is `[B, H, W, 3]` with H and W positive multiples of `input_multiple`."""
    m = self.input_multiple
    if x.ndim != 4 or x.shape[-1] != 3:
      raise ValueError(f"CCFNet expects NHWC input [B, H, W, 3], got shape {x.shape}")
    h, w = x.shape[1:3]
    if h <= 0 or w <= 0 or h % m or w % m:
      variant = "with MSC" if self.msc else "without MSC"
      raise ValueError(f"CCFNet {variant} needs input sides that are multiples of {m}, got {h}x{w}")

  def __call__(self, x: jnp.ndarray) -> maps_lib.Maps:
    """`x [B, H, W, 3]` in [0, 1] -> Maps (heatmap, offset_y, offset_x, logits), each `[B, H/S, W/S, 11]` float32."""
    self.check_input(x)
    x = x.astype(self.dtype)
    features = self.backbone(x)
    if self.msc:
      channels = self.head(self.projection(features))
    else:
      channels = self.out(features)
    return maps_lib.from_channels(channels.astype(jnp.float32))
