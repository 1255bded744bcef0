"""metrics: hit radius in mm with anisotropic spacing, recall, rank AUC with ties, score units, fold summary."""

import itertools

import numpy as np
import pytest

from ccfnet_jax import metrics, objects

K = 11
V0 = objects.VERTEBRA_INDICES[0]
D0 = objects.DISC_INDICES[0]


def _brute_force_auc(scores, labels):
  pos = [s for s, y in zip(scores, labels) if y]
  neg = [s for s, y in zip(scores, labels) if not y]
  wins = sum(1.0 if p > n else 0.5 if p == n else 0.0 for p, n in itertools.product(pos, neg))
  return wins / (len(pos) * len(neg))


def _study(n=1):
  """Ground truth on a grid, perfect predictions, labels alternating 0/1 within each group."""
  gt = np.stack(np.meshgrid(np.arange(K) * 20.0 + 50.0, np.arange(n) * 3.0 + 100.0), -1).astype(np.float64)
  valid = np.ones((n, K), bool)
  disease = np.tile(np.array([0, 1, 0, 1, 0, 0, 1, 0, 1, 0, 1]), (n, 1))
  return gt, valid, disease


def test_roc_auc_known_values():
  assert metrics.roc_auc([0.1, 0.2, 0.8, 0.9], [0, 0, 1, 1]) == 1.0
  assert metrics.roc_auc([0.9, 0.8, 0.2, 0.1], [0, 0, 1, 1]) == 0.0
  assert metrics.roc_auc([0.5, 0.5, 0.5], [0, 1, 1]) == 0.5
  # pairs (pos, neg): (0.4 vs 0.1) win, (0.4 vs 0.4) tie, (0.35 vs 0.1) win, (0.35 vs 0.4) loss -> 2.5 / 4
  assert metrics.roc_auc([0.1, 0.4, 0.35, 0.4], [0, 0, 1, 1]) == 0.625


def test_roc_auc_matches_pair_count_with_ties():
  rng = np.random.default_rng(0)
  for _ in range(20):
    n = int(rng.integers(2, 40))
    scores = np.round(rng.random(n), 1)  # many ties
    labels = rng.integers(0, 2, n)
    labels[:2] = [0, 1]
    assert metrics.roc_auc(scores, labels) == pytest.approx(_brute_force_auc(scores, labels), abs=1e-12)


def test_roc_auc_one_class_is_zero_with_warning():
  with pytest.warns(metrics.MetricWarning, match="positives"):
    assert metrics.roc_auc([0.2, 0.7], [1, 1]) == 0.0
  with pytest.warns(metrics.MetricWarning):
    assert metrics.roc_auc([], []) == 0.0
  with pytest.raises(ValueError, match="finite"):
    metrics.roc_auc([0.1, np.nan], [0, 1])


def test_hit_radius_is_6_mm_inclusive():
  gt, valid, disease = _study()
  pred = gt.copy()
  pred[0, 0, 0] += 5.9  # 5.9 mm: hit
  pred[0, 1, 1] -= 6.1  # 6.1 mm: miss
  pred[0, 2, 0] += 6.0  # exactly 6.0 mm: hit (inclusive)
  pred[0, 3] += [3.6, 4.9]  # 6.07 mm: miss
  pred[0, D0] += [-4.3, 4.3]  # 6.08 mm: miss
  spacing = np.array([[1.0, 1.0]])
  with pytest.warns(metrics.MetricWarning):  # the 3 hit vertebrae are all normal: one class
    result = metrics.evaluate(pred, np.full((1, K), 0.5), gt, valid, disease, spacing)
  assert result["vertebra_recall"] == pytest.approx(100.0 * 3 / 5)
  assert result["disc_recall"] == pytest.approx(100.0 * 5 / 6)
  np.testing.assert_allclose(metrics.distances_mm(pred, gt, spacing)[0, :4], [5.9, 6.1, 6.0, np.hypot(3.6, 4.9)])


def test_anisotropic_spacing_row_col_order():
  """PixelSpacing is [row, col]: x distances use the column spacing, y distances the row spacing."""
  gt, valid, disease = _study()
  pred = gt.copy()
  pred[0, 0, 0] += 6.0  # 6 px in x * 1.1 mm = 6.6 mm: miss
  pred[0, 1, 1] += 6.0  # 6 px in y * 0.9 mm = 5.4 mm: hit
  spacing = np.array([[0.9, 1.1]])
  np.testing.assert_allclose(metrics.distances_mm(pred, gt, spacing)[0, :2], [6.6, 5.4])
  result = metrics.evaluate(pred, np.full((1, K), 0.5), gt, valid, disease, spacing)
  assert result["vertebra_recall"] == pytest.approx(80.0)
  swapped = metrics.evaluate(pred, np.full((1, K), 0.5), gt, valid, disease, spacing[:, ::-1])
  assert swapped["vertebra_recall"] == pytest.approx(80.0)  # now the y point misses and the x point hits
  assert metrics.distances_mm(pred, gt, spacing[:, ::-1])[0, 0] == pytest.approx(5.4)


