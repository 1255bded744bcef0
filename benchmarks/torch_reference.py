"""A PyTorch twin of the reference CCF-Net and its training step, for side-by-side speed and parity checks.

The architecture of docs/method.md#model in PyTorch (NCHW): a torchvision-style ResNet v1.5 (truncated after
layer3 with MSC), the 1x1 projection, the MSC head and the 44-channel output; or, without MSC, the full ResNet and a
1x1 output. Module names follow the reference's state dict (`conv1`, `layer1.0.bn2`, `layer_conv1x1`,
`stage1_headnet.feat.0.dilate2`, `final_layer`, ...), so `ccfnet_jax.convert.to_torch_state_dict` loads into it
with `load_state_dict(strict=True)`.

`repeat_convs=True` runs the multi-dilation block as the reference does (dilate1 three times, dilate2(dilate1(x))
twice); `False` computes each once, like `ccfnet_jax.models.msc.MultiDilation` (same outputs, fewer FLOPs).

The training step is the reference's: the loss of docs/method.md#losses as the reference codes it (every position
counts; the targets come from `ccfnet_jax.targets.encode`, computed by the data loader outside the step as the
reference does) with the BCE `pos_weight`, and AdamW (PyTorch's betas and eps; the config's learning rate and weight
decay, 3e-4 and 5e-4 by default), in float32 or under bfloat16 autocast, optionally channels-last. Runs on CPU or
CUDA.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ccfnet_jax import losses, maps, objects
from ccfnet_jax.models.ccfnet import MSC_FEATURES
from ccfnet_jax.models import layers
from ccfnet_jax.models.msc import POOL_SIZES
from ccfnet_jax.models.resnet import SPECS, STAGE_PLANES


def _conv(cin: int, cout: int, k: int, stride: int = 1, dilation: int = 1, bias: bool = False) -> nn.Conv2d:
  return nn.Conv2d(cin, cout, k, stride=stride, padding=dilation * (k - 1) // 2, dilation=dilation, bias=bias)


def _bn(c: int) -> nn.BatchNorm2d:
  # PyTorch's momentum weighs the new batch statistic, Flax's the old running one.
  return nn.BatchNorm2d(c, eps=layers.BN_EPSILON, momentum=round(1.0 - layers.BN_MOMENTUM, 6))


def _shortcut(cin: int, cout: int, stride: int) -> nn.Sequential | None:
  if stride == 1 and cin == cout:
    return None
  return nn.Sequential(_conv(cin, cout, 1, stride), _bn(cout))


class BasicBlock(nn.Module):
  expansion = 1

  def __init__(self, cin: int, planes: int, stride: int = 1):
    super().__init__()
    self.conv1, self.bn1 = _conv(cin, planes, 3, stride), _bn(planes)
    self.conv2, self.bn2 = _conv(planes, planes, 3), _bn(planes)
    self.downsample = _shortcut(cin, planes, stride)

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    y = F.relu(self.bn1(self.conv1(x)))
    y = self.bn2(self.conv2(y))
    return F.relu(y + (x if self.downsample is None else self.downsample(x)))


class Bottleneck(nn.Module):
  expansion = 4

  def __init__(self, cin: int, planes: int, stride: int = 1):
    super().__init__()
    cout = planes * self.expansion
    self.conv1, self.bn1 = _conv(cin, planes, 1), _bn(planes)
    self.conv2, self.bn2 = _conv(planes, planes, 3, stride), _bn(planes)  # v1.5: the stride on the 3x3
    self.conv3, self.bn3 = _conv(planes, cout, 1), _bn(cout)
    self.downsample = _shortcut(cin, cout, stride)

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    y = F.relu(self.bn1(self.conv1(x)))
    y = F.relu(self.bn2(self.conv2(y)))
    y = self.bn3(self.conv3(y))
    return F.relu(y + (x if self.downsample is None else self.downsample(x)))


class MultiDilation(nn.Module):
  """`x + relu(d1 x) + relu(pw d3 x) + relu(pw d3 d1 x) + relu(pw d5 d3 d1 x)`; names are the reference's indices."""

  def __init__(self, c: int, repeat_convs: bool):
    super().__init__()
    self.repeat_convs = repeat_convs
    self.dilate1 = _conv(c, c, 3, dilation=1, bias=True)
    self.dilate2 = _conv(c, c, 3, dilation=3, bias=True)
    self.dilate3 = _conv(c, c, 3, dilation=5, bias=True)
    self.conv1x1 = _conv(c, c, 1, bias=True)

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    d1, d3, d5, pw = self.dilate1, self.dilate2, self.dilate3, self.conv1x1
    if self.repeat_convs:
      return (x + F.relu(d1(x)) + F.relu(pw(d3(x))) + F.relu(pw(d3(d1(x))))
              + F.relu(pw(d5(d3(d1(x))))))
    a = d1(x)
    b = d3(a)
    return x + F.relu(a) + F.relu(pw(d3(x))) + F.relu(pw(b)) + F.relu(pw(d5(b)))


