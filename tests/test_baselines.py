"""Table 1 baselines: SimpleBaseline, SCN (each +MSC), HRNet-W32: parameter counts, shapes, transposed conv, configs,
training."""

from __future__ import annotations

import importlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import tiny_training
from ccfnet_jax import maps
from ccfnet_jax.models import MODELS, create_model
from ccfnet_jax.models.complexity import ROWS, count_params, paper_macs
from ccfnet_jax.models.hrnet import HRNet
from ccfnet_jax.models.scn import SCN
from ccfnet_jax.models.simplebaseline import ConvTranspose, SimpleBaseline
from ccfnet_jax.train import setup

# --- Parameter counts derived by hand from the papers' architectures (not from our modules). ---


def _conv(k: int, cin: int, cout: int, bias: bool = False) -> int:
  return k * k * cin * cout + (cout if bias else 0)


def _bn(c: int) -> int:
  return 2 * c


def _basic(cin: int, planes: int) -> int:
  n = _conv(3, cin, planes) + _bn(planes) + _conv(3, planes, planes) + _bn(planes)
  return n + (_conv(1, cin, planes) + _bn(planes) if cin != planes else 0)


def _bottleneck(cin: int, planes: int) -> int:
  out = 4 * planes
  n = _conv(1, cin, planes) + _bn(planes) + _conv(3, planes, planes) + _bn(planes) + _conv(1, planes, out) + _bn(out)
  return n + (_conv(1, cin, out) + _bn(out) if cin != out else 0)


def _resnet(depth: int, stages: int) -> tuple[int, int]:
  """(params of stem + `stages` stages, output channels) of torchvision's ResNet-`depth`."""
  block, expansion, blocks = {18: (_basic, 1, (2, 2, 2, 2)), 50: (_bottleneck, 4, (3, 4, 6, 3))}[depth]
  n, cin = _conv(7, 3, 64) + _bn(64), 64
  for s in range(stages):
    for _ in range(blocks[s]):
      n += block(cin, 64 * 2 ** s)
      cin = 64 * 2 ** s * expansion
  return n, cin


