"""CCF-Net training losses (docs/method.md#losses): the reference code's loss (default) and the paper's variant.

Pure jnp: no Flax, no I/O; jit/vmap/grad-able. Both losses take the predicted `Maps [B, h, w, 11]`, the `Targets`
from `ccfnet_jax.targets.encode` (any stride), the disease labels `[B, 11]` (1 diseased, 0 normal, -1 unknown) and
`pos_weight = (vertebra, disc)`, and return `(total, parts)` where `parts` holds the unweighted terms
`heatmap, offset_y, offset_x, bce_vertebra, bce_disc` and `total = sum(LOSS_WEIGHTS[k] * parts[k])`.

Missing points and unknown labels contribute nothing (a term with nothing to average is 0, with finite gradients).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from ccfnet_jax import decode, objects
from ccfnet_jax import targets as targets_lib
from ccfnet_jax.maps import Maps

LOSS_WEIGHTS: Mapping[str, float] = {
    "heatmap": 1.0, "offset_y": 2.0, "offset_x": 2.0, "bce_vertebra": 0.001, "bce_disc": 0.001,
}
"""Weights of the loss terms (the reference's)."""

DISEASE_REGIONS: tuple[str, ...] = ("peak", "region")
"""Where the reference loss reads the disease logit: the target peak cell (the reference) or the paper's region
{target heatmap >= 0.6} (docs/recipe.md#disease-region)."""

REFERENCE_LABEL_COUNTS: Mapping[str, tuple[int, int]] = {"vertebra": (191, 814), "disc": (574, 632)}
"""(n_neg, n_pos) per group in the reference's training labels (its pos_weight; the golden vectors use it)."""


def class_balanced_pos_weight(n_neg: float, n_pos: float) -> float:
  """BCE pos_weight by the reference's "effective number" rule (docs/method.md#losses).

  `E(n) = (1 - b^n) / (1 - b)` with `b = (n - 1) / n` (E(0) = 0), `w(n) = 1 / (E(n) + 1e-5)`,
  `pos_weight = w(n_pos) / (w(n_neg) + 1e-5)`. E.g. (n_neg, n_pos) = (191, 814) -> 0.23463427, (574, 632) -> 0.90498486.

  Args:
    n_neg: number of negative (normal, label 0) examples of the group in the training data.
    n_pos: number of positive (diseased, label 1) examples.
  """
  def effective_number(n: float) -> float:
    if n < 0:
      raise ValueError(f"label counts must be >= 0, got {n}")
    if n == 0:
      return 0.0
    beta = (n - 1.0) / n
    return float(n) if beta == 0.0 else (1.0 - beta ** n) / (1.0 - beta)

  def weight(n: float) -> float:
    return 1.0 / (effective_number(float(n)) + 1e-5)

  return weight(n_pos) / (weight(n_neg) + 1e-5)


REFERENCE_POS_WEIGHT: tuple[float, float] = (
    class_balanced_pos_weight(*REFERENCE_LABEL_COUNTS["vertebra"]),
    class_balanced_pos_weight(*REFERENCE_LABEL_COUNTS["disc"]),
)
"""(vertebra, disc) pos_weight of the reference: 0.23463427, 0.90498486."""


def label_counts(disease: np.ndarray) -> dict[str, tuple[int, int]]:
  """{'vertebra': (n_neg, n_pos), 'disc': (n_neg, n_pos)} of binary labels `disease [N, 11]` (-1 unknown: skipped)."""
  disease = np.asarray(disease)
  if disease.ndim != 2 or disease.shape[1] != objects.NUM_OBJECTS:
    raise ValueError(f"disease must be [N, {objects.NUM_OBJECTS}], got shape {disease.shape}")
  counts = {}
  for group, indices in objects.GROUPS.items():
    labels = disease[:, list(indices)]
    counts[group] = (int(np.sum(labels == 0)), int(np.sum(labels > 0)))
  return counts


def pos_weight_from_counts(counts: Mapping[str, tuple[int, int]]) -> tuple[float, float]:
  """(vertebra, disc) pos_weight from `label_counts`."""
  return class_balanced_pos_weight(*counts["vertebra"]), class_balanced_pos_weight(*counts["disc"])


def pos_weight_from_labels(disease: np.ndarray) -> tuple[float, float]:
  """(vertebra, disc) pos_weight from a training fold's binary labels `disease [N, 11]` (1, 0, -1 unknown: skipped)."""
  return pos_weight_from_counts(label_counts(disease))


def smooth_l1(pred: jnp.ndarray, target: jnp.ndarray, beta: float = 1.0) -> jnp.ndarray:
  """Elementwise smooth-L1 (Huber / beta): 0.5 d^2 / beta where |d| < beta, else |d| - 0.5 beta."""
  diff = jnp.abs(pred - target)
  return jnp.where(diff < beta, 0.5 * diff * diff / beta, diff - 0.5 * beta)


def bce_with_logits(logits: jnp.ndarray, label: jnp.ndarray, pos_weight: jnp.ndarray) -> jnp.ndarray:
  """Elementwise numerically stable `-(pos_weight * y * log sigmoid(z) + (1 - y) * log(1 - sigmoid(z)))`."""
  return pos_weight * label * jax.nn.softplus(-logits) + (1.0 - label) * jax.nn.softplus(logits)


def _safe_mean(total: jnp.ndarray, count: jnp.ndarray) -> jnp.ndarray:
  """total / count, 0 when count is 0 (then total is 0 too); gradients stay finite."""
  return total / jnp.maximum(count, 1.0)


def _group_masks() -> tuple[jnp.ndarray, jnp.ndarray]:
  """`[11]` float masks of the vertebrae and the discs."""
  vertebra = np.zeros(objects.NUM_OBJECTS, np.float32)
  vertebra[list(objects.GROUPS["vertebra"])] = 1.0
  disc = np.zeros(objects.NUM_OBJECTS, np.float32)
  disc[list(objects.GROUPS["disc"])] = 1.0
  return jnp.asarray(vertebra), jnp.asarray(disc)


def _check(pred: Maps, targets: targets_lib.Targets, disease: jnp.ndarray) -> None:
  shapes = {f"pred.{n}": getattr(pred, n).shape for n in Maps._fields}
  shapes.update({f"targets.maps.{n}": getattr(targets.maps, n).shape for n in Maps._fields})
  if len(set(shapes.values())) != 1:
    raise ValueError(f"predicted and target maps must all have one shape [B, h, w, 11], got {shapes}")
  if disease.shape != targets.point_valid.shape:
    raise ValueError(f"disease must be {targets.point_valid.shape} like targets.point_valid, got {disease.shape}")


def _heatmap_term(pred: Maps, targets: targets_lib.Targets, present: jnp.ndarray) -> tuple[jnp.ndarray, jnp.ndarray]:
  """(MSE over the positions of present objects, number of those positions)."""
  h, w = pred.heatmap.shape[-3:-1]
  present_map = present[..., None, None, :].astype(jnp.float32)
  n_positions = jnp.sum(present_map) * (h * w)
  squared = jnp.square(pred.heatmap - targets.maps.heatmap) * present_map
  return _safe_mean(jnp.sum(squared), n_positions), n_positions


def _per_object_pos_weight(pos_weight: jnp.ndarray) -> jnp.ndarray:
  """`[11]` pos_weight of each object from `pos_weight [2]` (vertebra, disc)."""
  vertebra, _ = _group_masks()
  return jnp.where(vertebra > 0, pos_weight[0], pos_weight[1])


def _total(parts: dict[str, jnp.ndarray], weights: Mapping[str, float]) -> jnp.ndarray:
  return sum(weights[name] * value for name, value in parts.items())


def check_weights(weights: Mapping[str, float]) -> dict[str, float]:
  """`weights` as a dict of floats, after checking that it names exactly the terms of `LOSS_WEIGHTS`, each >= 0."""
  weights = {name: float(value) for name, value in dict(weights).items()}
  if set(weights) != set(LOSS_WEIGHTS):
    raise ValueError(f"loss weights must name exactly the terms {sorted(LOSS_WEIGHTS)}, got {sorted(weights)}")
  negative = {name: value for name, value in weights.items() if not value >= 0}
  if negative:
    raise ValueError(f"loss weights must be >= 0, got {negative}")
  return weights


def _peak_disease_terms(pred: Maps, targets: targets_lib.Targets, disease: jnp.ndarray, pos_weight: jnp.ndarray,
                        present: jnp.ndarray) -> dict[str, jnp.ndarray]:
  """bce_vertebra, bce_disc on the logit at each object's target peak cell, averaged over the known labels."""
  known = ((disease >= 0) & present).astype(jnp.float32)  # [B, 11]
  label = (disease > 0).astype(jnp.float32)
  logit = decode.value_at_cell(pred.logits, targets.peak_cell)  # [B, 11]
  bce = bce_with_logits(logit, label, _per_object_pos_weight(pos_weight)) * known
  return {name: _safe_mean(jnp.sum(bce * group), jnp.sum(known * group))
          for name, group in zip(("bce_vertebra", "bce_disc"), _group_masks())}


def _region_disease_terms(pred: Maps, disease: jnp.ndarray, pos_weight: jnp.ndarray,
                          mask: jnp.ndarray) -> dict[str, jnp.ndarray]:
  """bce_vertebra, bce_disc at every cell of `mask [B, h, w, 11]` (float, present objects only), averaged over
  those cells of the group whose object has a known label."""
  known = (disease >= 0).astype(jnp.float32)[..., None, None, :]  # [B, 1, 1, 11]
  label = (disease > 0).astype(jnp.float32)[..., None, None, :]
  weight_map = mask * known
  bce = bce_with_logits(pred.logits, label, _per_object_pos_weight(pos_weight)) * weight_map
  return {name: _safe_mean(jnp.sum(bce * group), jnp.sum(weight_map * group))
          for name, group in zip(("bce_vertebra", "bce_disc"), _group_masks())}


def reference_loss(pred: Maps,
                   targets: targets_lib.Targets,
                   disease: jnp.ndarray,
                   pos_weight: Sequence[float] | jnp.ndarray = REFERENCE_POS_WEIGHT,
                   *,
                   mask_absent: bool = True,
                   weights: Mapping[str, float] = LOSS_WEIGHTS,
                   disease_region: str = "peak") -> tuple[jnp.ndarray, dict[str, jnp.ndarray]]:
  """The loss as the reference code trains (docs/method.md#losses), the default.

  - heatmap: MSE over all positions `[B, h, w, 11]`;
  - offset_y, offset_x: smooth-L1 (beta 1) where `targets.offset_mask` (target heatmap >= 0.4), zero elsewhere,
    averaged over ALL positions;
  - bce_vertebra, bce_disc: BCE with pos_weight on the logit at each object's target peak cell
    (`targets.peak_cell`), averaged over the objects of the group with a known label.

  Args:
    pred: predicted `Maps [B, h, w, 11]`.
    targets: `Targets` of the same shape (`targets.encode` at the model's stride).
    disease: `[B, 11]` int binary label: 1 diseased (any value > 0), 0 normal, -1 unknown.
    pos_weight: (vertebra, disc) BCE pos_weight (`class_balanced_pos_weight`).
    mask_absent: True (default): absent points (`targets.point_valid` False) are left out of every term, and "all
      positions" means the positions of present objects. False: the reference as coded (all B*h*w*11 positions).
      Identical when all points are present.
    weights: weight per term (default `LOSS_WEIGHTS`: 1, 2, 2, 0.001, 0.001).
    disease_region: 'peak' (default, the reference): the BCE on the logit at the target peak cell; 'region': the
      BCE at every cell of the paper's region {target heatmap >= 0.6}, averaged over those cells of the group (as
      `paper_loss`), so each label trains the cells around its peak that evaluation may read.
  Returns:
    (total scalar, parts: dict of the unweighted scalar terms).
  """
  if disease_region not in DISEASE_REGIONS:
    raise ValueError(f"disease_region must be one of {DISEASE_REGIONS}, got {disease_region!r}")
  disease = jnp.asarray(disease)
  _check(pred, targets, disease)
  return _reference_loss(pred, targets, disease, jnp.asarray(pos_weight, jnp.float32), check_weights(weights),
                         mask_absent, disease_region)


@functools.partial(jax.jit, static_argnames=("mask_absent", "disease_region"))
def _reference_loss(pred: Maps, targets: targets_lib.Targets, disease: jnp.ndarray, pos_weight: jnp.ndarray,
                    weights: dict[str, float], mask_absent: bool,
                    disease_region: str) -> tuple[jnp.ndarray, dict[str, jnp.ndarray]]:
  present = targets.point_valid if mask_absent else jnp.ones_like(targets.point_valid)
  heatmap, n_positions = _heatmap_term(pred, targets, present)
  offset_mask = (targets.offset_mask & present[..., None, None, :]).astype(jnp.float32)
  parts = {
      "heatmap": heatmap,
      "offset_y": _safe_mean(jnp.sum(smooth_l1(pred.offset_y, targets.maps.offset_y) * offset_mask), n_positions),
      "offset_x": _safe_mean(jnp.sum(smooth_l1(pred.offset_x, targets.maps.offset_x) * offset_mask), n_positions),
  }
  if disease_region == "peak":
    parts.update(_peak_disease_terms(pred, targets, disease, pos_weight, present))
  else:
    region = targets_lib.heatmap_mask(targets.maps.heatmap, targets.point_valid, targets_lib.PAPER_MASK_THRESHOLD)
    parts.update(_region_disease_terms(pred, disease, pos_weight, region.astype(jnp.float32)))
  return _total(parts, weights), parts


def paper_loss(pred: Maps,
               targets: targets_lib.Targets,
               disease: jnp.ndarray,
               pos_weight: Sequence[float] | jnp.ndarray = REFERENCE_POS_WEIGHT,
               *,
               weights: Mapping[str, float] = LOSS_WEIGHTS) -> tuple[jnp.ndarray, dict[str, jnp.ndarray]]:
  """The loss as the paper writes it (docs/method.md#losses, an option).

  - heatmap: as `reference_loss` (MSE over the positions of present objects);
  - offset_y, offset_x: smooth-L1 over the mask M = {target heatmap >= 0.6} of present objects, averaged over |M|;
  - bce_vertebra, bce_disc: BCE with pos_weight at every position of M (objects with a known label), averaged over
    those positions of the group.

  Arguments and result as `reference_loss` (absent points and unknown labels always contribute nothing).
  """
  disease = jnp.asarray(disease)
  _check(pred, targets, disease)
  return _paper_loss(pred, targets, disease, jnp.asarray(pos_weight, jnp.float32), check_weights(weights))


@jax.jit
def _paper_loss(pred: Maps, targets: targets_lib.Targets, disease: jnp.ndarray, pos_weight: jnp.ndarray,
                weights: dict[str, float]) -> tuple[jnp.ndarray, dict[str, jnp.ndarray]]:
  present = targets.point_valid
  heatmap, _ = _heatmap_term(pred, targets, present)
  mask = targets_lib.heatmap_mask(targets.maps.heatmap, present, targets_lib.PAPER_MASK_THRESHOLD)
  mask = mask.astype(jnp.float32)  # [B, h, w, 11]
  n_masked = jnp.sum(mask)
  parts = {
      "heatmap": heatmap,
      "offset_y": _safe_mean(jnp.sum(smooth_l1(pred.offset_y, targets.maps.offset_y) * mask), n_masked),
      "offset_x": _safe_mean(jnp.sum(smooth_l1(pred.offset_x, targets.maps.offset_x) * mask), n_masked),
  }
  parts.update(_region_disease_terms(pred, disease, pos_weight, mask))
  return _total(parts, weights), parts


LOSSES: Mapping[str, Callable[..., tuple[jnp.ndarray, dict[str, jnp.ndarray]]]] = {
    "reference": reference_loss,
    "paper": paper_loss,
}
"""Loss variants by config name."""
