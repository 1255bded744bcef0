"""CCF-Net model: parameter counts, shapes, dtypes, BatchNorm modes, input checks, padding and resampling."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from ccfnet_jax import convert, maps
from ccfnet_jax.models.complexity import count_params, dense_macs
from ccfnet_jax.models import CCFNet, ResNet, create_model, layers

# --- Parameter counts, derived by hand from the architecture (not from our modules). ---


def _conv(k: int, cin: int, cout: int, bias: bool = False) -> int:
  return k * k * cin * cout + (cout if bias else 0)


def _bn(c: int) -> int:
  return 2 * c


def _basic(cin: int, planes: int, stride: int) -> int:
  n = _conv(3, cin, planes) + _bn(planes) + _conv(3, planes, planes) + _bn(planes)
  return n + (_conv(1, cin, planes) + _bn(planes) if stride != 1 or cin != planes else 0)


def _bottleneck(cin: int, planes: int, stride: int) -> int:
  out = 4 * planes
  n = _conv(1, cin, planes) + _bn(planes) + _conv(3, planes, planes) + _bn(planes) + _conv(1, planes, out) + _bn(out)
  return n + (_conv(1, cin, out) + _bn(out) if stride != 1 or cin != out else 0)


def _resnet(depth: int, stages: int) -> tuple[int, int]:
  """(params of stem + `stages` stages, output channels), torchvision ResNet-`depth` arithmetic."""
  block, expansion, blocks = {18: (_basic, 1, (2, 2, 2, 2)), 34: (_basic, 1, (3, 4, 6, 3)),
                              50: (_bottleneck, 4, (3, 4, 6, 3))}[depth]
  n, cin = _conv(7, 3, 64) + _bn(64), 64
  for s in range(stages):
    planes = 64 * 2 ** s
    for i in range(blocks[s]):
      n += block(cin, planes, 2 if s > 0 and i == 0 else 1)
      cin = planes * expansion
  return n, cin


def test_hand_arithmetic_matches_torchvision_totals():
  # torchvision's published totals (with the 1000-class fc): resnet18 11,689,512; resnet34 21,797,672;
  # resnet50 25,557,032. Checks the helper used below.
  for depth, total in ((18, 11_689_512), (34, 21_797_672), (50, 25_557_032)):
    n, c = _resnet(depth, 4)
    assert n + c * 1000 + 1000 == total


def _abstract(depth: int, msc: bool) -> CCFNet:
  return nnx.eval_shape(lambda: CCFNet(depth, msc, rngs=nnx.Rngs(0)))


@pytest.mark.parametrize("depth", [18, 34, 50])
def test_param_counts(depth):
  # MSC head: whatever the R18-MSC total (the reference's: 4,833,581) leaves after backbone + projection 256 -> 256.
  r18_backbone, c3 = _resnet(18, 3)
  head = 4_833_581 - r18_backbone - _conv(1, c3, 256, bias=True)
  backbone, c3 = _resnet(depth, 3)
  expected_msc = backbone + _conv(1, c3, 256, bias=True) + head
  if depth == 50:
    assert expected_msc == 10_790_701  # the reference's R50-MSC
  full, c4 = _resnet(depth, 4)
  expected_plain = full + _conv(1, c4, 44, bias=True)
  assert count_params(_abstract(depth, True)) == expected_msc
  assert count_params(_abstract(depth, False)) == expected_plain
  if depth in (18, 50):  # the paper's plain rows: 11.20 M / 23.60 M
    assert round(expected_plain / 1e6, 2) == {18: 11.20, 50: 23.60}[depth]


@pytest.mark.parametrize("depth", [18, 50])
def test_param_count_equals_reference_tsv(shared_dir, depth):
  rows = (shared_dir / "reference" / f"ccfnet_pytorch_state_dict_r{depth}_msc.tsv").read_text().splitlines()[1:]
  n = 0
  for row in rows:
    key, shape, _ = row.split("\t")
    if not key.endswith(("running_mean", "running_var", "num_batches_tracked")):
      n += int(np.prod(json.loads(shape)))
  assert count_params(_abstract(depth, True)) == n


# --- Shapes, stride, dtype. ---


@pytest.mark.parametrize("depth,msc", [(18, True), (34, True), (50, True), (18, False), (34, False), (50, False)])
def test_output_shapes_and_stride(depth, msc):
  model = nnx.eval_shape(lambda: create_model("ccfnet", depth=depth, msc=msc, rngs=nnx.Rngs(0)))
  model.eval()
  out = nnx.eval_shape(lambda m, x: m(x), model, jax.ShapeDtypeStruct((2, 128, 256, 3), jnp.float32))
  assert model.stride == (16 if msc else 32)
  assert isinstance(out, maps.Maps)
  for m in out:
    assert m.shape == (2, 128 // model.stride, 256 // model.stride, 11)
    assert m.dtype == jnp.float32


def test_unknown_model_name():
  with pytest.raises(ValueError, match="unknown model 'nope'"):
    create_model("nope", rngs=nnx.Rngs(0))


forward = nnx.jit(lambda model, x: model(x))


def random_model(depth: int = 18, msc: bool = True, seed: int = 0, dtype=jnp.float32) -> CCFNet:
  """A model with non-trivial random values in every variable (He-scaled convs, BN stats away from 0 / 1), in eval.

  Built abstractly and filled through the converter: no initialiser runs (fast on CPU).
  """
  model = nnx.eval_shape(lambda: CCFNet(depth, msc, rngs=nnx.Rngs(0), dtype=dtype))
  rng = np.random.default_rng(seed)
  sd = {}
  for path, var in nnx.to_flat_state(nnx.state(model, (nnx.Param, nnx.BatchStat))):
    key = convert.torch_key(model, path)
    shape = convert.torch_shape(path, var.shape)
    if len(shape) == 4:
      sd[key] = rng.normal(0, np.sqrt(2.0 / np.prod(shape[1:])), shape)
    elif path[-1] in ("var", "scale"):
      sd[key] = rng.uniform(0.5, 1.5, shape)
    else:
      sd[key] = rng.normal(0, 0.1, shape)
  convert.load_torch_state_dict(model, sd, source="reference")
  model.eval()
  return model


@pytest.fixture(scope="module")
def image() -> jnp.ndarray:
  return jax.random.uniform(jax.random.key(1), (2, 128, 128, 3))


def test_bfloat16_computes_in_bf16_with_f32_params(image):
  f32, bf16 = random_model(seed=1), random_model(seed=1, dtype=jnp.bfloat16)
  assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(nnx.state(bf16, nnx.Param)))
  jaxpr = str(jax.make_jaxpr(lambda x: bf16(x))(jax.ShapeDtypeStruct(image.shape, jnp.float32)))
  assert "bf16[2,64,64,64] = conv_general_dilated" in jaxpr
  for got, want in zip(forward(bf16, image), forward(f32, image)):
    assert got.dtype == jnp.float32
    err = float(jnp.max(jnp.abs(got - want)) / jnp.max(jnp.abs(want)))
    assert 0 < err < 0.1  # bf16 rounding is visible, but the maps agree


# --- BatchNorm modes. ---


def test_batch_norm_layer_matches_pytorch_semantics():
  x = jax.random.normal(jax.random.key(0), (4, 3, 5, 6)) * 2 + 1
  bn = layers.batch_norm(6, rngs=nnx.Rngs(0))
  xs = np.asarray(x, np.float64).reshape(-1, 6)
  mean, var = xs.mean(0), xs.var(0)  # biased variance normalises in train mode
  y = bn(x)  # train mode by default
  np.testing.assert_allclose(np.asarray(y).reshape(-1, 6), (xs - mean) / np.sqrt(var + 1e-5), atol=1e-4)
  np.testing.assert_allclose(bn.mean[...], 0.1 * mean, rtol=1e-5, atol=1e-6)  # PyTorch momentum 0.1
  np.testing.assert_allclose(bn.var[...], 0.9 + 0.1 * var, rtol=1e-5)
  bn.eval()
  running_mean, running_var = np.asarray(bn.mean[...]), np.asarray(bn.var[...])
  y = bn(x)
  np.testing.assert_allclose(np.asarray(y).reshape(-1, 6), (xs - running_mean) / np.sqrt(running_var + 1e-5),
                             rtol=1e-5, atol=1e-5)
  np.testing.assert_array_equal(bn.mean[...], running_mean)  # eval does not update


def test_model_train_vs_eval_batch_norm(image):
  model = random_model(seed=3)
  other = jax.random.uniform(jax.random.key(7), image.shape[1:])
  batch_a, batch_b = image, image.at[1].set(other)  # same first image, different partner
  stats_before = jax.tree.map(np.asarray, nnx.state(model, nnx.BatchStat))
  model.eval()
  out_a, out_b = forward(model, batch_a), forward(model, batch_b)
  np.testing.assert_array_equal(out_a.heatmap[0], out_b.heatmap[0])  # eval: each image on its own
  jax.tree.map(np.testing.assert_array_equal, stats_before, jax.tree.map(np.asarray, nnx.state(model, nnx.BatchStat)))
  model.train()
  out_a = forward(model, batch_a)
  after_a = np.asarray(model.backbone.bn1.mean[...])
  out_b = forward(model, batch_b)
  assert float(jnp.max(jnp.abs(out_a.heatmap[0] - out_b.heatmap[0]))) > 1e-3  # train: batch statistics
  # Running mean after two train steps with PyTorch momentum 0.1, from the stem conv's batch means.
  mean_a = np.asarray(model.backbone.conv1(batch_a)).mean((0, 1, 2))
  mean_b = np.asarray(model.backbone.conv1(batch_b)).mean((0, 1, 2))
  expected_a = 0.9 * stats_before["backbone"]["bn1"]["mean"] + 0.1 * mean_a
  np.testing.assert_allclose(after_a, expected_a, rtol=1e-4, atol=1e-6)
  np.testing.assert_allclose(model.backbone.bn1.mean[...], 0.9 * expected_a + 0.1 * mean_b, rtol=1e-4, atol=1e-6)


# --- Input validation. ---


@pytest.mark.parametrize("msc,shape,message", [
    (True, (1, 192, 128, 3), "multiples of 128"),
    (True, (1, 128, 64, 3), "multiples of 128"),
    (False, (1, 96, 100, 3), "multiples of 32"),
    (True, (1, 128, 128, 1), r"\[B, H, W, 3\]"),
    (False, (128, 128, 3), r"\[B, H, W, 3\]"),
])
def test_input_validation(msc, shape, message):
  model = _abstract(18, msc)
  with pytest.raises(ValueError, match=message):
    model.check_input(jnp.zeros(shape))
  with pytest.raises(ValueError, match=message):
    nnx.eval_shape(lambda m, x: m(x), model, jax.ShapeDtypeStruct(shape, jnp.float32))


# --- Padding, pooling and resampling conventions. ---


def _delta_kernel(conv: nnx.Conv) -> None:
  k = np.zeros(conv.kernel.shape, np.float32)
  c = k.shape[0] // 2
  for i in range(min(k.shape[2], k.shape[3])):
    k[c, c, i, i] = 1.0
  conv.kernel[...] = jnp.asarray(k)


@pytest.mark.parametrize("kernel_size", [3, 7])
def test_stride_two_conv_pads_symmetrically(kernel_size):
  # PyTorch pad (k - 1) / 2 on both sides: output (i, j) is centred on input (2i, 2j). 'SAME' would use (2i+1, 2j+1).
  conv = layers.conv(2, 2, kernel_size, stride=2, rngs=nnx.Rngs(0))
  _delta_kernel(conv)
  x = jax.random.normal(jax.random.key(0), (1, 8, 10, 2))
  np.testing.assert_array_equal(conv(x), x[:, ::2, ::2])


def test_dilated_conv_keeps_size_and_reads_dilated_taps():
  conv = layers.conv(1, 1, 3, dilation=5, rngs=nnx.Rngs(0))
  k = np.zeros((3, 3, 1, 1), np.float32)
  k[0, 2, 0, 0] = 1.0  # tap at (-5, +5)
  conv.kernel[...] = jnp.asarray(k)
  x = jax.random.normal(jax.random.key(0), (1, 16, 16, 1))
  y = np.asarray(conv(x))[0, :, :, 0]
  expected = np.zeros((16, 16), np.float32)
  expected[5:, :11] = np.asarray(x)[0, :11, 5:, 0]
  np.testing.assert_array_equal(y, expected)


def test_stem_max_pool_pads_with_minus_infinity():
  x = -jax.random.uniform(jax.random.key(0), (1, 6, 6, 1)) - 1  # all negative: a 0 pad would win
  y = np.asarray(layers.max_pool(x, 3, 2, padding=1))[0, :, :, 0]
  xn = np.pad(np.asarray(x)[0, :, :, 0], 1, constant_values=-np.inf)
  expected = np.array([[xn[2 * i:2 * i + 3, 2 * j:2 * j + 3].max() for j in range(3)] for i in range(3)])
  np.testing.assert_array_equal(y, expected)


def _upsample_brute_force(a: np.ndarray, factor: int) -> np.ndarray:
  """PyTorch's bilinear align_corners=True by the formula, one output pixel at a time, `[h, w] -> [h f, w f]`."""
  h, w = a.shape
  out = np.zeros((h * factor, w * factor))

  def source(i: int, n_in: int, n_out: int) -> tuple[int, int, float]:
    p = i * (n_in - 1) / (n_out - 1) if n_out > 1 else 0.0
    i0 = int(np.floor(p))
    i1 = min(i0 + 1, n_in - 1)
    return i0, i1, p - i0

  for i in range(h * factor):
    y0, y1, fy = source(i, h, h * factor)
    for j in range(w * factor):
      x0, x1, fx = source(j, w, w * factor)
      top = a[y0, x0] * (1 - fx) + a[y0, x1] * fx
      bottom = a[y1, x0] * (1 - fx) + a[y1, x1] * fx
      out[i, j] = top * (1 - fy) + bottom * fy
  return out


