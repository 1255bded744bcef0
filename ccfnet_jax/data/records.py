"""The per-study record (one example per study): its fields, and `annotated study -> record`.

The record is both the TFDS feature dict (`tfds_spine`, plus `fold`) and the phantom generator's output:
  image             uint16  [H, W, 3]   slices (z-1, z, z+1), each min-max scaled to 0..65535, native size
  pixel_spacing_mm  float32 [2]         (row, col) mm
  points_xy         float32 [11, 2]     (x, y) native px, 0 where absent
  point_valid       bool    [11]
  disease           int32   [11]        1, 0, or -1 unknown
  tags              str     [11]        raw label ('' absent)
  study_uid, series_uid, instance_uid   str
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from ccfnet_jax import objects
from ccfnet_jax.data import annotations as annotations_lib
from ccfnet_jax.data import dicom, errors, layout
from ccfnet_jax.data.errors import StudyError

N = objects.NUM_OBJECTS
RECORD_FIELDS: dict[str, tuple[tuple[int | None, ...], Any]] = {
    "image": ((None, None, 3), np.uint16),
    "pixel_spacing_mm": ((2,), np.float32),
    "points_xy": ((N, 2), np.float32),
    "point_valid": ((N,), np.bool_),
    "disease": ((N,), np.int32),
    "tags": ((N,), np.str_),
    "study_uid": ((), np.str_),
    "series_uid": ((), np.str_),
    "instance_uid": ((), np.str_),
}
"""Field -> (shape, dtype); None marks a variable dimension. The single definition of the record."""


def make_record(image: dicom.StudyImage, annotation: annotations_lib.StudyAnnotation) -> dict[str, Any]:
  """Joins a read study and its annotation into a record (UIDs from the DICOM files)."""
  return {
      "image": image.image,
      "pixel_spacing_mm": np.asarray(image.pixel_spacing_mm, np.float32),
      "points_xy": np.asarray(annotation.points_xy, np.float32),
      "point_valid": np.asarray(annotation.point_valid, bool),
      "disease": np.asarray(annotation.disease, np.int32),
      "tags": np.asarray(annotation.tags, np.str_),
      "study_uid": image.study_uid,
      "series_uid": image.series_uid,
      "instance_uid": image.instance_uid,
  }


def validate_record(record: Mapping[str, Any], study: str = "", file: str = "") -> dict[str, Any]:
  """Checks a record against RECORD_FIELDS and returns a normalized copy (only the record's fields, exact dtypes).

  Checks: every field present with its shape; integer/float values that fit the dtype; finite positive spacing;
  disease in {-1, 0, 1} and -1 exactly where a point is invalid; valid points inside the image.

  Raises:
    StudyError: kind 'bad_record' (or 'points_outside_image') naming the field and what is wrong.
  """
  study = study or str(record.get("study_uid", "?"))
  out: dict[str, Any] = {}
  for name, (shape, dtype) in RECORD_FIELDS.items():
    if name not in record:
      raise StudyError(study, file, f"record lacks field {name!r}", errors.BAD_RECORD)
    value = record[name]
    if shape == ():
      if isinstance(value, bytes):
        value = value.decode("utf-8")
      if not isinstance(value, str):
        raise StudyError(study, file, f"field {name!r} is {type(value).__name__}, expected str", errors.BAD_RECORD)
      out[name] = value
      continue
    array = np.asarray(value)
    if array.ndim != len(shape) or any(s is not None and s != a for s, a in zip(shape, array.shape)):
      raise StudyError(study, file, f"field {name!r} has shape {array.shape}, expected {shape}", errors.BAD_RECORD)
    if dtype is np.str_:
      array = np.asarray([v.decode("utf-8") if isinstance(v, bytes) else str(v) for v in array.ravel()],
                         np.str_).reshape(array.shape)
    elif dtype is np.uint16 and array.dtype != np.uint16:
      raise StudyError(study, file, f"field {name!r} has dtype {array.dtype}, expected uint16", errors.BAD_RECORD)
    else:
      array = array.astype(dtype)
    out[name] = array
  height, width = out["image"].shape[:2]
  if height == 0 or width == 0:
    raise StudyError(study, file, f"image is empty: {out['image'].shape}", errors.BAD_RECORD)
  spacing = out["pixel_spacing_mm"]
  if not np.all(np.isfinite(spacing)) or np.any(spacing <= 0):
    raise StudyError(study, file, f"pixel_spacing_mm {spacing.tolist()} is not positive", errors.BAD_RECORD)
  if not np.all(np.isin(out["disease"], (-1, 0, 1))):
    raise StudyError(study, file, f"disease {out['disease'].tolist()} not in -1/0/1", errors.BAD_RECORD)
  if np.any((out["disease"] == objects.UNKNOWN) != ~out["point_valid"]):
    raise StudyError(study, file, "disease must be -1 exactly where point_valid is False", errors.BAD_RECORD)
  xy = out["points_xy"]
  inside = (xy[:, 0] >= 0) & (xy[:, 0] < width) & (xy[:, 1] >= 0) & (xy[:, 1] < height) & np.isfinite(xy).all(-1)
  bad = out["point_valid"] & ~inside
  if np.any(bad):
    names = [f"{objects.NAMES[i]} {tuple(xy[i].tolist())}" for i in np.flatnonzero(bad)]
    raise StudyError(study, file, f"points outside the {height}x{width} image: {', '.join(names)}",
                     errors.POINTS_OUTSIDE)
  return out


def disease_labels(source: Sequence[Mapping[str, Any]]) -> np.ndarray:
  """The `disease` field of every record of a source, stacked: int32 `[N, 11]` (1, 0, -1 unknown).

  Reads only that field (a TFDS source still reads each stored example, but nothing is resized).
  """
  if len(source) == 0:
    raise ValueError("disease_labels: the source is empty")
  disease = np.stack([np.asarray(source[i]["disease"], np.int32) for i in range(len(source))])
  if disease.shape[1:] != (N,):
    raise ValueError(f"disease_labels: 'disease' must be [{N}] per record, got {disease.shape[1:]}")
  return disease


def read_annotated_study(folder: str | os.PathLike, annotation: annotations_lib.StudyAnnotation, *,
                         headers: Sequence[dicom.SliceHeader] | None = None, problems: Sequence[StudyError] = (),
                         study: str | None = None) -> dict[str, Any]:
  """Reads the annotated slice of one study and returns its validated record.

  `headers` and `problems` come from `layout.scan_headers(folder)`, which runs here when `headers` is None.

  Raises:
    StudyError: anything `dicom.read_study`, `annotations.check_points_inside` or `validate_record` rejects.
  """
  study = study or f"{annotation.study_uid} ({os.fspath(folder)})"
  if headers is None:
    headers, problems = layout.scan_headers(folder, study)
  image = dicom.read_study(folder, headers=headers, problems=problems, instance_uid=annotation.instance_uid,
                           series_uid=annotation.series_uid, study_uid=annotation.study_uid, study=study)
  annotations_lib.check_points_inside(annotation, image.native_hw, study=study, file=image.path)
  return validate_record(make_record(image, annotation), study=study, file=image.path)
