"""Scores a predictions file in the official annotation schema with the paper's metric (SPEC §7).

    python -m ccfnet_jax.evaluate --predictions=preds.json --annotations=ann.json --studies=DIR \
        [--output=metrics.json] [--use_rounded] [--max_distance_mm=6]

Any tool's predictions can be scored: a list of studies `{studyUid, data: [{seriesUid, instanceUid, annotation:
[{data: {point: [{coord: [x, y], tag: {identification}, prob}]}}]}]}` where `prob` is the predicted probability (or
any score, higher = diseased) of each point. Points are matched to the ground truth by identification (aliases as in
the annotations, e.g. `T11-T12` = `T12-L1`); label tags in the predictions are not used. When a point carries
`coord_float` (written by `ccfnet_jax.predict`), it is used instead of the rounded `coord`, so scoring our own
predictions is exact; `--use_rounded` scores the integer `coord` as the official format has it.

Pixel spacing: the PixelSpacing `[row, col]` mm of the annotated instance, read from the DICOM headers under
`--studies` (headers only, no pixels). Ground truth: `--annotations` (parsed by `ccfnet_jax.data.annotations`).

Counting: every annotated study whose annotated instance is found under `--studies` is scored. A study with no
prediction, or a point missing from a study's prediction, counts as a miss (its ground-truth point is not found).
Predictions of studies the annotation file does not list are ignored. Studies whose annotated instance is not
found (no spacing) are left out and listed. All counts are printed and written with the metrics.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np

from ccfnet_jax import metrics, objects
from ccfnet_jax.data import annotations as annotations_lib
from ccfnet_jax.data import dicom, layout
from ccfnet_jax.data.errors import StudyError
from ccfnet_jax.predict import COORD_FLOAT_KEY, PROB_KEY
from ccfnet_jax.train import write_json


MISSING_PREDICTION_PX = -1.0e6
"""Coordinate given to a point that has no prediction, so that it is a miss at any pixel spacing."""


class PredictionFileError(ValueError):
  """The predictions file is not in the expected schema; the message names the file, study and key."""


@dataclasses.dataclass(frozen=True)
class PredictedStudy:
  """One study of a predictions file, in object order.

  xy: float64 `[11, 2]` (x, y) native px (NaN where absent); prob: float64 `[11]` (NaN where absent);
  present: bool `[11]`; num_float: how many points came from `coord_float`.
  """
  study_uid: str
  series_uid: str
  instance_uid: str
  xy: np.ndarray
  prob: np.ndarray
  present: np.ndarray
  num_float: int


def _number(value: Any) -> bool:
  return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _pair(value: Any) -> bool:
  return isinstance(value, (list, tuple)) and len(value) == 2 and all(_number(v) for v in value)


def parse_prediction(entry: Any, source: str, *, use_rounded: bool = False) -> PredictedStudy:
  """Parses one study entry of a predictions file. Raises PredictionFileError naming what is wrong."""
  study = entry.get("studyUid", "?") if isinstance(entry, dict) else "?"

  def fail(what: str) -> PredictionFileError:
    return PredictionFileError(f"{source}: study {study}: {what}")

  if not isinstance(entry, dict) or not isinstance(entry.get("studyUid"), str):
    raise fail("entry is not an object with a string 'studyUid'")
  data = entry.get("data")
  if not isinstance(data, list) or not data or not isinstance(data[0], dict):
    raise fail("'data' must be a non-empty list of objects")
  series = data[0]
  annotation = series.get("annotation")
  if not isinstance(annotation, list) or not annotation or not isinstance(annotation[0], dict):
    raise fail("'data[0].annotation' must be a non-empty list of objects")
  body = annotation[0].get("data")
  points = body.get("point") if isinstance(body, dict) else None
  if not isinstance(points, list):
    raise fail("'data[0].annotation[0].data.point' must be a list")
  n = objects.NUM_OBJECTS
  xy = np.full((n, 2), np.nan)
  prob = np.full(n, np.nan)
  present = np.zeros(n, bool)
  num_float = 0
  for k, point in enumerate(points):
    where = f"point[{k}]"
    if not isinstance(point, dict) or not isinstance(point.get("tag"), dict):
      raise fail(f"{where} is not an object with a 'tag' object")
    identification = point["tag"].get("identification")
    index = objects.object_index(identification) if isinstance(identification, str) else None
    if index is None:
      raise fail(f"{where} has unknown identification {identification!r} (expected one of {objects.NAMES})")
    if present[index]:
      raise fail(f"{where} names {objects.NAMES[index]} a second time")
    use_float = not use_rounded and COORD_FLOAT_KEY in point
    key = COORD_FLOAT_KEY if use_float else "coord"
    if not _pair(point.get(key)):
      raise fail(f"{where} ({identification}) {key} {point.get(key)!r} is not two finite numbers")
    if not _number(point.get(PROB_KEY)):
      raise fail(f"{where} ({identification}) has no finite number under {PROB_KEY!r} (the disease probability)")
    xy[index] = point[key]
    prob[index] = point[PROB_KEY]
    present[index] = True
    num_float += int(use_float)
  return PredictedStudy(study_uid=entry["studyUid"], series_uid=str(series.get("seriesUid", "")),
                        instance_uid=str(series.get("instanceUid", "")), xy=xy, prob=prob, present=present,
                        num_float=num_float)


def load_predictions(path: str | os.PathLike, *, use_rounded: bool = False) -> dict[str, PredictedStudy]:
  """studyUid -> PredictedStudy for every entry of a predictions file. Raises PredictionFileError (bad file, bad
  entry, a studyUid twice)."""
  path = os.fspath(path)
  try:
    with open(path, encoding="utf-8") as f:
      entries = json.load(f)
  except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
    raise PredictionFileError(f"cannot read predictions {path}: {e}") from e
  if not isinstance(entries, list):
    raise PredictionFileError(f"{path}: expected a list of studies, got a {type(entries).__name__}")
  out: dict[str, PredictedStudy] = {}
  for entry in entries:
    study = parse_prediction(entry, path, use_rounded=use_rounded)
    if study.study_uid in out:
      raise PredictionFileError(f"{path}: study {study.study_uid} is predicted twice")
    out[study.study_uid] = study
  return out


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


def evaluate_predictions(predictions: Mapping[str, PredictedStudy],
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
  predicted = load_predictions(predictions, use_rounded=use_rounded)
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


def define_flags() -> None:
  """The command's flags (defined only when run as a program)."""
  from absl import flags  # pylint: disable=g-import-not-at-top

  flags.DEFINE_string("predictions", None, "Predictions JSON (official schema with 'prob' per point).", required=True)
  flags.DEFINE_multi_string("annotations", None, "Official annotation JSON (ground truth); may be repeated.",
                            required=True)
  flags.DEFINE_string("studies", None, "Folder of study folders (DICOM; pixel spacing is read from them).",
                      required=True)
  flags.DEFINE_string("output", None, "Write the metrics and counts as JSON here.")
  flags.DEFINE_bool("use_rounded", False, "Score the integer 'coord' even where 'coord_float' is present.")
  flags.DEFINE_float("max_distance_mm", metrics.HIT_DISTANCE_MM, "Hit radius in mm (the paper: 6).")


def main(argv: Sequence[str]) -> None:
  from absl import app, flags  # pylint: disable=g-import-not-at-top

  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  FLAGS = flags.FLAGS  # pylint: disable=invalid-name
  result = evaluate_files(FLAGS.predictions, FLAGS.annotations, FLAGS.studies, use_rounded=FLAGS.use_rounded,
                          max_distance_mm=FLAGS.max_distance_mm)
  print(format_report(result), flush=True)
  if FLAGS.output:
    write_json(FLAGS.output, {**result.as_dict(), "predictions": os.path.abspath(FLAGS.predictions),
                              "use_rounded": FLAGS.use_rounded, "max_distance_mm": FLAGS.max_distance_mm}, indent=1)


if __name__ == "__main__":
  from absl import app as _app  # pylint: disable=g-import-not-at-top
  define_flags()
  _app.run(main)
