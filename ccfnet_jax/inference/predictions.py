"""The predictions file: one entry per study in the official annotation schema, written and read here only.

Output (`--output`, a list with one entry per predicted study, the official annotation schema):

    {"studyUid", "version": "ccfnet_jax <version>",
     "data": [{"seriesUid", "instanceUid",
               "annotation": [{"annotator": "ccfnet_jax",
                               "data": {"point": [{"coord": [x, y], "coord_float": [x, y], "prob": p,
                                                   "tag": {"identification": "L1", "vertebra": "v2"},
                                                   "zIndex": z}, ... 11 points]}}]}]}

- `coord`: integers, (column, row) in original pixels of the slice: the float point rounded to the nearest integer
  (annotation coordinates are positions on the same continuous axis, docs/method.md#coordinates) and clipped into
  the image.
- `coord_float` (not in the official schema): the unrounded float coordinates, so that scoring our own predictions
  is exact (`ccfnet_jax.evaluate` uses them when present).
- `prob`: the predicted probability that the object is diseased (docs/method.md#decode). `tag`: the label key by
  the kind of the object (`vertebra` for L1..L5, `disc` for the six discs) with `v2` (diseased: degeneration / bulge) when
  `prob >= DISEASE_THRESHOLD` (0.5) and `v1` (normal) otherwise. The binary rule treats every code but `v1` alone as
  diseased (docs/method.md#labels), so `v2` stands for "diseased" here; the model does not tell bulge from protrusion.
- `zIndex`: the slice's 0-based position in its series sorted by ImagePositionPatient x descending.

Reading (`load_predictions`) accepts any tool's file of this schema: `prob` is the predicted probability (or any
score, higher = diseased) of each point; points are matched by identification (aliases as in the annotations, e.g.
`T11-T12` = `T12-L1`); label tags are not used; `coord_float` is preferred to the rounded `coord` when present.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Any

import numpy as np

from ccfnet_jax import __version__, objects

DISEASE_THRESHOLD = 0.5
"""A point is tagged diseased (`v2`) when its probability is >= this, else normal (`v1`)."""
NORMAL_TAG, DISEASED_TAG = "v1", "v2"
COORD_FLOAT_KEY = "coord_float"
PROB_KEY = "prob"
VERSION = f"ccfnet_jax {__version__}"
ANNOTATOR = "ccfnet_jax"


@dataclasses.dataclass(frozen=True)
class StudyPrediction:
  """The prediction for one study folder.

  pred_xy: float32 `[11, 2]` (x, y) native px (unrounded); prob: float32 `[11]`; native_hw: (H, W) px.
  """
  folder: str
  study_uid: str
  series_uid: str
  instance_uid: str
  z_index: int
  native_hw: tuple[int, int]
  pred_xy: np.ndarray
  prob: np.ndarray


def rounded_coord(xy: np.ndarray, native_hw: tuple[int, int]) -> list[int]:
  """(x, y) float native px -> [x, y] integers: nearest integer, clipped to [0, W - 1] x [0, H - 1]."""
  height, width = native_hw
  x = int(np.clip(np.floor(float(xy[0]) + 0.5), 0, width - 1))
  y = int(np.clip(np.floor(float(xy[1]) + 0.5), 0, height - 1))
  return [x, y]


def disease_tag(prob: float) -> str:
  """'v2' (diseased) when `prob >= DISEASE_THRESHOLD`, else 'v1' (normal)."""
  return DISEASED_TAG if prob >= DISEASE_THRESHOLD else NORMAL_TAG


def prediction_entry(pred: StudyPrediction) -> dict[str, Any]:
  """One study in the official annotation schema, plus `prob` and `coord_float` per point (module docstring)."""
  points = []
  for k, name in enumerate(objects.NAMES):
    prob = float(pred.prob[k])
    points.append({
        "coord": rounded_coord(pred.pred_xy[k], pred.native_hw),
        COORD_FLOAT_KEY: [float(pred.pred_xy[k, 0]), float(pred.pred_xy[k, 1])],
        PROB_KEY: prob,
        "tag": {"identification": name, objects.label_key(name): disease_tag(prob)},
        "zIndex": int(pred.z_index),
    })
  return {"studyUid": pred.study_uid, "version": VERSION,
          "data": [{"seriesUid": pred.series_uid, "instanceUid": pred.instance_uid,
                    "annotation": [{"annotator": ANNOTATOR, "data": {"point": points}}]}]}


def sidecar_path(output: str | os.PathLike) -> str:
  """`preds.json` -> `preds.errors.json` (beside the output)."""
  output = os.fspath(output)
  stem = output[:-5] if output.lower().endswith(".json") else output
  return stem + ".errors.json"


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
