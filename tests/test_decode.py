"""decode.decode / merge_flip and the coordinate helpers: hand-built maps, jit/vmap, flips, golden decoded points."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ccfnet_jax import coords, decode, objects, targets
from ccfnet_jax.maps import Maps

K = 11


def _random_maps(seed, shape=(2, 8, 6, K)):
  rng = np.random.default_rng(seed)
  return Maps(*(rng.normal(size=shape).astype(np.float32) for _ in Maps._fields))


def test_decode_hand_built_maps():
  h, w, stride = 4, 5, 16
  heatmap = np.zeros((1, h, w, K), np.float32)
  offset_y = np.zeros_like(heatmap)
  offset_x = np.zeros_like(heatmap)
  logits = np.zeros_like(heatmap)
  heatmap[0, 2, 3, 0] = 0.9  # object 0 peaks at row 2, col 3
  offset_x[0, 2, 3, 0], offset_y[0, 2, 3, 0], logits[0, 2, 3, 0] = 0.25, -0.5, 2.0
  offset_x[0, 0, 0, 0] = 7.0  # values away from the peak must not matter
  heatmap[0, 1, 1, 1] = heatmap[0, 3, 0, 1] = 0.5  # tie: the row-major first (1, 1) wins
  heatmap[0, 0, 2, 2] = heatmap[0, 0, 4, 2] = 0.5  # tie in one row: col 2 wins
  out = decode.decode(Maps(heatmap, offset_y, offset_x, logits), stride=stride)
  np.testing.assert_allclose(np.asarray(out.xy)[0, 0], [(3 + 0.25 + 0.5) * 16, (2 - 0.5 + 0.5) * 16])
  np.testing.assert_allclose(np.asarray(out.prob)[0, 0], 1 / (1 + np.exp(-2.0)), rtol=1e-6)
  np.testing.assert_allclose(np.asarray(out.peak)[0, :3], [0.9, 0.5, 0.5])
  np.testing.assert_array_equal(np.asarray(out.cell)[0, :3], [[2, 3], [1, 1], [0, 2]])
  np.testing.assert_array_equal(np.asarray(out.cell)[0, 3:], 0)  # all-zero maps: first cell
  np.testing.assert_allclose(np.asarray(out.xy)[0, 1], [1.5 * 16, 1.5 * 16])
  np.testing.assert_allclose(np.asarray(out.prob)[0, 1:], 0.5)
  assert out.cell.dtype == jnp.int32
  # the stride scales only the position
  out32 = decode.decode(Maps(heatmap, offset_y, offset_x, logits), stride=32)
  np.testing.assert_allclose(np.asarray(out32.xy), 2.0 * np.asarray(out.xy), rtol=1e-6)


def test_decode_jit_eager_vmap_unbatched_agree():
  maps = _random_maps(0, (3, 8, 6, K))
  eager = decode.decode(maps, 16)
  jitted = jax.jit(decode.decode, static_argnames="stride")(maps, stride=16)
  mapped = jax.vmap(lambda m: decode.decode(m, 16))(maps)
  single = decode.decode(Maps(*(m[2] for m in maps)), 16)
  for other in (jitted, mapped):
    jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6), eager, other)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(a)[2], np.asarray(b), rtol=1e-6), eager, single)
  assert eager.xy.shape == (3, K, 2) and eager.prob.shape == (3, K) and eager.peak.shape == (3, K)


def test_decode_rejects_bad_maps():
  maps = _random_maps(1)
  with pytest.raises(ValueError, match="same shape"):
    decode.decode(maps._replace(logits=maps.logits[:, :4]))
  with pytest.raises(ValueError, match="at least 3 dims"):
    decode.decode(Maps(*(m[0, 0] for m in maps)))


def test_merge_flip():
  maps = _random_maps(2)
  # the flipped pass of a perfectly flip-consistent model: the merged maps are the original ones
  merged = decode.merge_flip(maps, decode.flip_maps_x(maps))
  jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6), merged, maps)
  # in general: heatmap and logits averaged after flipping back (column c <-> w - 1 - c), offsets of the first pass
  other = _random_maps(3)
  merged = decode.merge_flip(maps, other)
  w = maps.heatmap.shape[2]
  for c in range(w):
    np.testing.assert_allclose(np.asarray(merged.heatmap)[:, :, c],
                               0.5 * (maps.heatmap[:, :, c] + other.heatmap[:, :, w - 1 - c]), rtol=1e-6)
    np.testing.assert_allclose(np.asarray(merged.logits)[:, :, c],
                               0.5 * (maps.logits[:, :, c] + other.logits[:, :, w - 1 - c]), rtol=1e-6)
  np.testing.assert_array_equal(np.asarray(merged.offset_x), maps.offset_x)
  np.testing.assert_array_equal(np.asarray(merged.offset_y), maps.offset_y)


@pytest.mark.parametrize("stride", [4, 32])
def test_flip_of_points_matches_flip_of_maps(stride):
  """The target heatmap of the flipped points (x -> W - x) is the column-mirrored target heatmap."""
  hw = (128, 96)
  points = np.random.default_rng(stride).uniform(0, 1, (2, K, 2)) * np.array([hw[1], hw[0]])
  valid = np.ones((2, K), bool)
  t = targets.encode(points, valid, hw, stride)
  t_flipped = targets.encode(coords.flip_points_x(points, hw[1]), valid, hw, stride)
  np.testing.assert_allclose(np.asarray(decode.flip_maps_x(t_flipped.maps).heatmap), np.asarray(t.maps.heatmap),
                             atol=1e-6)
  np.testing.assert_allclose(np.asarray(decode.flip_maps_x(t_flipped.maps).offset_x), -np.asarray(t.maps.offset_x),
                             atol=1e-5)


def test_coordinate_helpers():
  xy = np.array([[[10.0, 20.0], [0.0, 5.5]], [[3.0, 4.0], [100.0, 0.0]]])  # [2, 2, 2]
  np.testing.assert_allclose(coords.flip_points_x(xy, 128), [[[118, 20], [128, 5.5]], [[125, 4], [28, 0]]])
  np.testing.assert_allclose(coords.flip_points_x(xy, np.array([128, 100])), [[[118, 20], [128, 5.5]],
                                                                              [[97, 4], [0, 0]]])
  np.testing.assert_allclose(coords.flip_points_x(coords.flip_points_x(xy, 77.5), 77.5), xy)
  # stretched (not letterboxed): x scales with the widths, y with the heights
  scaled = coords.scale_points(xy, (200, 100), (400, 50))
  assert isinstance(scaled, np.ndarray)
  np.testing.assert_allclose(scaled, xy * np.array([0.5, 2.0]))
  per_example = coords.scale_points(xy, np.array([[200, 100], [10, 10]]), (100, 100))
  np.testing.assert_allclose(per_example, xy * np.array([[[1.0, 0.5]], [[10.0, 10.0]]]))
  np.testing.assert_allclose(coords.scale_points(scaled, (400, 50), (200, 100)), xy)
  # JAX in, JAX out, also under jit
  jitted = jax.jit(coords.scale_points)(jnp.asarray(xy, jnp.float32), jnp.array([200, 100]), jnp.array([400, 50]))
  assert isinstance(jitted, jax.Array)
  np.testing.assert_allclose(np.asarray(jitted), scaled, rtol=1e-6)
  assert isinstance(coords.flip_points_x(jnp.asarray(xy), 128.0), jax.Array)
  with pytest.raises(ValueError, match="from_hw"):
    coords.scale_points(xy, (1, 2, 3), (1, 2))
  assert decode.scale_points is coords.scale_points and decode.flip_points_x is coords.flip_points_x


@pytest.mark.parametrize("golden", ["golden_r18_msc", "golden_r50_msc"])
def test_golden_decode(shared_dir, golden):
  io = np.load(shared_dir / "reference" / golden / "io.npz")
  maps = Maps(*(io[f"case0_{name}"] for name in Maps._fields))
  out = decode.decode(maps, stride=16)
  np.testing.assert_array_equal(np.asarray(out.cell), io["case0_dec_rc"])
  np.testing.assert_allclose(np.asarray(out.xy), io["case0_dec_xy"], rtol=0, atol=0.01)
  np.testing.assert_allclose(np.asarray(out.prob), io["case0_dec_prob"], rtol=1e-5)
  rows, cols = io["case0_dec_rc"][..., 0], io["case0_dec_rc"][..., 1]
  b, k = np.meshgrid(np.arange(rows.shape[0]), np.arange(K), indexing="ij")
  np.testing.assert_array_equal(np.asarray(out.peak), io["case0_heatmap"][b, rows, cols, k])


def test_pure_modules_import_no_flax():
  import ast
  import inspect

  from ccfnet_jax import losses
  for module in (coords, decode, targets, losses):
    tree = ast.parse(inspect.getsource(module))
    names = {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
    names |= {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.module}
    assert not any(name.split(".")[0] == "flax" for name in names), module.__name__


# ---------------------------------------------------------------------------------------------------------------
# The ordered decode and shift TTA.
# ---------------------------------------------------------------------------------------------------------------

ORDER = list(objects.TOP_TO_BOTTOM)


def _spine_maps(h=16, w=16, first_row=2, col=5, value=0.8):
  """Heatmaps with each object's true peak one row below the previous one (anatomical order), zero offsets."""
  heatmap = np.zeros((1, h, w, K), np.float32)
  for position, channel in enumerate(ORDER):
    heatmap[0, first_row + position, col, channel] = value
  zeros = np.zeros_like(heatmap)
  return heatmap, zeros