def _trunk(depth: int, msc: bool) -> tuple[int, int]:
  """(params, output channels) of ResNet stem..layer4, or with MSC stem..layer3 + the MSC module at its width."""
  n, c = _resnet(depth, 3 if msc else 4)
  if msc:  # MSC at the backbone's width c: 3 dilated 3x3 + 1x1 (bias), pool 1x1 c->1, fusion bottleneck c+3 -> c
    n += 3 * _conv(3, c, c, True) + _conv(1, c, c, True) + _conv(1, c, 1, True) + _bottleneck(c + 3, c // 4)
  return n, c


def _simplebaseline(depth: int, msc: bool, joints: int = 44) -> int:
  n, c = _trunk(depth, msc)
  for _ in range(2 if msc else 3):  # 4x4 deconvolutions to 256 channels, no bias, + BN
    n += 16 * c * 256 + _bn(256)
    c = 256
  return n + _conv(1, 256, joints, True)


def _scn(depth: int, msc: bool, joints: int = 44) -> int:
  """SimpleBaseline + a second trunk of the same kind + a 1x1 conv with bias to the same width."""
  n, c = _trunk(depth, msc)
  return _simplebaseline(depth, msc, joints) + n + _conv(1, c, joints, True)


def _hrnet(width: int, joints: int = 44) -> int:
  n = _conv(3, 3, 64) + _bn(64) + _conv(3, 64, 64) + _bn(64)  # stem
  n += _bottleneck(64, 64) + 3 * _bottleneck(256, 64)  # stage 1
  prev = [256]
  for modules, branches in ((1, 2), (4, 3), (3, 4)):
    chans = [width * 2 ** b for b in range(branches)]
    for b, c in enumerate(chans):  # transition
      if b >= len(prev):
        n += _conv(3, prev[-1], c) + _bn(c)
      elif prev[b] != c:
        n += _conv(3, prev[b], c) + _bn(c)
    for m in range(modules):
      n += sum(4 * _basic(c, c) for c in chans)
      outputs = 1 if (branches == 4 and m == modules - 1) else branches
      for i in range(outputs if branches > 1 else 0):
        for j in range(branches):
          if j > i:
            n += _conv(1, chans[j], chans[i]) + _bn(chans[i])
          elif j < i:
            n += (i - j - 1) * (_conv(3, chans[j], chans[j]) + _bn(chans[j]))
            n += _conv(3, chans[j], chans[i]) + _bn(chans[i])
    prev = chans
  return n + _conv(1, width, joints, True)


def test_hand_arithmetic_matches_published_totals():
  # torchvision resnet18 / resnet50 with the 1000-class fc: 11,689,512 / 25,557,032. The HRNet paper's pose
  # HRNet-W32 (17 joints): 28.5 M.
  for depth, total in ((18, 11_689_512), (50, 25_557_032)):
    n, c = _resnet(depth, 4)
    assert n + c * 1000 + 1000 == total
  assert _hrnet(32, joints=17) / 1e6 == pytest.approx(28.5, abs=0.05)


def test_22_channel_heads_give_every_printed_baseline_parameter_count():
  # The paper's Table 1 (M, two decimals). With 44 channels SimpleBaseline R18-MSC and both SCN rows overshoot.
  printed = {("simplebaseline", 18, False): 15.38, ("simplebaseline", 18, True): 6.86,
             ("simplebaseline", 50, False): 34.00, ("simplebaseline", 50, True): 45.33,
             ("scn", 18, False): 26.57, ("scn", 18, True): 11.62}
  build = {"simplebaseline": _simplebaseline, "scn": _scn}
  for (name, depth, msc), paper in printed.items():
    assert round(build[name](depth, msc, joints=22) / 1e6, 2) == paper
  assert round(_hrnet(32, joints=22) / 1e6, 2) == 28.54
  assert [round(_simplebaseline(18, True) / 1e6, 2), round(_scn(18, False) / 1e6, 2),
          round(_scn(18, True) / 1e6, 2)] == [6.87, 26.58, 11.63]


PAPER_PARAMS_M = {"simplebaseline_r18": 15.38, "simplebaseline_r18_msc": 6.86, "simplebaseline_r50": 34.00,
                  "simplebaseline_r50_msc": 45.33, "scn_r18": 26.57, "scn_r18_msc": 11.62, "hrnet_w32": 28.54}
"""config -> the paper's parameter count (M) of its Table 1 row."""

CONFIGS = {"simplebaseline_r18": ("simplebaseline", 18, False), "simplebaseline_r18_msc": ("simplebaseline", 18, True),
           "simplebaseline_r50": ("simplebaseline", 50, False), "simplebaseline_r50_msc": ("simplebaseline", 50, True),
           "scn_r18": ("scn", 18, False), "scn_r18_msc": ("scn", 18, True), "hrnet_w32": ("hrnet", 32, False)}
"""config -> the (name, depth, msc) it must select."""


@pytest.fixture(scope="module")
def config_models() -> dict[str, nnx.Module]:
  """config name -> its model built (abstractly, no arrays) by the training code from the config; each built once
  (HRNet's construction alone takes seconds)."""
  out = {}
  for config_name in CONFIGS:
    config = importlib.import_module(f"configs.{config_name}").get_config("fold=1,steps=3")
    assert (config.fold, config.num_steps) == ("1", 3)
    assert (config.model.name, config.model.depth, config.model.msc) == CONFIGS[config_name]
    out[config_name] = nnx.eval_shape(lambda c=config: setup.create_model(c, jax.random.key(0)))
  return out


@pytest.mark.parametrize("config_name", list(CONFIGS))
def test_param_counts_match_hand_count_and_paper(config_models, config_name):
  model = config_models[config_name]
  name, depth, msc = CONFIGS[config_name]
  assert isinstance(model, {"hrnet": HRNet, "simplebaseline": SimpleBaseline, "scn": SCN}[name])
  expected = {"hrnet": lambda d, m: _hrnet(d), "simplebaseline": _simplebaseline, "scn": _scn}[name](depth, msc)
  assert count_params(model) == expected
  assert count_params(model) / 1e6 == pytest.approx(PAPER_PARAMS_M[config_name], rel=0.01)
  assert model.stride == 4


@pytest.mark.parametrize("config_name", list(CONFIGS))
def test_output_maps_at_stride_4(config_models, config_name):
  model = config_models[config_name]
  model.eval()  # (train-mode BatchNorm updates make tracing slow; shapes are the same)
  out = nnx.eval_shape(lambda m, x: m(x), model, jax.ShapeDtypeStruct((2, 128, 256, 3), jnp.float32))
  assert isinstance(out, maps.Maps)
  for m in out:
    assert m.shape == (2, 128 // model.stride, 256 // model.stride, 11) and m.dtype == jnp.float32


def test_input_checks(config_models):
  for config_name, (multiple, bad_hw) in {"simplebaseline_r18_msc": (128, (96, 128)), "scn_r18_msc": (128, (96, 128)),
                                          "simplebaseline_r18": (32, (48, 64)), "scn_r18": (32, (48, 64)),
                                          "hrnet_w32": (32, (48, 64))}.items():
    model = config_models[config_name]
    model.eval()
    with pytest.raises(ValueError, match=f"multiples of {multiple}"):
      nnx.eval_shape(lambda m, x: m(x), model, jax.ShapeDtypeStruct((1, *bad_hw, 3), jnp.float32))


def test_registry():
  assert {"simplebaseline", "scn", "hrnet"} <= set(MODELS)
  with pytest.raises(ValueError, match="no MSC variant"):
    create_model("hrnet", depth=32, msc=True, rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="width"):
    create_model("hrnet", depth=50, msc=False, rngs=nnx.Rngs(0))


def test_table_rows_match_paper_figures():
  # The paper's Table 1 figures (CCF-Net R18 with params and MACs un-swapped), in the paper's order.
  paper = {(r.method, r.backbone): (r.paper_params_m, r.paper_gmacs) for r in ROWS}
  assert list(paper) == [("SimpleBaseline", "R18"), ("SimpleBaseline", "R18-MSC"), ("SCN", "R18"), ("SCN", "R18-MSC"),
                         ("CCF-Net", "R18"), ("CCF-Net", "R18-MSC"), ("SimpleBaseline", "R50"),
                         ("SimpleBaseline", "R50-MSC"), ("HRNet", "W32"), ("CCF-Net", "R50"), ("CCF-Net", "R50-MSC")]
  assert paper[("SimpleBaseline", "R50-MSC")] == (45.33, 124.80)
  assert paper[("SCN", "R18-MSC")] == (11.62, 45.43)
  assert paper[("HRNet", "W32")] == (28.54, 40.98)
  assert paper[("CCF-Net", "R18")] == (11.20, 9.51)
  for row in ROWS:  # every row is built by the config it names
    config = importlib.import_module(row.config[:-len(".py")].replace("/", ".")).get_config()
    assert {k: config.model[k] for k in ("name", "depth", "msc")} == row.model


def test_reference_repeats_add_three_dilated_convs_per_msc_module():
  # The reference computes d1(x) twice more and d3(d1(x)) once more: 3 extra 3x3 256 -> 256 convs with bias on the
  # 32 x 32 map at 512 px (1.81 G; the reference's CCF-Net R18-MSC: 11.98 G with them, 10.16 G without).
  extra = 3 * 32 * 32 * 256 * (9 * 256 + 1)
  model = nnx.eval_shape(lambda: create_model("ccfnet", depth=18, msc=True, rngs=nnx.Rngs(0)))
  assert paper_macs(model, 512, reference_repeats=True) - paper_macs(model, 512) == extra
  assert extra / 1e9 == pytest.approx(11.98 - 10.16, abs=0.01)
  plain = nnx.eval_shape(lambda: create_model("simplebaseline", depth=18, msc=False, rngs=nnx.Rngs(0)))
  assert paper_macs(plain, 128, reference_repeats=True) == paper_macs(plain, 128)


# --- Transposed convolution geometry. ---


def _scatter_transpose(x: np.ndarray, kernel: np.ndarray, stride: int, padding: int, output_padding: int
                       ) -> np.ndarray:
  """PyTorch ConvTranspose2d by definition: each input pixel scatters kernel-weighted copies, then crop `padding`."""
  b, h, w, _ = x.shape
  k = kernel.shape[0]
  full = np.zeros((b, (h - 1) * stride + k + output_padding, (w - 1) * stride + k + output_padding,
                   kernel.shape[-1]))
  for i in range(h):
    for j in range(w):
      full[:, i * stride:i * stride + k, j * stride:j * stride + k, :] += np.einsum(
          "bc,yxco->byxo", x[:, i, j, :], kernel)
  out_h = (h - 1) * stride - 2 * padding + k + output_padding
  out_w = (w - 1) * stride - 2 * padding + k + output_padding
  return full[:, padding:padding + out_h, padding:padding + out_w, :]


@pytest.mark.parametrize("kernel_size,stride,padding,output_padding", [(4, 2, 1, 0), (3, 2, 1, 1), (3, 1, 1, 0)])
def test_conv_transpose_equals_scatter(kernel_size, stride, padding, output_padding):
  rng = np.random.default_rng(0)
  layer = ConvTranspose(3, 5, kernel_size, stride=stride, padding=padding, output_padding=output_padding,
                        use_bias=True, rngs=nnx.Rngs(0))
  kernel = rng.normal(size=(kernel_size, kernel_size, 3, 5))
  bias = rng.normal(size=5)
  layer.kernel[...] = jnp.asarray(kernel, jnp.float32)
  layer.bias[...] = jnp.asarray(bias, jnp.float32)
  x = rng.normal(size=(2, 5, 6, 3))
  expected = _scatter_transpose(x, kernel, stride, padding, output_padding) + bias
  got = np.asarray(layer(jnp.asarray(x, jnp.float32)))
  assert got.shape == expected.shape
  np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)


def test_deconvolution_doubles_the_side():
  layer = ConvTranspose(2, 2, 4, stride=2, padding=1, rngs=nnx.Rngs(0))
  assert layer(jnp.zeros((1, 7, 9, 2))).shape == (1, 14, 18, 2)


# --- Training at stride 4 through the training loop's step. ---


def test_train_step_at_stride_4_reduces_loss():
  size, batch_size = 64, 2
  model = SimpleBaseline(18, False, rngs=nnx.Rngs(0))
  step, state = tiny_training.model_step(model, size, 1e-3)
  rng = np.random.default_rng(0)
  batch = {"image": jnp.asarray(rng.uniform(size=(batch_size, size, size, 3)), jnp.float32),
           "points_xy": jnp.asarray(rng.uniform(8, size - 8, size=(batch_size, 11, 2)), jnp.float32),
           "point_valid": jnp.ones((batch_size, 11), bool),
           "disease": jnp.asarray(rng.integers(0, 2, size=(batch_size, 11)), jnp.int32)}
  losses = []
  for _ in range(3):
    state, scalars = step(state, batch)
    losses.append(float(scalars["loss"]))
  assert all(np.isfinite(losses))
  assert losses[-1] < losses[0]
  assert int(state.step) == 3
