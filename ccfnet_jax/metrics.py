"""The paper's evaluation metric (docs/method.md#metric), host side: numpy only (no JAX, no Flax, no I/O).

All coordinates are ORIGINAL (native) pixels with the native DICOM PixelSpacing `[row, col]` mm of the slice.
Results are percentages: recalls and AUCs in %, and `score = 100 * mean(recalls) * mean(AUCs)` with the recalls
and AUCs taken as fractions (e.g. recall 0.9 and AUC 0.894 give a score of 80.46).
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence

import numpy as np

from ccfnet_jax import objects

HIT_DISTANCE_MM: float = 6.0
"""A predicted point within this distance (inclusive) of the ground truth is a hit."""

METRIC_NAMES: tuple[str, ...] = ("disc_recall", "vertebra_recall", "disc_auc", "vertebra_auc", "score")



class MetricWarning(UserWarning):
  """A metric was set to 0 because it is undefined (one class only, or no points)."""


def roc_auc(scores: np.ndarray, labels: np.ndarray) -> float:
  """ROC-AUC as the Mann-Whitney rank statistic, ties counted one half (average ranks).

  AUC = (sum of the positives' ranks - n1 (n1 + 1) / 2) / (n1 n0) = P(score_pos > score_neg) + P(tie) / 2.

  Args:
    scores: `[N]` float, higher = more likely positive.
    labels: `[N]` binary (1 positive, 0 negative; any value > 0 counts as positive).
  Returns:
    AUC in [0, 1]; 0.0 with a `MetricWarning` when only one class (or nothing) is present, as the reference.
  """
  scores = np.asarray(scores, dtype=np.float64).reshape(-1)
  labels = np.asarray(labels).reshape(-1)
  if scores.shape != labels.shape:
    raise ValueError(f"scores and labels must have the same length, got {scores.shape} and {labels.shape}")
  if not np.all(np.isfinite(scores)):
    raise ValueError("scores must be finite (got NaN or inf)")
  positive = labels > 0
  n_pos = int(np.sum(positive))
  n_neg = positive.size - n_pos
  if n_pos == 0 or n_neg == 0:
    warnings.warn(f"ROC-AUC undefined with {n_pos} positives and {n_neg} negatives: reported as 0", MetricWarning,
                  stacklevel=2)
    return 0.0
  _, inverse, counts = np.unique(scores, return_inverse=True, return_counts=True)
  last_rank = np.cumsum(counts)  # 1-based rank of the last member of each tie group
  average_rank = last_rank - 0.5 * (counts - 1)
  rank_sum_pos = float(np.sum(average_rank[inverse.reshape(-1)][positive]))
  return (rank_sum_pos - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg)


def distances_mm(pred_xy: np.ndarray, gt_xy: np.ndarray, pixel_spacing_mm: np.ndarray) -> np.ndarray:
  """Euclidean distance in mm: `sqrt(((x_gt - x_pred) * col_spacing)^2 + ((y_gt - y_pred) * row_spacing)^2)`.

  Args:
    pred_xy, gt_xy: `[N, 11, 2]` (x, y) native px.
    pixel_spacing_mm: `[N, 2]` (row, col) mm per px (DICOM PixelSpacing order).
  Returns:
    `[N, 11]` mm.
  """
  delta = np.asarray(gt_xy, np.float64) - np.asarray(pred_xy, np.float64)
  spacing = np.asarray(pixel_spacing_mm, np.float64)
  col_spacing, row_spacing = spacing[:, None, 1], spacing[:, None, 0]
  return np.hypot(delta[..., 0] * col_spacing, delta[..., 1] * row_spacing)


def _check_shapes(pred_xy, pred_prob, gt_xy, gt_valid, gt_disease, pixel_spacing_mm) -> None:
  k = objects.NUM_OBJECTS
  n = np.shape(gt_xy)[0] if np.ndim(gt_xy) == 3 else -1
  expected = {
      "pred_xy": (n, k, 2), "pred_prob": (n, k), "gt_xy": (n, k, 2), "gt_valid": (n, k), "gt_disease": (n, k),
      "pixel_spacing_mm": (n, 2),
  }
  given = {
      "pred_xy": pred_xy, "pred_prob": pred_prob, "gt_xy": gt_xy, "gt_valid": gt_valid, "gt_disease": gt_disease,
      "pixel_spacing_mm": pixel_spacing_mm,
  }
  for name, shape in expected.items():
    if np.shape(given[name]) != shape:
      raise ValueError(f"metrics.evaluate: {name} must have shape {shape} ([N studies, 11 objects, ...]), "
                       f"got {np.shape(given[name])}")
  if np.any(np.asarray(pixel_spacing_mm) <= 0) or not np.all(np.isfinite(pixel_spacing_mm)):
    raise ValueError("metrics.evaluate: pixel_spacing_mm must be finite and positive")
  valid = np.asarray(gt_valid, bool)
  for name in ("pred_xy", "gt_xy"):
    if not np.all(np.isfinite(np.asarray(given[name], np.float64)[valid])):
      raise ValueError(f"metrics.evaluate: {name} must be finite at the valid points")


def evaluate(pred_xy: np.ndarray,
             pred_prob: np.ndarray,
             gt_xy: np.ndarray,
             gt_valid: np.ndarray,
             gt_disease: np.ndarray,
             pixel_spacing_mm: np.ndarray,
             max_distance_mm: float = HIT_DISTANCE_MM) -> dict[str, float]:
  """The paper's metric over N studies (docs/method.md#metric), in %.

  A point is a hit if its distance to the ground truth is <= `max_distance_mm`. Recall = hits / valid ground-truth
  points, per group. AUC = `roc_auc` of `pred_prob` against the binary label over the hit points with a known label
  (`gt_disease >= 0`), per group (0 with a warning when one class only).
  `score = mean(disc_recall, vertebra_recall) * mean(disc_auc, vertebra_auc) / 100` (all in %).

  Args:
    pred_xy: `[N, 11, 2]` predicted (x, y) native px.
    pred_prob: `[N, 11]` predicted disease probability.
    gt_xy: `[N, 11, 2]` ground-truth (x, y) native px.
    gt_valid: `[N, 11]` bool, the ground-truth point is present.
    gt_disease: `[N, 11]` int binary label (1, 0, -1 unknown).
    pixel_spacing_mm: `[N, 2]` (row, col) mm per native px.
    max_distance_mm: hit radius (6 mm).
  Returns:
    dict with `disc_recall, vertebra_recall, disc_auc, vertebra_auc, score`, floats in %.
  """
  _check_shapes(pred_xy, pred_prob, gt_xy, gt_valid, gt_disease, pixel_spacing_mm)
  valid = np.asarray(gt_valid, bool)
  disease = np.asarray(gt_disease)
  prob = np.asarray(pred_prob, np.float64)
  with np.errstate(invalid="ignore"):  # invalid points may hold NaN coordinates; they are masked out below
    hit = valid & (distances_mm(pred_xy, gt_xy, pixel_spacing_mm) <= max_distance_mm)
  result = {}
  for group in ("disc", "vertebra"):  # the order of METRIC_NAMES
    idx = list(objects.GROUPS[group])
    n_valid = int(np.sum(valid[:, idx]))
    if n_valid == 0:
      warnings.warn(f"no valid {group} ground-truth point: {group}_recall reported as 0", MetricWarning, stacklevel=2)
    result[f"{group}_recall"] = 100.0 * float(np.sum(hit[:, idx])) / max(n_valid, 1)
    scored = hit[:, idx] & (disease[:, idx] >= 0)
    result[f"{group}_auc"] = 100.0 * roc_auc(prob[:, idx][scored], disease[:, idx][scored] > 0)
  mean_recall = 0.5 * (result["disc_recall"] + result["vertebra_recall"])
  mean_auc = 0.5 * (result["disc_auc"] + result["vertebra_auc"])
  result["score"] = mean_recall * mean_auc / 100.0
  return {name: result[name] for name in METRIC_NAMES}


def summarize_folds(fold_metrics: Sequence[Mapping[str, float]]) -> tuple[dict[str, float], dict[str, float]]:
  """Mean and standard deviation (ddof 0) of each metric over folds.

  Args:
    fold_metrics: one dict per fold (e.g. from `evaluate`), all with the same keys.
  Returns:
    (mean dict, std dict) with those keys.
  """
  if not fold_metrics:
    raise ValueError("summarize_folds needs at least one fold")
  keys = list(fold_metrics[0])
  for i, fold in enumerate(fold_metrics):
    if set(fold) != set(keys):
      raise ValueError(f"summarize_folds: fold {i} has keys {sorted(fold)}, fold 0 has {sorted(keys)}")
  values = {key: np.asarray([float(fold[key]) for fold in fold_metrics]) for key in keys}
  mean = {key: float(np.mean(v)) for key, v in values.items()}
  std = {key: float(np.std(v, ddof=0)) for key, v in values.items()}
  return mean, std
