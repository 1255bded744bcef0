"""Parameter and MAC counting (`ccfnet_jax.models.complexity`) and the Table 1 command (`ccfnet_jax.table`)."""

from __future__ import annotations

import pathlib
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from ccfnet_jax.models import complexity, create_model
from ccfnet_jax.models.complexity import count_params, paper_macs

REPO = pathlib.Path(__file__).resolve().parents[1]

# --- MACs by hand under the paper's counter: conv `out elements x (C_in k^2 + bias)`, BN `2 x elements`, bilinear
# upsampling module 11 per output element, everything else 0. Sides are map sides at each layer's output. ---


def _conv(side: int, k: int, cin: int, cout: int, bias: bool = False) -> int:
  return side * side * cout * (k * k * cin + (1 if bias else 0))


def _bn(side: int, c: int) -> int:
  return 2 * side * side * c


def _basic(side: int, cin: int, planes: int, stride: int) -> int:
  s = side // stride
  n = _conv(s, 3, cin, planes) + _bn(s, planes) + _conv(s, 3, planes, planes) + _bn(s, planes)
  return n + (_conv(s, 1, cin, planes) + _bn(s, planes) if stride != 1 or cin != planes else 0)


def _bottleneck(side: int, cin: int, planes: int) -> int:  # stride 1 (the MSC fusion block)
  out = 4 * planes
  n = _conv(side, 1, cin, planes) + _bn(side, planes) + _conv(side, 3, planes, planes) + _bn(side, planes)
  n += _conv(side, 1, planes, out) + _bn(side, out)
  return n + (_conv(side, 1, cin, out) + _bn(side, out) if cin != out else 0)