@pytest.mark.parametrize("h,w,factor", [(1, 1, 8), (2, 1, 4), (2, 3, 2), (4, 4, 8), (5, 2, 4)])
def test_upsample_align_corners_matches_formula(h, w, factor):
  a = np.random.default_rng(h * 10 + w).normal(size=(h, w))
  got = layers.upsample_align_corners(jnp.asarray(a, jnp.float32)[None, :, :, None], factor)
  np.testing.assert_allclose(np.asarray(got)[0, :, :, 0], _upsample_brute_force(a, factor), rtol=1e-5, atol=1e-6)


def test_upsample_align_corners_small_case_by_hand():
  got = layers.upsample_align_corners(jnp.array([0.0, 3.0])[None, None, :, None], 2)
  np.testing.assert_allclose(np.asarray(got)[0, 0, :, 0], [0.0, 1.0, 2.0, 3.0], atol=1e-6)
  # Not the half-pixel convention of jax.image.resize ([0, 0.75, 2.25, 3]).


def test_resnet_full_trunk_stride_and_features():
  model = nnx.eval_shape(lambda: ResNet(50, num_stages=4, rngs=nnx.Rngs(0)))
  out = nnx.eval_shape(lambda m, x: m(x), model, jax.ShapeDtypeStruct((1, 64, 96, 3), jnp.float32))
  assert (model.stride, model.out_features, out.shape) == (32, 2048, (1, 2, 3, 2048))


@pytest.mark.parametrize("depth,expected_gmacs", [(18, 10.16), (50, 20.16)])
def test_dense_macs_match_spec(depth, expected_gmacs):
  # The reference's MACs at 1x512x512x3 (convs only) with each multi-dilation conv computed once.
  assert round(dense_macs(_abstract(depth, True), 512) / 1e9, 2) == expected_gmacs
