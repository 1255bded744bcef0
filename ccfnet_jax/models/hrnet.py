"""HRNet (Sun, Xiao, Liu, Wang, CVPR 2019), the pose-estimation network, with CCF-Net's four output maps.

Layout of the pose HRNet-W`width` (W32: branches 32 / 64 / 128 / 256):
  - stem: two 3x3 stride-2 convs (3 -> 64 -> 64, no bias) each + BN + ReLU (stride 4);
  - stage 1: four ResNet Bottlenecks (64 -> 256), one branch at stride 4;
  - transitions: a 3x3 conv + BN + ReLU where a kept branch changes width, and a 3x3 stride-2 conv + BN + ReLU from
    the lowest-resolution branch for each new branch;
  - stages 2 / 3 / 4 (`STAGES`): 1 / 4 / 3 modules with 2 / 3 / 4 branches of four BasicBlocks each, then a
    multi-resolution fusion: output i sums every branch j brought to i's resolution and width (j > i: 1x1 conv + BN,
    nearest-neighbour upsampling by 2^(j-i); j < i: (i - j) 3x3 stride-2 convs + BN, ReLU between them; j = i:
    identity), then ReLU. The last module of stage 4 fuses into branch 0 only (its only output);
  - head: 1x1 conv with bias, `width` -> 44 channels (or 22: `models/heads.py`), on the stride-4 branch.
Parameters with 44 output channels: 28,537,004, with 22: 28,536,278 (paper Table 1: 28.54 M; the 17-joint pose
model: 28.5 M); the paper's 40.98 GMACs are those of the 22-channel head (44: 40.99).
All convs use PyTorch's symmetric padding and N(0, 0.001) init (`layers.conv`), BN as `layers.batch_norm`.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from ccfnet_jax import maps as maps_lib
from ccfnet_jax.models import heads, layers
from ccfnet_jax.models.layers import Dtype
from ccfnet_jax.models.resnet import BasicBlock, Bottleneck

STEM_FEATURES = 64
STAGE1_BLOCKS = 4
"""Bottlenecks of stage 1 (planes 64 -> 256 channels)."""


@dataclasses.dataclass(frozen=True)
class StageSpec:
  """One multi-resolution stage: `num_modules` modules of `num_branches` branches, `num_blocks` BasicBlocks each;
  branch b has `width * 2**b` channels."""

  num_modules: int
  num_branches: int
  num_blocks: int = 4


STAGES: tuple[StageSpec, ...] = (
    StageSpec(num_modules=1, num_branches=2),  # stage 2
    StageSpec(num_modules=4, num_branches=3),  # stage 3
    StageSpec(num_modules=3, num_branches=4),  # stage 4
)
"""Stages 2..4 of the pose HRNet (stage 1 is the Bottleneck stage)."""

WIDTHS: tuple[int, ...] = (18, 32, 48)
"""Widths W of the published HRNets (Table 1 uses W32)."""


class ConvBN(nnx.Module):
  """k x k conv (no bias, PyTorch padding) + BN, optionally + ReLU. `[B, h, w, in] -> [B, h/s, w/s, out]`."""

  def __init__(self, in_features: int, out_features: int, kernel_size: int, *, stride: int = 1, relu: bool,
               rngs: nnx.Rngs, dtype: Dtype = jnp.float32):
    self.conv = layers.conv(in_features, out_features, kernel_size, stride=stride, rngs=rngs, dtype=dtype)
    self.bn = layers.batch_norm(out_features, rngs=rngs, dtype=dtype)
    self.relu = relu

  def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
    y = self.bn(self.conv(x))
    return jax.nn.relu(y) if self.relu else y


def upsample_nearest(x: jnp.ndarray, factor: int) -> jnp.ndarray:
  """Nearest-neighbour upsampling by an integer factor, `[B, h, w, C] -> [B, h*f, w*f, C]` (each pixel repeated)."""
  return jnp.repeat(jnp.repeat(x, factor, axis=1), factor, axis=2)


class FuseInput(nnx.Module):
  """Brings branch j (`in_features`) to branch i's resolution and width (`out_features`); see the module docstring."""

  def __init__(self, j: int, i: int, in_features: int, out_features: int, *, rngs: nnx.Rngs,
               dtype: Dtype = jnp.float32):
    self.upsample = 2 ** (j - i) if j > i else 1
    if j > i:
      self.layers = nnx.List([ConvBN(in_features, out_features, 1, relu=False, rngs=rngs, dtype=dtype)])
    else:  # j < i: i - j stride-2 3x3 convs; the last changes the width and has no ReLU.
      steps = i - j
      self.layers = nnx.List([
          ConvBN(in_features, out_features if k == steps - 1 else in_features, 3, stride=2, relu=k < steps - 1,
                 rngs=rngs, dtype=dtype) for k in range(steps)])

  def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
    for layer in self.layers:
      x = layer(x)
    return upsample_nearest(x, self.upsample) if self.upsample > 1 else x


