"""Parses the official Tianchi annotation JSON into one `StudyAnnotation` per study (docs/method.md#labels).

Schema: a list of studies `{studyUid, version, data: [{seriesUid, instanceUid, annotation: [{annotator,
data: {point: [{coord: [x, y], tag: {identification, vertebra | disc}, zIndex}]}}]}]}`; `coord` is (column, row)
in pixels of the annotated slice, origin top-left.

Quirks handled (names, aliases and the label rule come from `ccfnet_jax.objects`):
  - the label key comes from the identification (a '-' means a disc), never from which keys are present: 51 real
    points carry both keys with the inapplicable one empty;
  - an empty label on the applicable key means normal (0);
  - comma lists in either order ('v2,v5', 'v5,v2');
  - the alias 'T11-T12' -> 'T12-L1';
  - a study with fewer than 11 points: the absent object is invalid, its disease -1 and its tag '';
Problems reported as `StudyError` (the study is skipped, parsing continues): an unknown identification, the same
object twice, a malformed entry or label, a duplicated studyUid (every copy is skipped: which one is right is
unknown). Points outside the image are checked once the image size is known (`check_points_inside`).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

from ccfnet_jax import objects
from ccfnet_jax.data import errors
from ccfnet_jax.data.errors import StudyError


@dataclasses.dataclass(frozen=True)
class StudyAnnotation:
  """The labels of one study, in the object order of `ccfnet_jax.objects.NAMES`.

  Attributes:
    study_uid, series_uid, instance_uid: the annotated slice's UIDs.
    z_index: the annotated slice's 0-based position in its series (as the JSON says).
    points_xy: float32 `[11, 2]` (x, y) native px; 0 where absent.
    point_valid: bool `[11]`.
    disease: int32 `[11]`: 1 diseased, 0 normal, -1 unknown (point absent).
    tags: the raw label string per object ('' where absent or empty).
    source: the annotation file.
  """
  study_uid: str
  series_uid: str
  instance_uid: str
  z_index: int
  points_xy: np.ndarray
  point_valid: np.ndarray
  disease: np.ndarray
  tags: tuple[str, ...]
  source: str


def _require(value: Any, kind: type | tuple[type, ...], what: str, study: str, source: str) -> Any:
  if not isinstance(value, kind):
    raise StudyError(study, source, f"{what} is {type(value).__name__}, expected "
                     f"{getattr(kind, '__name__', kind)}", errors.BAD_ANNOTATION)
  return value


def _require_uid(value: Any, what: str, study: str, source: str) -> str:
  if not _require(value, str, what, study, source).strip():
    raise StudyError(study, source, f"{what} is empty", errors.BAD_ANNOTATION)
  return value


def _finite_number(value: Any) -> bool:
  """A JSON number that is finite as a float (JSON allows NaN and integers beyond the float range)."""
  if not isinstance(value, (int, float)) or isinstance(value, bool):
    return False
  try:
    return math.isfinite(float(value))
  except OverflowError:
    return False


def parse_study(entry: Any, source: str) -> StudyAnnotation:
  """Parses one element of the annotation list; raises StudyError naming the study and what is wrong."""
  study = str(entry.get("studyUid", "?")) if isinstance(entry, dict) else "?"
  _require(entry, dict, "study entry", study, source)
  study_uid = _require_uid(entry.get("studyUid"), "studyUid", study, source)
  data = _require(entry.get("data"), list, "data", study, source)
  if len(data) != 1:
    raise StudyError(study, source, f"data holds {len(data)} series annotations, expected 1", errors.BAD_ANNOTATION)
  series = _require(data[0], dict, "data[0]", study, source)
  series_uid = _require_uid(series.get("seriesUid"), "data[0].seriesUid", study, source)
  instance_uid = _require_uid(series.get("instanceUid"), "data[0].instanceUid", study, source)
  annotation = _require(series.get("annotation"), list, "data[0].annotation", study, source)
  if len(annotation) != 1:
    raise StudyError(study, source, f"data[0].annotation holds {len(annotation)} annotators, expected 1",
                     errors.BAD_ANNOTATION)
  annotator = _require(annotation[0], dict, "annotation[0]", study, source)
  points = _require(_require(annotator.get("data"), dict, "annotation[0].data", study, source).get("point"),
                    list, "annotation[0].data.point", study, source)

  points_xy = np.zeros((objects.NUM_OBJECTS, 2), np.float32)
  point_valid = np.zeros(objects.NUM_OBJECTS, bool)
  disease = np.full(objects.NUM_OBJECTS, objects.UNKNOWN, np.int32)
  tags = [""] * objects.NUM_OBJECTS
  z_indices = set()
  for k, point in enumerate(points):
    where = f"point[{k}]"
    _require(point, dict, where, study, source)
    tag = _require(point.get("tag"), dict, f"{where}.tag", study, source)
    identification = _require(tag.get("identification"), str, f"{where}.tag.identification", study, source)
    index = objects.object_index(identification)
    if index is None:
      raise StudyError(study, source, f"{where} has unknown identification {identification!r}",
                       errors.UNKNOWN_IDENTIFICATION)
    if point_valid[index]:
      raise StudyError(study, source, f"{where} names {objects.NAMES[index]} a second time", errors.DUPLICATE_POINT)
    key = objects.label_key(identification)
    if key not in tag:
      raise StudyError(study, source, f"{where} ({identification}) has no {key!r} label key", errors.BAD_ANNOTATION)
    label = _require(tag[key] if tag[key] is not None else "", str, f"{where}.tag.{key}", study, source)
    try:
      disease[index] = objects.binary_disease_label(label)
    except ValueError as e:
      raise StudyError(study, source, f"{where} ({identification}): {e}", errors.BAD_ANNOTATION) from e
    coord = point.get("coord")
    if not isinstance(coord, list) or len(coord) != 2 or not all(_finite_number(c) for c in coord):
      raise StudyError(study, source, f"{where} ({identification}) coord {coord!r} is not two finite numbers",
                       errors.BAD_ANNOTATION)
    if "zIndex" in point:
      z = point["zIndex"]
      if not isinstance(z, int) or isinstance(z, bool):
        raise StudyError(study, source, f"{where} ({identification}) zIndex {z!r} is not an integer",
                         errors.BAD_ANNOTATION)
      z_indices.add(z)
    points_xy[index] = coord
    point_valid[index] = True
    tags[index] = label
  if len(z_indices) > 1:
    raise StudyError(study, source, f"points disagree on zIndex: {sorted(z_indices)}", errors.BAD_ANNOTATION)
  z_index = z_indices.pop() if z_indices else -1
  return StudyAnnotation(study_uid=study_uid, series_uid=series_uid, instance_uid=instance_uid, z_index=z_index,
                         points_xy=points_xy, point_valid=point_valid, disease=disease, tags=tuple(tags),
                         source=source)


def parse_entries(entries: Any, source: str) -> tuple[list[StudyAnnotation], list[StudyError]]:
  """Parses a loaded annotation list; returns the good studies and one StudyError per bad one.

  Duplicated studyUids are NOT resolved here (see `drop_duplicates`), so that files can be combined first.
  """
  if not isinstance(entries, list):
    raise StudyError("*", source, f"annotation file holds a {type(entries).__name__}, expected a list of studies",
                     errors.BAD_ANNOTATION)
  good, bad = [], []
  for entry in entries:
    try:
      good.append(parse_study(entry, source))
    except StudyError as e:
      bad.append(e)
  return good, bad


def drop_duplicates(annotations: Sequence[StudyAnnotation]) -> tuple[list[StudyAnnotation], list[StudyError]]:
  """Removes every copy of a studyUid that occurs more than once; one StudyError per removed copy."""
  counts: dict[str, int] = {}
  for a in annotations:
    counts[a.study_uid] = counts.get(a.study_uid, 0) + 1
  kept = [a for a in annotations if counts[a.study_uid] == 1]
  dropped = [StudyError(a.study_uid, a.source, f"studyUid occurs {counts[a.study_uid]} times in the annotations",
                        errors.DUPLICATE_STUDY) for a in annotations if counts[a.study_uid] > 1]
  return kept, dropped


def load_annotations(paths: str | os.PathLike | Iterable[str | os.PathLike]
                     ) -> tuple[list[StudyAnnotation], list[StudyError]]:
  """Reads one or more annotation JSON files; returns the good studies and the reported problems.

  Raises:
    StudyError: only when a file is not valid JSON or not a list (the whole file is unusable).
  """
  if isinstance(paths, (str, os.PathLike)):
    paths = [paths]
  good, bad = [], []
  for path in paths:
    path = os.fspath(path)
    try:
      with open(path, encoding="utf-8") as f:
        entries = json.load(f)
    except (OSError, ValueError, RecursionError) as e:  # ValueError: bad JSON or text; RecursionError: too deep
      raise StudyError("*", path, f"cannot read annotation JSON: {e}", errors.BAD_ANNOTATION) from e
    g, b = parse_entries(entries, path)
    good += g
    bad += b
  good, duplicates = drop_duplicates(good)
  return good, bad + duplicates


def check_points_inside(annotation: StudyAnnotation, native_hw: tuple[int, int], study: str | None = None,
                        file: str = "") -> None:
  """Raises StudyError (points_outside_image) unless every valid point has 0 <= x < W and 0 <= y < H (px)."""
  height, width = native_hw
  xy = annotation.points_xy[annotation.point_valid]
  names = [n for n, v in zip(objects.NAMES, annotation.point_valid) if v]
  outside = [f"{n} {tuple(float(c) for c in p)}" for n, p in zip(names, xy)
             if not (0 <= p[0] < width and 0 <= p[1] < height)]
  if outside:
    raise StudyError(study or annotation.study_uid, file or annotation.source,
                     f"points outside the {height}x{width} image: {', '.join(outside)}", errors.POINTS_OUTSIDE)