def test_objects_top_to_bottom_alternate_discs_and_vertebrae():
  names = [objects.NAMES[i] for i in ORDER]
  assert names == ["T12-L1", "L1", "L1-L2", "L2", "L2-L3", "L3", "L3-L4", "L4", "L4-L5", "L5", "L5-S1"]


def test_ordered_decode_respects_the_order_where_argmax_does_not():
  heatmap, zeros = _spine_maps()
  l3 = objects.INDEX["L3"]
  heatmap[0, 2 + 8, 5, l3] = 0.9  # L3's maximum sits on L4-L5's row (below L4): argmax breaks the order
  maps = Maps(heatmap, zeros, zeros, zeros)
  argmax_rows = np.asarray(decode.decode(maps).cell)[0, ORDER, 0]
  assert argmax_rows[ORDER.index(l3)] == 10 and not np.all(np.diff(argmax_rows) > 0)
  ordered = decode.decode_ordered(maps, top_k=4)
  rows = np.asarray(ordered.cell)[0, ORDER, 0]
  np.testing.assert_array_equal(rows, 2 + np.arange(K))  # the lower-valued true peak is chosen for L3
  np.testing.assert_allclose(np.asarray(ordered.peak)[0, l3], 0.8)
  jitted = jax.jit(lambda m: decode.decode_ordered(m, 16, 4))(maps)
  np.testing.assert_array_equal(np.asarray(jitted.cell), np.asarray(ordered.cell))


