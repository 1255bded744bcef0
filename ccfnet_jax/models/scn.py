"""SCN, the Table 1 baseline cited as [3]: a heatmap network combined with a second, independent ResNet.

The paper gives no layers for SCN; its parameter and MAC counts (26.57 M / 42.73 G R18, 11.62 M / 45.43 G R18-MSC at
512 px) fix this construction (docs/method.md#baselines):
  - the local-appearance network: a SimpleBaseline on the same backbone (`SimpleBaseline`, stride-4 output);
  - the spatial-configuration branch: a second ResNet (stem..layer4, stride 32; with MSC stem..layer3 + the MSC
    module at the layer3 width, stride 16, no projection) and a 1x1 conv with bias to the same number of channels;
  - its output upsampled bilinearly (align_corners) to stride 4 and combined multiplicatively:
    `out = local * (1 + spatial)`. The spatial factor starts near 1 (its 1x1 conv is drawn from N(0, 0.001)), so
    the untrained SCN is its SimpleBaseline and both branches get gradients from the first step; a bare product
    of two near-zero outputs would start with near-zero gradients for both.
Upsampling, the product and the sum carry no parameters and count no MACs under the paper's counter, so the
counts are those of the two networks plus the 1x1 conv. With 22-channel heads (`out_channels=22`: heatmaps and
disease logits) they are 26,565,804 / 11,622,446 parameters, the printed digits; with the 44 channels of our maps
26,582,744 / 11,633,754.
"""

from __future__ import annotations

import jax.numpy as jnp
from flax import nnx

from ccfnet_jax import maps as maps_lib
from ccfnet_jax.models import heads, layers
from ccfnet_jax.models.layers import Dtype
from ccfnet_jax.models.msc import MSCModule
from ccfnet_jax.models.resnet import ResNet
from ccfnet_jax.models.simplebaseline import SimpleBaseline, check_input


class SCN(SimpleBaseline):
  """SCN on ResNet-`depth`. `__call__(x [B, H, W, 3] in [0, 1]) -> Maps`, each `[B, H/4, W/4, 11]` float32.

  `stride` is 4; input sides must be multiples of `input_multiple` (32 plain, 128 with MSC), as SimpleBaseline.
  Submodules: those of SimpleBaseline (`backbone`, `msc`, `deconv`, `out`: the local-appearance network), then
  `spatial_backbone` (ResNet, 4 stages plain, 3 with MSC), `spatial_msc` (MSCModule, MSC only) and `spatial_out`
  (1x1 conv with bias -> `out_channels`).
  """

  def __init__(self, depth: int = 18, msc: bool = False, *, out_channels: int = maps_lib.NUM_CHANNELS,
               rngs: nnx.Rngs, dtype: Dtype = jnp.float32):
    super().__init__(depth, msc, out_channels=out_channels, rngs=rngs, dtype=dtype)
    self.spatial_backbone = ResNet(depth, num_stages=3 if msc else 4, rngs=rngs, dtype=dtype)
    features = self.spatial_backbone.out_features
    self.spatial_msc = MSCModule(features, rngs=rngs, dtype=dtype) if msc else None
    self.spatial_out = layers.conv(features, out_channels, 1, use_bias=True, rngs=rngs, dtype=dtype)
    self.spatial_upsample = self.spatial_backbone.stride // self.stride

  def spatial_channels(self, x: jnp.ndarray) -> jnp.ndarray:
    """`x [B, H, W, 3]` (in `dtype`) -> the spatial-configuration maps upsampled to `[B, H/4, W/4, out_channels]`."""
    features = self.spatial_backbone(x)
    if self.spatial_msc is not None:
      features = self.spatial_msc(features)
    return layers.upsample_align_corners(self.spatial_out(features), self.spatial_upsample)

  def __call__(self, x: jnp.ndarray) -> maps_lib.Maps:
    """`x [B, H, W, 3]` in [0, 1] -> Maps (heatmap, offset_y, offset_x, logits), each `[B, H/4, W/4, 11]` float32."""
    check_input(x, self.input_multiple, f"SCN {self.label}")
    x = x.astype(self.dtype)
    out = self.channels(x) * (1 + self.spatial_channels(x))
    return heads.to_maps(out.astype(jnp.float32))
