"""SimpleBaseline (Xiao, Wu, Wei, ECCV 2018) with CCF-Net's four output maps, and its -MSC variant (paper Table 1).

Plain (`msc=False`): the full ResNet (stem + layer1..4, stride 32) + three deconvolution layers (4x4 transposed
conv, stride 2, 256 channels, no bias, BN, ReLU; each doubles the map side) + a 1x1 conv with bias to 44 channels
(or 22, `models/heads.py`): stride-4 Maps. Parameters: R18 15,383,660 and R50 34,006,636 (22 channels: 15,378,006
and 34,000,982; paper: 15.38 M / 34.00 M).

`-MSC` (`msc=True`): "replace the backbone's last stage with the MSC module". The interpretation whose parameter
count matches the paper (6.86 M R18-MSC, 45.33 M R50-MSC) and its MACs (33.50 G / 124.80 G, the reference's MSC
recomputing its repeated convs) is:
  - stem + layer1..3 (stride 16, C3 = 256 for R18, 1024 for R50), no projection;
  - the MSC module at the backbone's own width C3 in place of layer4: multi-dilation (four shared C3 -> C3 convs),
    multi-stride pooling (-> C3 + 3 channels), fusion Bottleneck (C3 + 3) -> C3 / 4 -> C3 with projection shortcut
    (for R18 exactly CCF-Net's 259 -> 64 -> 256 fusion);
  - two deconvolution layers (C3 -> 256 -> 256; stride 16 -> 4, so the output stride stays 4) + the 1x1 output conv.
This gives R18-MSC 6,865,965 and R50-MSC 45,335,405; with 22 output channels 6,860,311 and 45,329,751 (paper
6.86 M / 45.33 M), and the paper's MACs to every printed digit (`models/complexity.py`). The
alternatives are far off: CCF-Net's 1x1 projection to 256 channels before the MSC gives 12.89 M for R50 (and
6.93 M for R18); keeping three deconvolutions after the stride-16 MSC (stride-2 output) gives 7.98 M for R18.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from ccfnet_jax import maps as maps_lib
from ccfnet_jax.models import heads, layers
from ccfnet_jax.models.layers import Dtype
from ccfnet_jax.models.msc import POOL_SIZES, MSCModule
from ccfnet_jax.models.resnet import ResNet

DECONV_FEATURES = 256
"""Channels of every deconvolution layer (Xiao et al.)."""
DECONV_KERNEL = 4
"""Kernel side of the deconvolutions; with stride 2, padding 1 and output padding 0 each doubles the map side."""


def conv_transpose_padding(kernel_size: int, stride: int, padding: int, output_padding: int = 0
                           ) -> tuple[int, int]:
  """Padding (low, high) of the equivalent stride-1 conv over the stride-dilated input, PyTorch's geometry.

  `nn.ConvTranspose2d(k, s, p, output_padding=op)` maps n input samples to `(n - 1) * s - 2p + k + op` outputs: the
  dilated input (`(n - 1) * s + 1` samples) padded with `k - 1 - p` low and `k - 1 - p + op` high, convolved with
  the spatially flipped kernel. k=4, s=2, p=1: (2, 2) and `2n` outputs.
  """
  low = kernel_size - 1 - padding
  if low < 0 or output_padding < 0 or output_padding >= stride:
    raise ValueError(f"unsupported transposed conv geometry: kernel {kernel_size}, stride {stride}, padding "
                     f"{padding}, output_padding {output_padding}")
  return low, low + output_padding


class ConvTranspose(nnx.Module):
  """`nn.ConvTranspose2d(in, out, k, stride, padding, output_padding, bias=use_bias)` in NHWC.

  `[B, h, w, in] -> [B, (h - 1) * s - 2p + k + op, (w - 1) * s - 2p + k + op, out]`. Kernel `[k, k, in, out]`: input
  pixel (i, j) adds `x[i, j, c] * kernel[ky, kx, c, o]` to output pixel `(i * s - p + ky, j * s - p + kx)` (the
  scatter definition; PyTorch's weight `[in, out, ky, kx]` transposed). Init N(0, 0.001), bias zeros.
  """

  def __init__(self, in_features: int, out_features: int, kernel_size: int = DECONV_KERNEL, *, stride: int = 2,
               padding: int = 1, output_padding: int = 0, use_bias: bool = False, rngs: nnx.Rngs,
               dtype: Dtype = jnp.float32):
    self.stride = stride
    self.pad = conv_transpose_padding(kernel_size, stride, padding, output_padding)
    self.dtype = dtype
    init = nnx.initializers.normal(stddev=layers.CONV_INIT_STD)
    self.kernel = nnx.Param(init(rngs.params(), (kernel_size, kernel_size, in_features, out_features), jnp.float32))
    self.bias = nnx.Param(jnp.zeros((out_features,), jnp.float32)) if use_bias else None

  def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
    kernel = jnp.flip(self.kernel[...], axis=(0, 1)).astype(self.dtype)
    y = jax.lax.conv_general_dilated(
        x.astype(self.dtype), kernel, window_strides=(1, 1), padding=(self.pad, self.pad),
        lhs_dilation=(self.stride, self.stride), dimension_numbers=("NHWC", "HWIO", "NHWC"))
    if self.bias is not None:
      y = y + self.bias[...].astype(self.dtype)
    return y


class Deconv(nnx.Module):
  """Deconvolution layer: 4x4 transposed conv (stride 2, pad 1, no bias) + BN + ReLU. `[B,h,w,in] -> [B,2h,2w,out]`."""

  def __init__(self, in_features: int, out_features: int = DECONV_FEATURES, *, rngs: nnx.Rngs,
               dtype: Dtype = jnp.float32):
    self.conv = ConvTranspose(in_features, out_features, DECONV_KERNEL, stride=2, padding=1, rngs=rngs, dtype=dtype)
    self.bn = layers.batch_norm(out_features, rngs=rngs, dtype=dtype)

  def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
    return jax.nn.relu(self.bn(self.conv(x)))


class SimpleBaseline(nnx.Module):
  """SimpleBaseline on ResNet-`depth`. `__call__(x [B, H, W, 3] in [0, 1]) -> Maps`, each `[B, H/4, W/4, 11]` float32.

  `stride` is 4 in both variants. Input sides must be multiples of `input_multiple` (32 plain, 128 with MSC).
  `out_channels` 44 (default: the four maps) or 22 (heatmaps and disease logits, zero offsets; the width the paper's
  counts imply, see `models/heads.py`). Submodules: `backbone` (ResNet, 4 stages plain, 3 with MSC), `msc`
  (MSCModule, MSC only), `deconv` (list of Deconv: 3 plain, 2 with MSC), `out` (1x1 conv with bias).
  """

  def __init__(self, depth: int = 18, msc: bool = False, *, out_channels: int = maps_lib.NUM_CHANNELS,
               rngs: nnx.Rngs, dtype: Dtype = jnp.float32):
    self.depth = depth
    self.use_msc = msc
    self.dtype = dtype
    self.out_channels = heads.check_out_channels(out_channels, "SimpleBaseline")
    self.backbone = ResNet(depth, num_stages=3 if msc else 4, rngs=rngs, dtype=dtype)
    features = self.backbone.out_features
    self.msc = MSCModule(features, rngs=rngs, dtype=dtype) if msc else None
    num_deconv = 2 if msc else 3
    deconv = []
    for _ in range(num_deconv):
      deconv.append(Deconv(features, DECONV_FEATURES, rngs=rngs, dtype=dtype))
      features = DECONV_FEATURES
    self.deconv = nnx.List(deconv)
    self.out = layers.conv(DECONV_FEATURES, out_channels, 1, use_bias=True, rngs=rngs, dtype=dtype)
    self.stride = self.backbone.stride // 2 ** num_deconv

  @property
  def input_multiple(self) -> int:
    """Input sides must be multiples of this: the backbone stride, times 8 with MSC (its pooling needs /8 maps)."""
    return self.backbone.stride * (max(POOL_SIZES) if self.use_msc else 1)

  @property
  def label(self) -> str:
    return f"R{self.depth}{'-MSC' if self.use_msc else ''}"

  def channels(self, x: jnp.ndarray) -> jnp.ndarray:
    """`x [B, H, W, 3]` (already in `dtype`) -> the output conv's `[B, H/4, W/4, out_channels]` in `dtype`."""
    features = self.backbone(x)
    if self.msc is not None:
      features = self.msc(features)
    for layer in self.deconv:
      features = layer(features)
    return self.out(features)

  def __call__(self, x: jnp.ndarray) -> maps_lib.Maps:
    """`x [B, H, W, 3]` in [0, 1] -> Maps (heatmap, offset_y, offset_x, logits), each `[B, H/4, W/4, 11]` float32."""
    check_input(x, self.input_multiple, f"SimpleBaseline {self.label}")
    return heads.to_maps(self.channels(x.astype(self.dtype)).astype(jnp.float32))


def check_input(x: jnp.ndarray, multiple: int, what: str) -> None:
  """Raises ValueError naming `what` unless `x` is `[B, H, W, 3]` with H and W positive multiples of `multiple`."""
  if x.ndim != 4 or x.shape[-1] != 3:
    raise ValueError(f"{what} expects NHWC input [B, H, W, 3], got shape {x.shape}")
  h, w = x.shape[1:3]
  if h <= 0 or w <= 0 or h % multiple or w % multiple:
    raise ValueError(f"{what} needs input sides that are multiples of {multiple}, got {h}x{w}")