def test_ordered_decode_keeps_two_levels_on_one_cell_only_in_order():
  heatmap, zeros = _spine_maps()
  l2, l2_l3 = objects.INDEX["L2"], objects.INDEX["L2-L3"]
  row = 2 + ORDER.index(l2_l3)
  heatmap[0, row, 5, l2] = 0.95  # L2 peaks on the cell of the disc below it
  offset_y = zeros.copy()
  maps = Maps(heatmap, offset_y, zeros, zeros)
  assert np.asarray(decode.decode(maps).cell)[0, l2, 0] == row  # argmax: L2 and L2-L3 on one point
  rows = np.asarray(decode.decode_ordered(maps, top_k=4).cell)[0, ORDER, 0]
  np.testing.assert_array_equal(rows, 2 + np.arange(K))  # the point is L2-L3's; L2 goes back to its own cell
  offset_y[0, row, 5, l2] = -0.4  # with its offset L2 sits 6.4 px above the disc's point: in order, kept
  ordered = decode.decode_ordered(Maps(heatmap, offset_y, zeros, zeros), top_k=4)
  assert np.asarray(ordered.cell)[0, l2, 0] == row == np.asarray(ordered.cell)[0, l2_l3, 0]
  y = np.asarray(ordered.xy)[0, ORDER, 1]
  assert np.all(np.diff(y) > 0)


