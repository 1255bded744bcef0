"""Scoring a predictions file against annotations with the paper's metric (docs/method.md#metric).

Pixel spacing: the PixelSpacing `[row, col]` mm of the annotated instance, read from the DICOM headers under the
studies folder (headers only, no pixels). Ground truth: the annotation files (`ccfnet_jax.data.annotations`).

Counting: every annotated study whose annotated instance is found under the studies folder is scored. A study with
no prediction, or a point missing from a study's prediction, counts as a miss (its ground-truth point is not found).
Predictions of studies the annotation file does not list are ignored. Studies whose annotated instance is not
found (no spacing) are left out and listed. All counts are returned with the metrics.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np

from ccfnet_jax import metrics, objects
from ccfnet_jax.data import annotations as annotations_lib
from ccfnet_jax.data import dicom, layout
from ccfnet_jax.data.errors import StudyError
from ccfnet_jax.inference import predictions as predictions_lib

MISSING_PREDICTION_PX = -1.0e6
"""Coordinate given to a point that has no prediction, so that it is a miss at any pixel spacing."""


def read_spacings(studies_dir: str | os.PathLike, instance_uids: Iterable[str]
                  ) -> tuple[dict[str, np.ndarray], list[StudyError]]:
  """PixelSpacing float32 `[2]` (row, col) mm of each wanted SOPInstanceUID, from the DICOM headers under
  `studies_dir` (pixels are not read). Unreadable files are skipped (and reported) unless they are the only
  candidates; a wanted instance with a bad PixelSpacing is reported.

  Returns:
    (instance uid -> spacing, problems).
  """
  wanted = set(instance_uids)
  found: dict[str, np.ndarray] = {}
  problems: list[StudyError] = []
  for folder in layout.study_folders(studies_dir):
    try:
      headers, unreadable = layout.scan_headers(folder, folder.name)
    except StudyError as e:
      problems.append(e)
      continue
    problems += unreadable
    for header in headers:
      try:
        if header.instance_uid in wanted and header.instance_uid not in found:
          found[header.instance_uid] = dicom.pixel_spacing(header, folder.name)
      except StudyError as e:
        problems.append(e)
  return found, problems


@dataclasses.dataclass
class Evaluation:
  """The metrics (in %, `metrics.evaluate`), what was counted, and the studies left out."""
  metrics: dict[str, float]
  counts: dict[str, int]
  excluded: list[dict[str, str]]

  def as_dict(self) -> dict[str, Any]:
    return {"metrics": self.metrics, "counts": self.counts, "excluded": self.excluded}


def evaluate_predictions(predictions: Mapping[str, predictions_lib.PredictedStudy],
                         ground_truth: Sequence[annotations_lib.StudyAnnotation],
                         spacing_by_instance: Mapping[str, np.ndarray], *,
                         max_distance_mm: float = metrics.HIT_DISTANCE_MM) -> Evaluation:
  """Scores predictions against the annotations (see the module docstring for what counts).

  Raises:
    ValueError: when no annotated study can be scored.
  """
  n = objects.NUM_OBJECTS
  rows: dict[str, list[np.ndarray]] = {k: [] for k in ("pred_xy", "pred_prob", "gt_xy", "gt_valid", "gt_disease",
                                                       "spacing")}
  excluded = []
  counts = {"annotated_studies": len(ground_truth), "scored_studies": 0, "predicted_studies": 0,
            "missing_predictions": 0, "missing_points": 0, "unannotated_predictions": 0, "excluded_studies": 0,
            "instance_mismatches": 0, "points_from_coord_float": 0, "points_from_coord": 0}
  annotated_uids = {gt.study_uid for gt in ground_truth}
  counts["unannotated_predictions"] = sum(1 for uid in predictions if uid not in annotated_uids)
  for gt in ground_truth:
    spacing = spacing_by_instance.get(gt.instance_uid)
    if spacing is None:
      excluded.append({"study": gt.study_uid, "reason": f"annotated instance {gt.instance_uid} not found under the "
                       "studies folder (no pixel spacing)"})
      continue
    pred = predictions.get(gt.study_uid)
    xy = np.full((n, 2), MISSING_PREDICTION_PX)
    prob = np.zeros(n)
    if pred is None:
      counts["missing_predictions"] += 1
    else:
      counts["predicted_studies"] += 1
      counts["instance_mismatches"] += int(pred.instance_uid != gt.instance_uid)
      counts["missing_points"] += int(np.sum(gt.point_valid & ~pred.present))
      counts["points_from_coord_float"] += pred.num_float
      counts["points_from_coord"] += int(np.sum(pred.present)) - pred.num_float
      xy[pred.present] = pred.xy[pred.present]
      prob[pred.present] = pred.prob[pred.present]
    rows["pred_xy"].append(xy)
    rows["pred_prob"].append(prob)
    rows["gt_xy"].append(gt.points_xy)
    rows["gt_valid"].append(gt.point_valid)
    rows["gt_disease"].append(gt.disease)
    rows["spacing"].append(spacing)
  counts["scored_studies"] = len(rows["gt_xy"])
  counts["excluded_studies"] = len(excluded)
  if not rows["gt_xy"]:
    raise ValueError("no annotated study could be scored (" + "; ".join(e["reason"] for e in excluded[:3]) + ")")
  arrays = {k: np.stack(v) for k, v in rows.items()}
  result = metrics.evaluate(arrays["pred_xy"], arrays["pred_prob"], arrays["gt_xy"], arrays["gt_valid"],
                            arrays["gt_disease"], arrays["spacing"], max_distance_mm=max_distance_mm)
  return Evaluation(metrics=result, counts=counts, excluded=excluded)


def evaluate_files(predictions: str | os.PathLike, annotations: str | os.PathLike | Sequence[str | os.PathLike],
                   studies_dir: str | os.PathLike, *, use_rounded: bool = False,
                   max_distance_mm: float = metrics.HIT_DISTANCE_MM) -> Evaluation:
  """`load_predictions` + `annotations.load_annotations` + `read_spacings` + `evaluate_predictions`.

  Annotation entries the parser rejects are left out and listed in `excluded` (with the parser's reason).
  """
  predicted = predictions_lib.load_predictions(predictions, use_rounded=use_rounded)
  ground_truth, bad = annotations_lib.load_annotations(annotations)
  spacings, _ = read_spacings(studies_dir, [gt.instance_uid for gt in ground_truth])
  result = evaluate_predictions(predicted, ground_truth, spacings, max_distance_mm=max_distance_mm)
  result.excluded += [{"study": e.study, "reason": f"annotation rejected: {e.reason}"} for e in bad]
  result.counts["excluded_studies"] = len(result.excluded)
  return result


def format_report(result: Evaluation) -> str:
  """The metrics and counts as text."""
  lines = ["metric (%): " + "  ".join(f"{k} {v:.2f}" for k, v in result.metrics.items()),
           "counts: " + ", ".join(f"{k} {v}" for k, v in result.counts.items())]
  lines += [f"excluded: {e['study']}: {e['reason']}" for e in result.excluded]
  return "\n".join(lines)