class HighResolutionModule(nnx.Module):
  """Parallel branches of BasicBlocks then multi-resolution fusion.

  `__call__(xs)`: list of `num_branches` maps `[B, h / 2**b, w / 2**b, features[b]]` -> list of `num_outputs` maps
  of the same shapes (the first `num_outputs` branches).
  """

  def __init__(self, features: tuple[int, ...], num_blocks: int, num_outputs: int, *, rngs: nnx.Rngs,
               dtype: Dtype = jnp.float32):
    self.branches = nnx.List([
        nnx.List([BasicBlock(c, c, rngs=rngs, dtype=dtype) for _ in range(num_blocks)]) for c in features])
    n = len(features)
    # fuse[i][j]: None for j == i (identity), else FuseInput; only when there is more than one branch.
    self.fuse = nnx.List([
        nnx.List([None if j == i else FuseInput(j, i, features[j], features[i], rngs=rngs, dtype=dtype)
                  for j in range(n)]) for i in range(num_outputs)]) if n > 1 else None

  def __call__(self, xs: list[jnp.ndarray]) -> list[jnp.ndarray]:
    ys = []
    for branch, x in zip(self.branches, xs):
      for block in branch:
        x = block(x)
      ys.append(x)
    if self.fuse is None:
      return ys
    out = []
    for i, row in enumerate(self.fuse):
      total = ys[i]
      for j, layer in enumerate(row):
        if layer is not None:
          total = total + layer(ys[j])
      out.append(jax.nn.relu(total))
    return out


class Transition(nnx.Module):
  """From the branches of one stage (`in_features`) to those of the next (`out_features`, one more branch).

  Kept branch b: identity when its width is unchanged, else 3x3 conv + BN + ReLU. New branch: 3x3 stride-2 convs +
  BN + ReLU from the lowest-resolution input branch (the last one changes the width).
  """

  def __init__(self, in_features: tuple[int, ...], out_features: tuple[int, ...], *, rngs: nnx.Rngs,
               dtype: Dtype = jnp.float32):
    if len(out_features) <= len(in_features):
      raise ValueError(f"a transition adds branches: {in_features} -> {out_features}")
    layers_ = []
    for b, c_out in enumerate(out_features):
      if b < len(in_features):
        c_in = in_features[b]
        layers_.append(None if c_in == c_out else
                       nnx.List([ConvBN(c_in, c_out, 3, relu=True, rngs=rngs, dtype=dtype)]))
      else:
        steps = b + 1 - len(in_features)
        c_in = in_features[-1]
        layers_.append(nnx.List([
            ConvBN(c_in, c_out if k == steps - 1 else c_in, 3, stride=2, relu=True, rngs=rngs, dtype=dtype)
            for k in range(steps)]))
    self.layers = nnx.List(layers_)
    self.num_inputs = len(in_features)

  def __call__(self, xs: list[jnp.ndarray]) -> list[jnp.ndarray]:
    out = []
    for b, layer in enumerate(self.layers):
      x = xs[min(b, self.num_inputs - 1)]
      if layer is not None:
        for conv_bn in layer:
          x = conv_bn(x)
      out.append(x)
    return out