def test_auc_over_hit_points_with_known_labels_and_score_units():
  gt, valid, disease = _study(n=2)
  pred = gt.copy()
  prob = np.where(disease == 1, 0.9, 0.2)  # perfect ranking
  # vertebrae: a wrongly ranked point that misses is left out of the AUC; an unknown label likewise
  prob[0, V0] = 0.99  # label 0, ranked above every positive ...
  pred[0, V0, 0] += 20.0  # ... but a miss
  prob[1, V0] = 0.99
  disease[1, V0] = -1  # unknown label (point present: it still counts for recall)
  # discs: reversed ranking of one pair -> AUC from the pair count
  prob[0, D0] = 0.95  # a negative above all positives
  result = metrics.evaluate(pred, prob, gt, valid, disease, np.ones((2, 2)))
  assert result["vertebra_recall"] == pytest.approx(90.0)
  assert result["vertebra_auc"] == pytest.approx(100.0)
  hit = np.ones((2, K), bool)
  disc_idx = list(objects.DISC_INDICES)
  expected_disc_auc = _brute_force_auc(prob[:, disc_idx][hit[:, disc_idx]], disease[:, disc_idx][hit[:, disc_idx]])
  assert result["disc_auc"] == pytest.approx(100.0 * expected_disc_auc)
  assert result["disc_recall"] == 100.0
  expected_score = (90.0 + 100.0) / 2 * (100.0 + 100.0 * expected_disc_auc) / 2 / 100.0
  assert result["score"] == pytest.approx(expected_score)
  assert list(result) == ["disc_recall", "vertebra_recall", "disc_auc", "vertebra_auc", "score"]


def test_score_example_in_percent():
  """Recall 90 % and AUC 90 % give a score of 81 (the paper's scale: 80.50 for CCF-Net R18-MSC)."""
  n = 10
  gt = np.zeros((n, K, 2)) + 100.0
  valid = np.ones((n, K), bool)
  pred = gt.copy()
  pred[0, :, 0] += 50.0  # the first study misses everything: recall 90 %
  disease = np.zeros((n, K), int)
  disease[1:6] = 1
  prob = np.zeros((n, K))
  # per group over the 9 hit studies: 5 positives (studies 1..5), 4 negatives (6..9), 2 of the 20 pairs
  # wrongly ordered: AUC 18 / 20 = 90 %
  prob[1:6] = np.array([0.9, 0.8, 0.7, 0.6, 0.3])[:, None]
  prob[6:10] = np.array([0.5, 0.4, 0.2, 0.1])[:, None]
  result = metrics.evaluate(pred, prob, gt, valid, disease, np.ones((n, 2)))
  assert result["disc_recall"] == result["vertebra_recall"] == pytest.approx(90.0)
  assert result["disc_auc"] == result["vertebra_auc"] == pytest.approx(90.0)
  assert result["score"] == pytest.approx(81.0)


def test_one_class_group_gives_zero_auc_with_warning():
  gt, valid, disease = _study()
  disease[:, list(objects.VERTEBRA_INDICES)] = 1
  with pytest.warns(metrics.MetricWarning):
    result = metrics.evaluate(gt, np.full((1, K), 0.5), gt, valid, disease, np.ones((1, 2)))
  assert result["vertebra_auc"] == 0.0 and result["disc_auc"] == 50.0
  assert result["score"] == pytest.approx(100.0 * 25.0 / 100.0)


def test_invalid_points_are_ignored_and_bad_input_raises():
  gt, valid, disease = _study()
  pred = gt.copy()
  valid[0, V0] = False
  gt[0, V0] = np.nan  # absent ground truth may hold anything
  pred[0, V0] = 1e6
  result = metrics.evaluate(pred, np.full((1, K), 0.5), gt, valid, disease, np.ones((1, 2)))
  assert result["vertebra_recall"] == 100.0
  with pytest.raises(ValueError, match="pred_prob"):
    metrics.evaluate(pred, np.full((1, 5), 0.5), gt, valid, disease, np.ones((1, 2)))
  with pytest.raises(ValueError, match="pixel_spacing_mm"):
    metrics.evaluate(pred, np.full((1, K), 0.5), gt, valid, disease, np.ones((2,)))
  with pytest.raises(ValueError, match="pixel_spacing_mm"):
    metrics.evaluate(pred, np.full((1, K), 0.5), gt, valid, disease, np.zeros((1, 2)))
  pred[0, 3] = np.nan
  with pytest.raises(ValueError, match="pred_xy"):
    metrics.evaluate(pred, np.full((1, K), 0.5), gt, valid, disease, np.ones((1, 2)))


def test_summarize_folds_ddof0():
  folds = [{"score": 70.0, "disc_auc": 1.0}, {"score": 80.0, "disc_auc": 3.0}, {"score": 90.0, "disc_auc": 2.0}]
  mean, std = metrics.summarize_folds(folds)
  assert mean == {"score": 80.0, "disc_auc": 2.0}
  assert std["score"] == pytest.approx(np.sqrt(200.0 / 3.0))  # ddof 0: sqrt((100 + 0 + 100) / 3)
  assert std["disc_auc"] == pytest.approx(np.sqrt(2.0 / 3.0))
  with pytest.raises(ValueError, match="fold 1"):
    metrics.summarize_folds([{"score": 1.0}, {"auc": 1.0}])
  with pytest.raises(ValueError):
    metrics.summarize_folds([])


def test_metrics_module_imports_no_jax():
  import ast
  import inspect
  tree = ast.parse(inspect.getsource(metrics))
  imported = {alias.name.split(".")[0] for node in ast.walk(tree) if isinstance(node, (ast.Import, ast.ImportFrom))
              for alias in node.names} | {node.module.split(".")[0] for node in ast.walk(tree)
                                          if isinstance(node, ast.ImportFrom) and node.module}
  assert not imported & {"jax", "flax"}