def _resnet18(size: int, stages: int) -> tuple[int, int, int]:
  """(MACs, output side, output channels) of ResNet18's stem + `stages` stages on a size x size image."""
  n = _conv(size // 2, 7, 3, 64) + _bn(size // 2, 64)
  side, cin = size // 4, 64  # after the 3x3/2 max-pool
  for s in range(stages):
    planes = 64 * 2 ** s
    for i in range(2):
      stride = 2 if s > 0 and i == 0 else 1
      n += _basic(side, cin, planes, stride)
      side, cin = side // stride, planes
  return n, side, cin


def _msc(side: int, c: int, repeats: bool) -> int:
  """MSC module at width c: 3x3 convs d1, d3, d5 (d1 once, d3 twice; the reference: three times each) and three
  pointwise calls, all with bias; three 1x1 c -> 1 convs on the pooled maps, their upsampling; the fusion block."""
  n = (4 + (3 if repeats else 0)) * _conv(side, 3, c, c, True) + 3 * _conv(side, 1, c, c, True)
  n += sum(_conv(side // k, 1, c, 1, True) for k in (2, 4, 8)) + 11 * 3 * side * side
  return n + _bottleneck(side, c + 3, c // 4)


def _trunk(size: int, msc: bool, repeats: bool) -> tuple[int, int, int]:
  n, side, c = _resnet18(size, 3 if msc else 4)
  return (n + (_msc(side, c, repeats) if msc else 0)), side, c


def _simplebaseline(size: int, msc: bool, channels: int, repeats: bool = False) -> int:
  n, side, c = _trunk(size, msc, repeats)
  for _ in range(2 if msc else 3):  # 4x4 transposed convs to 256 channels, doubling the side, + BN
    side *= 2
    n += _conv(side, 4, c, 256) + _bn(side, 256)
    c = 256
  return n + _conv(side, 1, 256, channels, True)


def _scn(size: int, msc: bool, channels: int, repeats: bool = False) -> int:
  n, side, c = _trunk(size, msc, repeats)
  return _simplebaseline(size, msc, channels, repeats) + n + _conv(side, 1, c, channels, True)


def _ccfnet_msc(size: int, repeats: bool) -> int:
  n, side, c = _resnet18(size, 3)
  return n + _conv(side, 1, c, 256, True) + _msc(side, 256, repeats) + _conv(side, 1, 256, 44, True)


def _abstract(name: str, msc: bool, **kwargs) -> nnx.Module:
  return nnx.eval_shape(lambda: create_model(name, depth=18, msc=msc, rngs=nnx.Rngs(0), **kwargs))


def test_hand_counts_give_the_printed_gmacs_with_22_channel_heads():
  # The paper's Table 1 GMACs at 512 px (two decimals), and the full figures of the same rules' arithmetic for the
  # SCN construction (SimpleBaseline-R18 33,226,850,304 + second ResNet18 9,500,884,992 + head 2,889,216).
  assert round(_simplebaseline(512, False, 22) / 1e9, 2) == 33.23
  assert round(_simplebaseline(512, True, 22, repeats=True) / 1e9, 2) == 33.50
  assert round(_ccfnet_msc(512, repeats=True) / 1e9, 2) == 12.00
  assert _scn(512, False, 22) == 42_730_624_512
  assert _scn(512, True, 22, repeats=True) == 45_433_193_120
  assert _simplebaseline(512, False, 22) == 33_226_850_304
  # With 44 channels every one of these baselines prints higher.
  assert [round(f / 1e9, 2) for f in (_simplebaseline(512, False, 44), _scn(512, False, 44),
                                      _scn(512, True, 44, repeats=True))] == [33.32, 42.83, 45.53]


@pytest.mark.parametrize("name,msc,channels", [("scn", False, 22), ("scn", True, 22), ("scn", True, 44),
                                               ("simplebaseline", True, 44)])
def test_paper_macs_equal_hand_counts(name, msc, channels):
  model = _abstract(name, msc, out_channels=channels)
  hand = {"scn": _scn, "simplebaseline": _simplebaseline}[name]
  for size in (128, 512):
    assert paper_macs(model, size) == hand(size, msc, channels)
    assert paper_macs(model, size, reference_repeats=True) == hand(size, msc, channels, repeats=True)


def test_paper_macs_of_ccfnet_and_batch_scaling():
  model = _abstract("ccfnet", True)
  assert paper_macs(model, 512, reference_repeats=True) == _ccfnet_msc(512, repeats=True)
  assert paper_macs(model, 256, batch_size=3) == 3 * _ccfnet_msc(256, repeats=False)


def test_paper_macs_leaves_the_layer_classes_as_they_were():
  calls = {cls: cls.__dict__.get("__call__") for cls in (nnx.Conv, nnx.BatchNorm, nnx.Linear)}
  paper_macs(_abstract("ccfnet", False), 128)
  assert {cls: cls.__dict__.get("__call__") for cls in calls} == calls


def test_paper_macs_counts_linear_layers_and_refuses_unknown_layers():
  class Head(nnx.Module):
    def __init__(self):
      self.conv = nnx.Conv(3, 8, (3, 3), padding="SAME", rngs=nnx.Rngs(0))
      self.fc = nnx.Linear(8, 5, rngs=nnx.Rngs(0))

    def __call__(self, x):
      return self.fc(self.conv(x).mean(axis=(1, 2)))

  # conv: 16 x 16 x 8 outputs x (27 + 1); linear: 5 outputs x 8 inputs (the 2020 counter ignores its bias).
  assert paper_macs(Head(), 16) == 16 * 16 * 8 * 28 + 5 * 8

  class Odd(nnx.Module):
    def __init__(self):
      self.w = nnx.Param(jnp.ones((3,)))

    def __call__(self, x):
      return x * self.w[...]

  with pytest.raises(ValueError, match="no counting rule for Odd"):
    paper_macs(Odd(), 8)


def test_count_params_of_a_model_and_of_a_tree():
  model = _abstract("ccfnet", False)
  params, stats = nnx.state(model, nnx.Param, nnx.BatchStat)
  n = count_params(model)
  assert n == 11_199_084  # ResNet18 without fc (11,689,512 - 513,000) + 1x1 conv 512 -> 44 with bias
  assert count_params(params) == n  # a training state's params tree
  assert count_params(stats) == 2 * 4_800  # running mean and var of the 4,800 BatchNorm channels of ResNet18
  assert count_params({"a": np.zeros((2, 3)), "b": [jnp.zeros(4)]}) == 10
  conv = nnx.Conv(3, 8, (3, 3), rngs=nnx.Rngs(0))
  assert count_params(conv) == count_params(nnx.state(conv)) == 3 * 3 * 3 * 8 + 8


def test_table_renders_rows_beside_the_paper():
  row = next(r for r in complexity.ROWS if (r.method, r.backbone) == ("SCN", "R18-MSC"))
  text = complexity.table([row], image_size=128)
  line = next(ln for ln in text.splitlines() if ln.startswith("| SCN | R18-MSC |"))
  cells = [c.strip() for c in line.strip("|").split("|")]
  assert cells[2] == "4"  # stride
  assert cells[3] == "11,633,754" and cells[5] == "11,622,446"  # 44-channel model; the 22-channel one counted
  assert cells[7:9] == ["11.62", "45.43"]
  assert float(cells[4]) == pytest.approx(_scn(128, True, 44) / 1e9, abs=0.006)
  assert float(cells[6]) == pytest.approx(_scn(128, True, 22, repeats=True) / 1e9, abs=0.006)
  assert "22-channel" in text and "at 128 px" in text


def test_table_command_selects_rows_and_refuses_unknown_ones():
  from ccfnet_jax import table  # pylint: disable=import-outside-toplevel
  assert [r.backbone for r in table.select_rows(["scn"])] == ["R18", "R18-MSC"]
  assert [(r.method, r.backbone) for r in table.select_rows(["CCF-Net R50", "hrnet"])] == [
      ("HRNet", "W32"), ("CCF-Net", "R50")]
  assert len(table.select_rows([])) == 11
  with pytest.raises(ValueError, match="unknown rows"):
    table.select_rows(["SCN R34"])
  done = subprocess.run([sys.executable, "-m", "ccfnet_jax.table", "--rows=CCF-Net R18", "--image_size=128"],
                        cwd=REPO, capture_output=True, text=True, timeout=300, check=False)
  assert done.returncode == 0, done.stderr[-2000:]
  assert "| CCF-Net | R18 | 32 | 11,199,084 |" in done.stdout


def test_xla_column_is_near_the_dense_count():
  row = next(r for r in complexity.ROWS if (r.method, r.backbone) == ("CCF-Net", "R18"))
  m = complexity.measure(row, image_size=128, xla="lowered")
  # XLA skips the taps that fall on zero padding: a little below the dense conv count on 4x4..64x64 maps.
  dense = complexity.dense_macs(complexity.build(row), 128) / 1e9
  assert 0.7 * dense < m["xla_gmacs"] < 1.1 * dense
  assert "GMACs XLA (lowered)" in complexity.table([row], image_size=128, xla="lowered")
  with pytest.raises(ValueError, match="xla must be one of"):
    complexity.measure(row, xla="fast")
