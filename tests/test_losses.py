"""losses: pos_weight rule, zero on perfect maps, monotone in error, masking, finite grads, paper variant, golden."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ccfnet_jax import losses, objects, targets
from ccfnet_jax.maps import Maps

K = 11
HW = (64, 64)
STRIDE = 16


def _setup(seed=0, batch=2, stride=STRIDE):
  rng = np.random.default_rng(seed)
  points = (rng.uniform(0.05, 0.95, (batch, K, 2)) * np.array([HW[1], HW[0]])).astype(np.float32)
  valid = np.ones((batch, K), bool)
  disease = rng.integers(0, 2, (batch, K))
  return points, valid, disease, targets.encode(points, valid, HW, stride, disease=disease)


def _perturbed(t, scale, seed=1):
  rng = np.random.default_rng(seed)
  noise = [rng.normal(size=t.maps.heatmap.shape).astype(np.float32) for _ in range(3)]
  logits = rng.normal(size=t.maps.heatmap.shape).astype(np.float32)
  return Maps(t.maps.heatmap + scale * noise[0], t.maps.offset_y + scale * noise[1],
              t.maps.offset_x + scale * noise[2], logits)


def _softplus(z):
  return np.logaddexp(0.0, z)


def test_class_balanced_pos_weight_reproduces_the_reference():
  np.testing.assert_allclose(losses.class_balanced_pos_weight(191, 814), 0.23463427, rtol=1e-7)
  np.testing.assert_allclose(losses.class_balanced_pos_weight(574, 632), 0.90498486, rtol=1e-7)
  np.testing.assert_allclose(losses.REFERENCE_POS_WEIGHT, (0.23463427, 0.90498486), rtol=1e-7)
  np.testing.assert_allclose(losses.class_balanced_pos_weight(50, 50), 1.0, rtol=1e-3)  # balanced (up to the 1e-5s)
  assert losses.class_balanced_pos_weight(10, 1) > 1.0 > losses.class_balanced_pos_weight(1, 10)
  with pytest.raises(ValueError, match=">= 0"):
    losses.class_balanced_pos_weight(-1, 3)


def test_pos_weight_from_labels_counts_each_group():
  disease = np.full((4, K), -1)
  disease[:3, 0] = [0, 0, 1]  # vertebrae: 2 negatives, 1 positive
  disease[:, 6] = [1, 1, 1, 0]  # discs: 1 negative, 3 positives (label > 0 = diseased)
  disease[0, 7] = 1
  vertebra, disc = losses.pos_weight_from_labels(disease)
  assert vertebra == losses.class_balanced_pos_weight(2, 1)
  assert disc == losses.class_balanced_pos_weight(1, 4)


@pytest.mark.parametrize("loss_fn", [losses.reference_loss, losses.paper_loss])
def test_zero_on_perfect_maps_whatever_the_logits(loss_fn):
  _, _, disease, t = _setup()
  pred = _perturbed(t, 0.0)
  total, parts = loss_fn(pred, t, disease, losses.REFERENCE_POS_WEIGHT)
  for name in ("heatmap", "offset_y", "offset_x"):
    assert float(parts[name]) == 0.0
  assert float(parts["bce_vertebra"]) > 0 and float(parts["bce_disc"]) > 0
  np.testing.assert_allclose(float(total), 0.001 * float(parts["bce_vertebra"] + parts["bce_disc"]), rtol=1e-6)


@pytest.mark.parametrize("loss_fn", [losses.reference_loss, losses.paper_loss])
def test_grows_with_error(loss_fn):
  _, _, disease, t = _setup()
  values = [loss_fn(_perturbed(t, scale), t, disease)[1] for scale in (0.05, 0.1, 0.3, 1.0, 3.0)]
  for name in ("heatmap", "offset_y", "offset_x"):
    series = [float(v[name]) for v in values]
    assert all(a < b for a, b in zip(series, series[1:])), (name, series)


def test_reference_terms_by_hand():
  """Offsets averaged over ALL positions; BCE at the target peak cell with pos_weight, averaged per group."""
  _, _, _, t = _setup(seed=3, batch=1)
  n_positions = np.prod(t.maps.heatmap.shape)
  pred = Maps(t.maps.heatmap + 0.5, t.maps.offset_y + 0.5, t.maps.offset_x - 3.0, jnp.full(t.maps.heatmap.shape, -4.0))
  peak = np.asarray(t.peak_cell)[0]
  logits = np.asarray(pred.logits).copy()
  logits[0, peak[0, 0], peak[0, 1], 0] = 1.5  # vertebra L1, positive
  logits[0, peak[5, 0], peak[5, 1], 5] = -2.0  # disc T12-L1, negative
  disease = np.full((1, K), -1)
  disease[0, 0], disease[0, 1], disease[0, 5] = 1, 0, 0  # L2 negative, logit -4
  pos_weight = (0.3, 2.0)
  _, parts = losses.reference_loss(pred._replace(logits=logits), t, disease, pos_weight)
  n_masked = int(np.sum(np.asarray(t.maps.heatmap) >= 0.4))
  np.testing.assert_allclose(float(parts["heatmap"]), 0.25, rtol=1e-6)
  np.testing.assert_allclose(float(parts["offset_y"]), 0.125 * n_masked / n_positions, rtol=1e-6)
  np.testing.assert_allclose(float(parts["offset_x"]), 2.5 * n_masked / n_positions, rtol=1e-6)
  expected_vertebra = (0.3 * -np.log(1 / (1 + np.exp(-1.5))) + -np.log(1 - 1 / (1 + np.exp(4.0)))) / 2
  np.testing.assert_allclose(float(parts["bce_vertebra"]), expected_vertebra, rtol=1e-5)
  np.testing.assert_allclose(float(parts["bce_disc"]), -np.log(1 - 1 / (1 + np.exp(2.0))), rtol=1e-5)


def test_paper_variant_averages_over_the_mask():
  # every point exactly at a cell centre, away from the borders: the mask H >= 0.6 is the centre + 4 neighbours
  points = np.zeros((1, K, 2), np.float32)
  points[0, :, 0] = 24.0 + 16.0 * (np.arange(K) % 2)
  points[0, :, 1] = 24.0
  valid = np.ones((1, K), bool)
  t = targets.encode(points, valid, HW, STRIDE)
  disease = np.zeros((1, K), int)
  disease[0, objects.VERTEBRA_INDICES[0]] = 1
  logits = np.full(t.maps.heatmap.shape, -1.0, np.float32)
  logits[0, 1, 1, 0::2] = 2.0  # at the peak cell of the even objects (x = 24); odd ones (x = 40) stay at -1
  pred = Maps(t.maps.heatmap, t.maps.offset_y + 0.5, t.maps.offset_x, logits)
  pos_weight = (0.5, 1.5)
  _, paper = losses.paper_loss(pred, t, disease, pos_weight)
  _, reference = losses.reference_loss(pred, t, disease, pos_weight)
  np.testing.assert_allclose(float(paper["offset_y"]), 0.125, rtol=1e-6)  # mean over the masked positions
  np.testing.assert_allclose(float(reference["offset_y"]), 0.125 * 5 * K / np.prod(logits.shape), rtol=1e-6)
  # vertebrae: L1 (positive, peak logit 2 + 4 cells at -1), L3, L5 (negative, same), L2, L4 (negative, all -1)
  pos = 0.5 * _softplus(-np.array([2.0, -1.0, -1.0, -1.0, -1.0]))
  neg_even = _softplus(np.array([2.0, -1.0, -1.0, -1.0, -1.0]))
  neg_odd = _softplus(np.full(5, -1.0))
  np.testing.assert_allclose(float(paper["bce_vertebra"]),
                             (pos.sum() + 2 * neg_even.sum() + 2 * neg_odd.sum()) / 25, rtol=1e-5)
  np.testing.assert_allclose(float(reference["bce_vertebra"]),
                             (0.5 * _softplus(-2.0) + 2 * _softplus(2.0) + 2 * _softplus(-1.0)) / 5, rtol=1e-5)
  # discs 5..10: objects 6, 8, 10 are even (peak logit 2), all negative
  np.testing.assert_allclose(float(paper["bce_disc"]), (3 * neg_even.sum() + 3 * neg_odd.sum()) / 30, rtol=1e-5)


@pytest.mark.parametrize("loss_fn", [losses.reference_loss, losses.paper_loss])
def test_absent_points_and_unknown_labels_contribute_nothing(loss_fn):
  points, valid, disease, _ = _setup(seed=5)
  points[0, 2] = np.nan
  valid[0, 2] = valid[1, 8] = False
  disease[0, 2] = disease[1, 8] = -1
  disease[1, 4] = -1  # present, label unknown
  t = targets.encode(points, valid, HW, STRIDE, disease=disease)
  pred = _perturbed(t, 0.3)
  base_total, base_parts = loss_fn(pred, t, disease)
  rng = np.random.default_rng(8)
  changed = [np.asarray(m).copy() for m in pred]
  for m in changed:
    m[0, ..., 2] = rng.normal(size=m.shape[1:3]) * 10  # anything at the absent objects
    m[1, ..., 8] = rng.normal(size=m.shape[1:3]) * 10
  changed[3][1, ..., 4] = 50.0  # logits of the unknown label
  total, parts = loss_fn(Maps(*changed), t, disease)
  assert float(total) == float(base_total)
  for name in parts:
    assert float(parts[name]) == float(base_parts[name]), name
  # absent points do change the as-coded reference (it forgets them), present-only data does not
  if loss_fn is losses.reference_loss:
    as_coded, _ = losses.reference_loss(Maps(*changed), t, disease, mask_absent=False)
    assert float(as_coded) != float(total)
    _, _, disease_all, t_all = _setup(seed=6)
    pred_all = _perturbed(t_all, 0.3)
    np.testing.assert_allclose(float(losses.reference_loss(pred_all, t_all, disease_all)[0]),
                               float(losses.reference_loss(pred_all, t_all, disease_all, mask_absent=False)[0]),
                               rtol=1e-6)


@pytest.mark.parametrize("loss_fn", [losses.reference_loss, losses.paper_loss])
def test_gradients_finite_with_no_known_label_and_absent_points(loss_fn):
  points, valid, _, _ = _setup(seed=7)
  points[:, 3] = np.nan
  valid[:, 3] = False
  disease = np.full((2, K), -1)  # no known label at all
  t = targets.encode(points, valid, HW, STRIDE, disease=disease)
  pred = _perturbed(t, 0.5)._replace(logits=jnp.full(t.maps.heatmap.shape, 80.0))

  def total(p):
    return loss_fn(p, t, disease)[0]

  value, grads = jax.jit(jax.value_and_grad(total))(pred)
  assert np.isfinite(float(value))
  for g in grads:
    assert np.all(np.isfinite(np.asarray(g)))
  assert np.all(np.asarray(grads.logits) == 0.0)
  np.testing.assert_allclose(float(value), float(total(pred)), rtol=1e-6)  # jit == eager
  # all points absent: a zero loss with zero (finite) gradients
  t_none = targets.encode(points, np.zeros_like(valid), HW, STRIDE)
  value, grads = jax.value_and_grad(lambda p: loss_fn(p, t_none, disease)[0])(pred)
  assert float(value) == 0.0 and all(np.all(np.asarray(g) == 0.0) for g in grads)


def test_bce_is_stable_for_large_logits():
  _, _, disease, t = _setup(seed=9)
  disease[:] = 1
  for value in (-200.0, 200.0):
    pred = Maps(t.maps.heatmap, t.maps.offset_y, t.maps.offset_x, jnp.full(t.maps.heatmap.shape, value))
    _, parts = losses.reference_loss(pred, t, disease, (1.0, 1.0))
    expected = 200.0 if value < 0 else 0.0
    np.testing.assert_allclose(float(parts["bce_vertebra"]), expected, atol=1e-6)


def test_loss_works_at_other_strides():
  for stride in (4, 32):
    _, _, disease, t = _setup(seed=10, stride=stride)
    assert t.maps.heatmap.shape[1] == HW[0] // stride
    _, parts = losses.reference_loss(_perturbed(t, 0.0), t, disease)
    assert float(parts["heatmap"]) == 0.0 and float(parts["offset_x"]) == 0.0


def test_shape_errors():
  _, _, disease, t = _setup()
  with pytest.raises(ValueError, match="one shape"):
    losses.reference_loss(Maps(*(m[:, :2] for m in t.maps)), t, disease)
  with pytest.raises(ValueError, match="disease"):
    losses.paper_loss(t.maps, t, disease[:, :5])


@pytest.mark.parametrize("golden", ["golden_r18_msc", "golden_r50_msc"])
def test_golden_reference_loss(shared_dir, golden):
  io = np.load(shared_dir / "reference" / golden / "io.npz")
  pred = Maps(*(io[f"case0_{name}"] for name in Maps._fields))
  gt_xy = io["loss_gt_xy"]
  t = targets.encode(gt_xy, np.ones(gt_xy.shape[:2], bool), (256, 256), stride=16)
  pos_weight = (float(io["loss_pos_weight_vertebra"][0]), float(io["loss_pos_weight_disc"][0]))
  np.testing.assert_allclose(pos_weight, losses.REFERENCE_POS_WEIGHT, rtol=1e-6)
  for case in ("known", "unknown"):
    raw = io[f"loss_{case}_labels"]
    disease = np.where(raw < 0, -1, (raw >= 1).astype(int))  # raw class labels: >= 1 is diseased
    for mask_absent in (True, False):
      total, _ = losses.reference_loss(pred, t, disease, pos_weight, mask_absent=mask_absent)
      np.testing.assert_allclose(float(total), float(io[f"loss_{case}_value"]), rtol=1e-5)


@pytest.mark.parametrize("loss_fn", [losses.reference_loss, losses.paper_loss])
def test_each_weight_scales_its_own_term(loss_fn):
  _, _, disease, t = _setup(seed=11)
  pred = _perturbed(t, 0.3)
  base_total, parts = loss_fn(pred, t, disease)
  for name in losses.LOSS_WEIGHTS:
    weights = dict(losses.LOSS_WEIGHTS)
    weights[name] += 3.0
    total, new_parts = loss_fn(pred, t, disease, weights=weights)
    np.testing.assert_allclose(float(total) - float(base_total), 3.0 * float(parts[name]), rtol=1e-4, atol=1e-7)
    for key in parts:
      assert float(new_parts[key]) == float(parts[key])  # the parts are the unweighted terms
  zero = dict.fromkeys(losses.LOSS_WEIGHTS, 0.0)
  assert float(loss_fn(pred, t, disease, weights=zero)[0]) == 0.0
  with pytest.raises(ValueError, match="exactly the terms"):
    loss_fn(pred, t, disease, weights={"heatmap": 1.0})
  with pytest.raises(ValueError, match=">= 0"):
    loss_fn(pred, t, disease, weights={**losses.LOSS_WEIGHTS, "bce_disc": -1.0})


def test_region_disease_term_averages_the_bce_over_the_paper_region():
  """`disease_region='region'`: the reference loss's BCE is the paper's (same cells, same mean); its localisation
  terms stay the reference's."""
  _, _, disease, t = _setup(seed=12)
  disease[0, 3] = -1  # one unknown label
  pred = _perturbed(t, 0.3)
  _, region = losses.reference_loss(pred, t, disease, (0.4, 1.7), disease_region="region")
  _, peak = losses.reference_loss(pred, t, disease, (0.4, 1.7))
  _, paper = losses.paper_loss(pred, t, disease, (0.4, 1.7))
  for name in ("bce_vertebra", "bce_disc"):
    np.testing.assert_allclose(float(region[name]), float(paper[name]), rtol=1e-6)
    assert abs(float(region[name]) - float(peak[name])) > 1e-3  # random logits: the cells around the peak differ
  for name in ("heatmap", "offset_y", "offset_x"):
    assert float(region[name]) == float(peak[name])
  # by hand for one group: softplus terms over the cells H >= 0.6 of the objects with a known label
  mask = np.asarray(t.maps.heatmap) >= targets.PAPER_MASK_THRESHOLD
  z = np.asarray(pred.logits)
  total, count = 0.0, 0
  for b in range(disease.shape[0]):
    for k in objects.DISC_INDICES:
      if disease[b, k] < 0:
        continue
      cells = z[b][..., k][mask[b][..., k]]
      total += np.sum(1.7 * _softplus(-cells) if disease[b, k] > 0 else _softplus(cells))
      count += cells.size
  np.testing.assert_allclose(float(region["bce_disc"]), total / count, rtol=1e-5)
  with pytest.raises(ValueError, match="disease_region"):
    losses.reference_loss(pred, t, disease, disease_region="everywhere")