class HRNet(nnx.Module):
  """Pose HRNet-W`width`. `__call__(x [B, H, W, 3] in [0, 1]) -> Maps`, each `[B, H/4, W/4, 11]` float32.

  `stride` is 4; input sides must be multiples of 32 (`input_multiple`: the lowest branch runs at stride 32).
  Submodules: `stem` (two ConvBN), `layer1` (Bottlenecks), `transitions` / `stages` (lists, stages 2..4, each a list
  of HighResolutionModule), `out` (1x1 conv with bias -> `out_channels`, 44 or 22).
  """

  def __init__(self, width: int = 32, *, out_channels: int = maps_lib.NUM_CHANNELS, rngs: nnx.Rngs,
               dtype: Dtype = jnp.float32):
    if width not in WIDTHS:
      raise ValueError(f"HRNet width must be one of {WIDTHS}, got {width}")
    self.width = width
    self.out_channels = heads.check_out_channels(out_channels, "HRNet")
    self.dtype = dtype
    self.stem = nnx.List([ConvBN(3, STEM_FEATURES, 3, stride=2, relu=True, rngs=rngs, dtype=dtype),
                          ConvBN(STEM_FEATURES, STEM_FEATURES, 3, stride=2, relu=True, rngs=rngs, dtype=dtype)])
    blocks, c = [], STEM_FEATURES
    for _ in range(STAGE1_BLOCKS):
      blocks.append(Bottleneck(c, STEM_FEATURES, rngs=rngs, dtype=dtype))
      c = STEM_FEATURES * Bottleneck.expansion
    self.layer1 = nnx.List(blocks)
    features: tuple[int, ...] = (c,)
    transitions, stages = [], []
    for s, spec in enumerate(STAGES):
      new_features = tuple(width * 2 ** b for b in range(spec.num_branches))
      transitions.append(Transition(features, new_features, rngs=rngs, dtype=dtype))
      features = new_features
      last_stage = s == len(STAGES) - 1
      stages.append(nnx.List([
          HighResolutionModule(features, spec.num_blocks,
                               1 if (last_stage and m == spec.num_modules - 1) else spec.num_branches,
                               rngs=rngs, dtype=dtype)
          for m in range(spec.num_modules)]))
    self.transitions = nnx.List(transitions)
    self.stages = nnx.List(stages)
    self.out = layers.conv(width, out_channels, 1, use_bias=True, rngs=rngs, dtype=dtype)
    self.stride = 4
    self.input_multiple = self.stride * 2 ** (STAGES[-1].num_branches - 1)

  def __call__(self, x: jnp.ndarray) -> maps_lib.Maps:
    """`x [B, H, W, 3]` in [0, 1] -> Maps (heatmap, offset_y, offset_x, logits), each `[B, H/4, W/4, 11]` float32."""
    m = self.input_multiple
    if x.ndim != 4 or x.shape[-1] != 3:
      raise ValueError(f"HRNet expects NHWC input [B, H, W, 3], got shape {x.shape}")
    if x.shape[1] <= 0 or x.shape[2] <= 0 or x.shape[1] % m or x.shape[2] % m:
      raise ValueError(f"HRNet needs input sides that are multiples of {m}, got {x.shape[1]}x{x.shape[2]}")
    x = x.astype(self.dtype)
    for layer in self.stem:
      x = layer(x)
    for block in self.layer1:
      x = block(x)
    xs = [x]
    for transition, modules in zip(self.transitions, self.stages):
      xs = transition(xs)
      for module in modules:
        xs = module(xs)
    return heads.to_maps(self.out(xs[0]).astype(jnp.float32))


def create_hrnet(depth: int = 32, msc: bool = False, *, out_channels: int = maps_lib.NUM_CHANNELS, rngs: nnx.Rngs,
                 dtype: Dtype = jnp.float32) -> HRNet:
  """The registry's constructor (`create_model("hrnet", depth=32, msc=False)`): HRNet-W`depth`.

  The registry passes every model a backbone `depth`; Table 1 names HRNet's backbone by its width ("W32"), so for
  HRNet `depth` is the width W (one of `WIDTHS`). HRNet has no MSC variant: `msc=True` raises ValueError.
  """
  if msc:
    raise ValueError("HRNet has no MSC variant: use msc=False (config.model.msc = False)")
  if depth not in WIDTHS:
    raise ValueError(f"for HRNet, depth is the width W: one of {WIDTHS} (config.model.depth = 32 for W32), "
                     f"got {depth}")
  return HRNet(depth, out_channels=out_channels, rngs=rngs, dtype=dtype)
