"""targets.encode: exact Gaussian/offset targets, peak cell, absent points, round trip through decode, golden maps."""

import functools

import jax
import numpy as np
import pytest

from ccfnet_jax import decode, targets

K = 11


def _numpy_targets(points_xy, hw, stride, sigma):
  """Independent float64 construction straight from docs/method.md#targets (one image, all points present)."""
  h, w = hw[0] // stride, hw[1] // stride
  xc = (np.arange(w) + 0.5) * stride
  yc = (np.arange(h) + 0.5) * stride
  x = points_xy[:, 0][None, None, :]
  y = points_xy[:, 1][None, None, :]
  d2 = (xc[None, :, None] - x) ** 2 + (yc[:, None, None] - y) ** 2  # [h, w, K]
  heatmap = np.exp(-d2 / (2 * sigma ** 2))
  heatmap = heatmap / heatmap.max(axis=(0, 1), keepdims=True)
  offset_x = np.broadcast_to((x - xc[None, :, None]) / stride, (h, w, K))
  offset_y = np.broadcast_to((y - yc[:, None, None]) / stride, (h, w, K))
  return heatmap, offset_y, offset_x


def _random_points(rng, n, hw, margin=0.0):
  xy = rng.uniform(-margin, 1.0 + margin, size=(n, K, 2)) * np.array([hw[1], hw[0]])
  return xy.astype(np.float32)


def _special_points(hw, stride):
  """Points exactly at cell centres, on cell borders, on the image border and just outside it."""
  height, width = hw
  xs = [0.5 * stride, 1.5 * stride, stride, 0.0, width, width - 1e-3, -0.3 * stride, width + 0.7 * stride,
        width / 2 + 0.25, 3.0, width - 2.0]
  ys = [0.5 * stride, 2.0 * stride, 2.5 * stride, height, 0.0, -0.6 * stride, height - 1e-3, 1.0, height / 2,
        height + 5.0, 7.3]
  return np.stack([np.array(xs), np.array(ys)], axis=-1)[None].astype(np.float32)


@pytest.mark.parametrize("stride", [4, 16, 32])
def test_encode_matches_the_spec_formula_and_peaks_at_one(stride):
  hw = (128, 96)
  rng = np.random.default_rng(stride)
  points = np.concatenate([_random_points(rng, 3, hw, margin=0.1), _special_points(hw, stride)])
  t = targets.encode(points, np.ones(points.shape[:2], bool), hw, stride=stride)
  assert t.maps.heatmap.shape == (4, hw[0] // stride, hw[1] // stride, K)
  heatmap = np.asarray(t.maps.heatmap)
  np.testing.assert_array_equal(heatmap.max(axis=(1, 2)), 1.0)  # exactly 1 per object
  for b in range(points.shape[0]):
    ref_heatmap, ref_offset_y, ref_offset_x = _numpy_targets(points[b].astype(np.float64), hw, stride, stride)
    np.testing.assert_allclose(heatmap[b], ref_heatmap, atol=2e-6)
    np.testing.assert_allclose(np.asarray(t.maps.offset_y)[b], ref_offset_y, atol=2e-6)
    np.testing.assert_allclose(np.asarray(t.maps.offset_x)[b], ref_offset_x, atol=2e-6)


@pytest.mark.parametrize("stride", [4, 16, 32])
def test_peak_cell_is_nearest_cell_centre(stride):
  hw = (128, 128)
  points = _random_points(np.random.default_rng(7), 4, hw, margin=0.2).astype(np.float64)
  t = targets.encode(points, np.ones((4, K), bool), hw, stride=stride)
  n = hw[0] // stride
  centres = (np.arange(n) + 0.5) * stride
  nearest_col = np.argmin(np.abs(points[..., 0:1] - centres), axis=-1)
  nearest_row = np.argmin(np.abs(points[..., 1:2] - centres), axis=-1)
  np.testing.assert_array_equal(np.asarray(t.peak_cell), np.stack([nearest_row, nearest_col], -1))
  np.testing.assert_array_equal(np.asarray(t.peak_cell), np.asarray(decode.argmax_cell(t.maps.heatmap)))


@pytest.mark.parametrize("stride", [4, 16, 32])
def test_encode_decode_round_trip(stride):
  hw = (128, 128)
  rng = np.random.default_rng(100 + stride)
  points = np.concatenate([_random_points(rng, 6, hw, margin=0.05), _special_points(hw, stride)])
  t = targets.encode(points, np.ones(points.shape[:2], bool), hw, stride=stride)
  decoded = decode.decode(t.maps, stride=stride)
  np.testing.assert_allclose(np.asarray(decoded.xy), points, atol=0.01, rtol=0)
  assert float(np.max(np.abs(np.asarray(decoded.xy) - points))) < 1e-3  # in fact float32 exact
  np.testing.assert_array_equal(np.asarray(decoded.peak), 1.0)
  np.testing.assert_array_equal(np.asarray(decoded.cell), np.asarray(t.peak_cell))


def test_jit_equals_eager_and_vmap_equals_batched():
  hw, stride = (128, 64), 16
  points = _random_points(np.random.default_rng(3), 3, hw)
  valid = np.random.default_rng(4).random((3, K)) > 0.3
  disease = np.random.default_rng(5).integers(-1, 2, size=(3, K))
  eager = targets.encode(points, valid, hw, stride, None, disease)
  jitted = jax.jit(targets.encode, static_argnames=("image_hw", "stride", "sigma"))(
      points, valid, image_hw=hw, stride=stride, disease=disease)
  single = functools.partial(targets.encode, image_hw=hw, stride=stride)
  mapped = jax.vmap(lambda p, v, d: single(p, v, disease=d))(points, valid, disease)
  unbatched = single(points[1], valid[1], disease=disease[1])
  for other in (jitted, mapped):
    jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6), eager, other)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(a)[1], np.asarray(b), atol=1e-6), eager, unbatched)