class MultiStride(nn.Module):
  """For each pool size k: k x k max-pool, a shared 1x1 conv to one channel, align-corners upsampling by k."""

  def __init__(self, c: int):
    super().__init__()
    self.conv = _conv(c, 1, 1, bias=True)

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    pooled = [F.interpolate(self.conv(F.max_pool2d(x, k, k)), scale_factor=k, mode="bilinear", align_corners=True)
              for k in POOL_SIZES]
    return torch.cat([*pooled, x], dim=1)


class MSCHead(nn.Module):
  def __init__(self, c: int, out_channels: int, repeat_convs: bool):
    super().__init__()
    self.feat = nn.Sequential(MultiDilation(c, repeat_convs), MultiStride(c), Bottleneck(c + len(POOL_SIZES), 64))
    self.out = _conv(64 * Bottleneck.expansion, out_channels, 1, bias=True)

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    return self.out(self.feat(x))


class CCFNet(nn.Module):
  """`forward(x [B, 3, H, W]) -> [B, 44, H / stride, W / stride]` (channel groups in `ccfnet_jax.maps` order)."""

  def __init__(self, depth: int = 18, msc: bool = True, repeat_convs: bool = True):
    super().__init__()
    block, counts = SPECS[depth]
    block = {"BasicBlock": BasicBlock, "Bottleneck": Bottleneck}[block.__name__]
    self.msc = msc
    num_stages = 3 if msc else 4
    self.stride = 2 ** (num_stages + 1)
    self.conv1, self.bn1 = _conv(3, 64, 7, 2), _bn(64)
    cin = 64
    for stage in range(num_stages):
      blocks = []
      for i in range(counts[stage]):
        blocks.append(block(cin, STAGE_PLANES[stage], 2 if stage > 0 and i == 0 else 1))
        cin = STAGE_PLANES[stage] * block.expansion
      setattr(self, f"layer{stage + 1}", nn.Sequential(*blocks))
    self.num_stages = num_stages
    if msc:
      self.layer_conv1x1 = _conv(cin, MSC_FEATURES, 1, bias=True)
      self.stage1_headnet = MSCHead(MSC_FEATURES, maps.NUM_CHANNELS, repeat_convs)
    else:
      self.final_layer = _conv(cin, maps.NUM_CHANNELS, 1, bias=True)
    for m in self.modules():
      if isinstance(m, nn.Conv2d):  # the reference's init (BatchNorm keeps PyTorch's gamma 1, beta 0)
        nn.init.normal_(m.weight, std=layers.CONV_INIT_STD)
        if m.bias is not None:
          nn.init.zeros_(m.bias)

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    x = F.max_pool2d(F.relu(self.bn1(self.conv1(x))), 3, 2, 1)
    for stage in range(self.num_stages):
      x = getattr(self, f"layer{stage + 1}")(x)
    if self.msc:
      return self.stage1_headnet(self.layer_conv1x1(x))
    return self.final_layer(x)


def split_maps(out: torch.Tensor) -> dict[str, torch.Tensor]:
  """`[B, 44, h, w]` -> {map name: `[B, 11, h, w]`} in `ccfnet_jax.maps.MAP_NAMES` order."""
  n = objects.NUM_OBJECTS
  return {name: out[:, i * n:(i + 1) * n] for i, name in enumerate(maps.MAP_NAMES)}


@dataclasses.dataclass
class Targets:
  """The targets of one batch in NCHW: maps `[B, 11, h, w]`, the offset mask, peak cells `[B, 11, 2]`, labels."""

  heatmap: torch.Tensor
  offset_y: torch.Tensor
  offset_x: torch.Tensor
  offset_mask: torch.Tensor  # float 0/1
  peak_cell: torch.Tensor  # int64 (row, col)
  disease: torch.Tensor  # float 0/1 [B, 11]