def test_ordered_decode_equals_argmax_when_argmax_is_ordered_and_falls_back_when_nothing_is():
  rng = np.random.default_rng(3)
  heatmap, zeros = _spine_maps()
  heatmap = heatmap + rng.uniform(0, 0.3, heatmap.shape).astype(np.float32)  # clutter below every true peak
  offsets = rng.uniform(-0.4, 0.4, heatmap.shape).astype(np.float32)
  maps = Maps(heatmap, offsets, offsets[..., ::-1], rng.normal(size=heatmap.shape).astype(np.float32))
  for field in decode.Decoded._fields:
    np.testing.assert_array_equal(np.asarray(getattr(decode.decode_ordered(maps), field)),
                                  np.asarray(getattr(decode.decode(maps), field)))
  # every object's candidates on one row: no strictly ordered choice exists -> the argmaxes
  flat = np.zeros((2, 4, 6, K), np.float32)
  flat[:, 1, :, :] = rng.uniform(0.5, 1.0, (2, 6, K))
  maps = Maps(flat, np.zeros_like(flat), np.zeros_like(flat), np.zeros_like(flat))
  np.testing.assert_array_equal(np.asarray(decode.decode_ordered(maps, top_k=3).cell),
                                np.asarray(decode.decode(maps).cell))
  with pytest.raises(ValueError, match="top_k"):
    decode.decode_ordered(maps, top_k=25)
  with pytest.raises(ValueError, match="decode must be one of"):
    decode.decode_with("beam", maps)


def test_ordered_decode_over_leading_dims_is_per_image():
  heatmap, zeros = _spine_maps()
  broken = heatmap.copy()
  broken[0, 12, 5, objects.INDEX["L1"]] = 0.9
  batch = Maps(*(np.concatenate(pair) for pair in ((heatmap, broken), (zeros, zeros), (zeros, zeros),
                                                    (zeros, zeros))))
  out = decode.decode_ordered(batch, top_k=3)
  for b in range(2):
    single = decode.decode_ordered(Maps(*(m[b] for m in batch)), top_k=3)  # [h, w, 11], no batch dim
    np.testing.assert_array_equal(np.asarray(out.cell)[b], np.asarray(single.cell))
    np.testing.assert_array_equal(np.asarray(out.cell)[b, ORDER, 0], 2 + np.arange(K))


def test_shift_image_and_unshift_maps_are_inverse_moves():
  rng = np.random.default_rng(4)
  image = rng.uniform(size=(2, 8, 12, 3)).astype(np.float32)
  moved = np.asarray(decode.shift_image(image, 2, -3))
  np.testing.assert_array_equal(moved[:, 2:, :9], image[:, :6, 3:])  # content at (y, x) is now at (y + 2, x - 3)
  assert np.all(moved[:, :2] == 0) and np.all(moved[:, :, 9:] == 0)
  maps = Maps(*(rng.normal(size=(2, 5, 6, K)).astype(np.float32) for _ in Maps._fields))
  shifted = Maps(*(np.asarray(decode.shift_image(m, 1, 2)) for m in maps))  # the maps of a 1-row, 2-col move
  back, seen = decode.unshift_maps(shifted, 1, 2)
  seen = np.asarray(seen)[..., 0]
  assert seen.shape == (5, 6) and seen[:4, :4].all() and not seen[4:].any() and not seen[:, 4:].any()
  for a, b in zip(back, maps):
    np.testing.assert_array_equal(np.asarray(a)[:, :4, :4], np.asarray(b)[:, :4, :4])
  merged = decode.merge_views([(maps, np.ones((5, 6, 1), np.float32)), (back, seen[..., None])])
  np.testing.assert_allclose(np.asarray(merged.heatmap), np.asarray(maps.heatmap), rtol=1e-6)  # equal views
  assert decode.shift_views(0) == ((0, 0),) and len(set(decode.shift_views(2))) == 5
