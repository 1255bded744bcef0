"""ResNet v1.5 backbone (torchvision layout) in Flax NNX, NHWC, with PyTorch padding (docs/method.md#model).

Submodule names mirror torchvision's (`conv1`, `bn1`, `layer1`..`layer4` lists of blocks; blocks with `conv1`, `bn1`,
..., `downsample` = [conv, bn]) so that `ccfnet_jax.convert` maps them to PyTorch keys with a short table.
`ResNet(depth, num_stages=3)` is CCF-Net's backbone (layer4 dropped, stride 16); `num_stages=4` is the full ResNet
(stride 32) used by the plain CCF-Net variant and by other heads (e.g. SimpleBaseline).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from ccfnet_jax.models import layers
from ccfnet_jax.models.layers import Dtype


class BasicBlock(nnx.Module):
  """Two 3x3 convs + BN (stride on the first), identity or projection shortcut, ReLU. `[B,H,W,in] -> [B,H/s,W/s,p]`."""

  expansion = 1

  def __init__(self, in_features: int, planes: int, stride: int = 1, *, rngs: nnx.Rngs,
               dtype: Dtype = jnp.float32):
    out_features = planes * self.expansion
    self.conv1 = layers.conv(in_features, planes, 3, stride=stride, rngs=rngs, dtype=dtype)
    self.bn1 = layers.batch_norm(planes, rngs=rngs, dtype=dtype)
    self.conv2 = layers.conv(planes, planes, 3, rngs=rngs, dtype=dtype)
    self.bn2 = layers.batch_norm(planes, rngs=rngs, dtype=dtype)
    self.downsample = _shortcut(in_features, out_features, stride, rngs=rngs, dtype=dtype)

  def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
    y = jax.nn.relu(self.bn1(self.conv1(x)))
    y = self.bn2(self.conv2(y))
    return jax.nn.relu(y + _apply_shortcut(self.downsample, x))


class Bottleneck(nnx.Module):
  """1x1 -> 3x3 (stride here: v1.5) -> 1x1 (x4 channels), each + BN, shortcut, ReLU. `[B,H,W,in] -> [B,H/s,W/s,4p]`."""

  expansion = 4

  def __init__(self, in_features: int, planes: int, stride: int = 1, *, rngs: nnx.Rngs,
               dtype: Dtype = jnp.float32):
    out_features = planes * self.expansion
    self.conv1 = layers.conv(in_features, planes, 1, rngs=rngs, dtype=dtype)
    self.bn1 = layers.batch_norm(planes, rngs=rngs, dtype=dtype)
    self.conv2 = layers.conv(planes, planes, 3, stride=stride, rngs=rngs, dtype=dtype)
    self.bn2 = layers.batch_norm(planes, rngs=rngs, dtype=dtype)
    self.conv3 = layers.conv(planes, out_features, 1, rngs=rngs, dtype=dtype)
    self.bn3 = layers.batch_norm(out_features, rngs=rngs, dtype=dtype)
    self.downsample = _shortcut(in_features, out_features, stride, rngs=rngs, dtype=dtype)

  def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
    y = jax.nn.relu(self.bn1(self.conv1(x)))
    y = jax.nn.relu(self.bn2(self.conv2(y)))
    y = self.bn3(self.conv3(y))
    return jax.nn.relu(y + _apply_shortcut(self.downsample, x))


def _shortcut(in_features: int, out_features: int, stride: int, *, rngs: nnx.Rngs,
              dtype: Dtype) -> nnx.List | None:
  """Projection shortcut [1x1 conv (stride, no bias), BN] when the shape changes, else None (identity)."""
  if stride == 1 and in_features == out_features:
    return None
  return nnx.List([layers.conv(in_features, out_features, 1, stride=stride, rngs=rngs, dtype=dtype),
                   layers.batch_norm(out_features, rngs=rngs, dtype=dtype)])


def _apply_shortcut(downsample: nnx.List | None, x: jnp.ndarray) -> jnp.ndarray:
  if downsample is None:
    return x
  conv, bn = downsample
  return bn(conv(x))


SPECS: dict[int, tuple[type[BasicBlock] | type[Bottleneck], tuple[int, int, int, int]]] = {
    18: (BasicBlock, (2, 2, 2, 2)),
    34: (BasicBlock, (3, 4, 6, 3)),
    50: (Bottleneck, (3, 4, 6, 3)),
}
"""depth -> (block type, blocks per stage) of torchvision's ResNets."""

STAGE_PLANES: tuple[int, ...] = (64, 128, 256, 512)


class ResNet(nnx.Module):
  """ResNet-`depth` trunk without the classifier: stem + `num_stages` stages; returns the last feature map.

  `__call__(x [B, H, W, 3]) -> [B, H / stride, W / stride, out_features]` with `stride = 2 ** (num_stages + 1)`
  (16 for 3 stages, 32 for 4) and `out_features` 256 / 512 (R18/34) or 1024 / 2048 (R50) for 3 / 4 stages.
  Stem: 7x7/2 conv pad 3 (no bias) + BN + ReLU + 3x3/2 max-pool pad 1; stage i > 1 starts with stride 2.
  """

  def __init__(self, depth: int = 18, num_stages: int = 4, *, rngs: nnx.Rngs, dtype: Dtype = jnp.float32):
    if depth not in SPECS:
      raise ValueError(f"ResNet depth must be one of {sorted(SPECS)}, got {depth}")
    if num_stages not in (1, 2, 3, 4):
      raise ValueError(f"num_stages must be 1..4, got {num_stages}")
    block, blocks_per_stage = SPECS[depth]
    self.depth = depth
    self.num_stages = num_stages
    self.stride = 2 ** (num_stages + 1)
    self.conv1 = layers.conv(3, 64, 7, stride=2, rngs=rngs, dtype=dtype)
    self.bn1 = layers.batch_norm(64, rngs=rngs, dtype=dtype)
    in_features = 64
    for stage in range(num_stages):
      planes = STAGE_PLANES[stage]
      blocks = []
      for i in range(blocks_per_stage[stage]):
        stride = 2 if (stage > 0 and i == 0) else 1
        blocks.append(block(in_features, planes, stride, rngs=rngs, dtype=dtype))
        in_features = planes * block.expansion
      setattr(self, f"layer{stage + 1}", nnx.List(blocks))
    self.out_features = in_features

  def stages(self) -> list[nnx.List]:
    """The stage block lists `[layer1, ..., layerN]`."""
    return [getattr(self, f"layer{i + 1}") for i in range(self.num_stages)]

  def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
    """`[B, H, W, 3] -> [B, H / stride, W / stride, out_features]`."""
    x = jax.nn.relu(self.bn1(self.conv1(x)))
    x = layers.max_pool(x, 3, 2, padding=1)
    for stage in self.stages():
      for block in stage:
        x = block(x)
    return x