def targets_from(encoded: Any, disease: np.ndarray, device: str | torch.device = "cpu") -> Targets:
  """Our `ccfnet_jax.targets.Targets` (NHWC jax arrays) and the disease labels `[B, 11]` -> `Targets` on `device`."""
  def nchw(x: Any) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(np.moveaxis(np.asarray(x, np.float32), -1, 1))).to(device)
  return Targets(heatmap=nchw(encoded.maps.heatmap), offset_y=nchw(encoded.maps.offset_y),
                 offset_x=nchw(encoded.maps.offset_x), offset_mask=nchw(encoded.offset_mask),
                 peak_cell=torch.from_numpy(np.asarray(encoded.peak_cell, np.int64)).to(device),
                 disease=torch.from_numpy((np.asarray(disease) > 0).astype(np.float32)).to(device))


def reference_loss(out: torch.Tensor, t: Targets,
                   pos_weight: Sequence[float] = losses.REFERENCE_POS_WEIGHT) -> tuple[torch.Tensor, dict[str, Any]]:
  """The reference's loss on the float32 output `[B, 44, h, w]`: (total, unweighted parts), every point present.

  Heatmap MSE over every position; smooth-L1 offsets inside the mask, summed and divided by every position; BCE
  with `pos_weight` at each object's target peak cell, averaged per group (vertebrae, discs).
  """
  p = split_maps(out)
  positions = t.heatmap.numel()
  parts = {"heatmap": F.mse_loss(p["heatmap"], t.heatmap)}
  for name in ("offset_y", "offset_x"):
    per = F.smooth_l1_loss(p[name], getattr(t, name), reduction="none", beta=1.0)
    parts[name] = (per * t.offset_mask).sum() / positions
  b, k = t.peak_cell.shape[:2]
  w = p["logits"].shape[-1]
  flat = p["logits"].reshape(b, k, -1)
  index = (t.peak_cell[..., 0] * w + t.peak_cell[..., 1]).unsqueeze(-1)
  logit = torch.gather(flat, 2, index).squeeze(-1)  # [B, 11]
  for name, group, weight in (("bce_vertebra", objects.VERTEBRA_INDICES, pos_weight[0]),
                              ("bce_disc", objects.DISC_INDICES, pos_weight[1])):
    g = list(group)
    parts[name] = F.binary_cross_entropy_with_logits(
        logit[:, g], t.disease[:, g], pos_weight=torch.tensor(float(weight), device=logit.device))
  total = sum(losses.LOSS_WEIGHTS[name] * value for name, value in parts.items())
  return total, parts


@dataclasses.dataclass
class TrainStep:
  """One training step of the twin: `step()` -> the loss (a 0-d tensor) before the update.

  `dtype` "bfloat16" runs the model under `torch.autocast` (the loss in float32); `channels_last` keeps the model
  and the input in NHWC memory order.
  """

  model: CCFNet
  optimizer: torch.optim.Optimizer
  image: torch.Tensor
  targets: Targets
  dtype: str = "float32"
  pos_weight: Sequence[float] = losses.REFERENCE_POS_WEIGHT

  def __call__(self) -> torch.Tensor:
    self.optimizer.zero_grad(set_to_none=True)
    with torch.autocast(self.image.device.type, dtype=torch.bfloat16, enabled=self.dtype == "bfloat16"):
      out = self.model(self.image)
    loss, _ = reference_loss(out.float(), self.targets, self.pos_weight)
    loss.backward()
    self.optimizer.step()
    if self.image.is_cuda:
      torch.cuda.synchronize()  # so that a timed call ends when the step does
    return loss.detach()


def build_train_step(model: CCFNet, image_nhwc: np.ndarray, targets: Targets, *, learning_rate: float,
                     weight_decay: float, dtype: str = "float32", channels_last: bool = False,
                     device: str | torch.device = "cpu") -> TrainStep:
  """The twin's step on one batch: `model` in train mode on `device`, AdamW, `image_nhwc [B, S, S, 3]` in [0, 1]."""
  if dtype not in ("float32", "bfloat16"):
    raise ValueError(f"dtype {dtype!r}: expected 'float32' or 'bfloat16'")
  memory_format = torch.channels_last if channels_last else torch.contiguous_format
  model = model.to(device=device, memory_format=memory_format).train()
  image = torch.from_numpy(np.ascontiguousarray(np.moveaxis(np.asarray(image_nhwc, np.float32), -1, 1)))
  image = image.to(device).contiguous(memory_format=memory_format)
  optimizer = torch.optim.AdamW(model.parameters(), lr=learning_rate, weight_decay=weight_decay)
  return TrainStep(model=model, optimizer=optimizer, image=image, targets=targets, dtype=dtype)


def load_numpy_state_dict(model: nn.Module, state_dict: Mapping[str, np.ndarray]) -> None:
  """`model.load_state_dict(strict=True)` from numpy arrays (e.g. `ccfnet_jax.convert.to_torch_state_dict`)."""
  model.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in state_dict.items()}, strict=True)