def test_absent_points_and_disease_labels():
  hw, stride = (64, 64), 16
  points = _random_points(np.random.default_rng(9), 2, hw)
  points[0, 3] = np.nan  # absent points may hold anything
  valid = np.ones((2, K), bool)
  valid[0, 3] = valid[1, 7] = False
  disease = np.array([[1, 0, -1, 1, 0, 1, 1, 0, 0, 0, 1], [0] * 5 + [1, 1, 1, 1, -1, 3]])
  t = targets.encode(points, valid, hw, stride, disease=disease)
  for field in ("heatmap", "offset_y", "offset_x"):
    value = np.asarray(getattr(t.maps, field))
    assert np.all(np.isfinite(value))
    assert np.all(value[0, ..., 3] == 0) and np.all(value[1, ..., 7] == 0)
  assert not np.asarray(t.offset_mask)[0, ..., 3].any() and not np.asarray(t.offset_mask)[1, ..., 7].any()
  np.testing.assert_array_equal(np.asarray(t.point_valid), valid)
  logits = np.asarray(t.maps.logits)
  assert np.all(logits == logits[:, :1, :1, :])  # broadcast over the map
  expected = np.array([[1, 0, -1, -1, 0, 1, 1, 0, 0, 0, 1], [0] * 5 + [1, 1, -1, 1, -1, 1]], np.float32)
  np.testing.assert_array_equal(logits[:, 0, 0, :], expected)
  np.testing.assert_array_equal(np.asarray(targets.encode(points, valid, hw, stride).maps.logits), -1.0)


def test_offset_mask_is_reference_threshold_and_sigma_is_a_parameter():
  hw, stride = (64, 64), 16
  points = np.full((1, K, 2), 24.0, np.float32)  # exactly at the centre of cell (1, 1)
  t = targets.encode(points, np.ones((1, K), bool), hw, stride)
  heatmap = np.asarray(t.maps.heatmap)[0, ..., 0]
  # centre 1, 4-neighbours exp(-1/2) = 0.607, diagonals exp(-1) = 0.368 (< 0.4), two cells away exp(-2) = 0.135
  assert heatmap[1, 1] == 1.0
  np.testing.assert_allclose([heatmap[0, 1], heatmap[1, 2], heatmap[0, 0], heatmap[3, 1]],
                             [np.exp(-0.5), np.exp(-0.5), np.exp(-1.0), np.exp(-2.0)], rtol=1e-6)
  assert int(np.asarray(t.offset_mask)[0, ..., 0].sum()) == 5
  wide = targets.encode(points, np.ones((1, K), bool), hw, stride, sigma=2.0 * stride)
  np.testing.assert_allclose(np.asarray(wide.maps.heatmap)[0, 0, 0, 0], np.exp(-2.0 / 8.0), rtol=1e-6)


def test_bad_arguments_raise():
  points = np.zeros((1, K, 2), np.float32)
  valid = np.ones((1, K), bool)
  with pytest.raises(ValueError, match="multiples of stride"):
    targets.encode(points, valid, (100, 128), stride=16)
  with pytest.raises(ValueError, match="valid"):
    targets.encode(points, valid[:, :5], (128, 128))
  with pytest.raises(ValueError, match="11 objects"):
    targets.encode(points[:, :5], valid[:, :5], (128, 128))
  with pytest.raises(ValueError, match="disease"):
    targets.encode(points, valid, (128, 128), disease=np.zeros((1, 5), int))


@pytest.mark.parametrize("golden", ["golden_r18_msc", "golden_r50_msc"])
def test_golden_targets(shared_dir, golden):
  io = np.load(shared_dir / "reference" / golden / "io.npz")
  gt_xy = io["loss_gt_xy"]
  t = targets.encode(gt_xy, np.ones(gt_xy.shape[:2], bool), io["case0_x_nhwc"].shape[1:3], stride=16, sigma=16.0)
  for field in ("heatmap", "offset_y", "offset_x"):
    np.testing.assert_allclose(np.asarray(getattr(t.maps, field)), io[f"loss_target_{field}"], rtol=0, atol=1e-6)
  np.testing.assert_array_equal(np.asarray(t.offset_mask), io["loss_target_heatmap"] >= 0.4)
  np.testing.assert_array_equal(np.asarray(t.peak_cell), np.asarray(decode.argmax_cell(io["loss_target_heatmap"])))
