"""Reads the DICOM files of one study into the 3-slice input stack (docs/method.md#data).

A study folder holds every series of one study mixed flat (`studyN/imageK.dcm`; file names carry no meaning).
Reading:
  1. `layout.scan_headers` reads every file's header (`read_header`, no pixels); `group_series` groups them by
     SeriesInstanceUID; each series gets its plane from the normal of ImageOrientationPatient, and a sagittal series
     is sorted by ImagePositionPatient x, descending (index = zIndex).
  2. `read_study`: picks the slice — the annotation's SOPInstanceUID when given, else the T2-sagittal +
     brightest-middle-slice rule — and decodes only the pixels it needs: slices (z-1, z, z+1) with the edges
     repeated, MONOCHROME1 inverted, each channel min-max scaled to 0..65535 (uint16; a constant slice gives 0).

Bad input policy (documented choice): a file whose header cannot be read (not DICOM, truncated before the image
tags) makes the whole study fail with `StudyError`, because its series is unknown and it might be one of the slices we
need. A truncated *pixel* section is only noticed when those pixels are needed (the chosen slice or its neighbours);
the pixels of decoy series are never decoded. Only files ending in `.dcm` (any case) are read.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence

import numpy as np
import pydicom
from pydicom.errors import InvalidDicomError

from ccfnet_jax.data import errors
from ccfnet_jax.data.errors import StudyError

UINT16_MAX = 65535
_HEADER_TAGS = ("SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID", "ImageOrientationPatient",
                "ImagePositionPatient", "Rows", "Columns")
_PLANE_THRESHOLD = 0.75


@dataclasses.dataclass(frozen=True)
class SliceHeader:
  """The header fields of one DICOM file that reading a study needs."""
  path: str
  study_uid: str
  series_uid: str
  instance_uid: str
  description: str
  orientation: tuple[float, ...]   # ImageOrientationPatient, 6 direction cosines
  position_mm: tuple[float, float, float]  # ImagePositionPatient (x, y, z)
  instance_number: int
  rows: int
  columns: int
  pixel_spacing_mm: tuple[float, ...] | None  # PixelSpacing (row, col) as written; None when absent


@dataclasses.dataclass(frozen=True)
class Series:
  """One series of a study; `slices` sorted (sagittal: by x descending, so the list index is zIndex)."""
  series_uid: str
  description: str
  plane: str  # 'sagittal' | 'axial' | 'coronal' | 'oblique'
  slices: tuple[SliceHeader, ...]

  @property
  def is_t2(self) -> bool:
    text = self.description.upper()
    return "T2" in text and "T1" not in text


@dataclasses.dataclass(frozen=True)
class StudyImage:
  """The input stack of one study at native resolution.

  Attributes:
    image: uint16 `[H, W, 3]`; channels = slices (z-1, z, z+1), each min-max scaled to 0..65535.
    pixel_spacing_mm: float32 `[2]` (row spacing, column spacing) of the chosen slice, mm.
    study_uid, series_uid, instance_uid: UIDs of the chosen slice.
    z_index: the chosen slice's position in its sorted series (0-based).
    native_hw: (H, W) pixels.
    series_description: SeriesDescription of the chosen series.
    path: file of the chosen slice.
  """
  image: np.ndarray
  pixel_spacing_mm: np.ndarray
  study_uid: str
  series_uid: str
  instance_uid: str
  z_index: int
  native_hw: tuple[int, int]
  series_description: str
  path: str


def plane_of(orientation: Sequence[float]) -> str:
  """Plane from the unit normal (row x column) of ImageOrientationPatient: the first of x (sagittal), z (axial),
  y (coronal) on which |normal| exceeds 0.75, else oblique (docs/method.md#data)."""
  row = np.asarray(orientation[:3], np.float64)
  col = np.asarray(orientation[3:6], np.float64)
  normal = np.cross(row, col)
  norm = np.linalg.norm(normal)
  if norm > 0:
    normal = normal / norm
  if abs(normal[0]) > _PLANE_THRESHOLD:
    return "sagittal"
  if abs(normal[2]) > _PLANE_THRESHOLD:
    return "axial"
  if abs(normal[1]) > _PLANE_THRESHOLD:
    return "coronal"
  return "oblique"


def read_header(path: str, study: str) -> SliceHeader:
  """Reads one file's header without its pixels; raises StudyError (corrupt_dicom) when unreadable."""
  try:
    ds = pydicom.dcmread(path, stop_before_pixels=True)
  except (InvalidDicomError, EOFError, OSError, ValueError, KeyError, TypeError) as e:
    raise StudyError(study, path, f"unreadable DICOM header: {type(e).__name__}: {e}", errors.CORRUPT_DICOM) from e
  missing = [tag for tag in _HEADER_TAGS if tag not in ds or ds.get(tag) in (None, "")]
  if missing:
    raise StudyError(study, path, f"DICOM header lacks {', '.join(missing)} (truncated file or not an image)",
                     errors.CORRUPT_DICOM)
  try:
    orientation = tuple(float(v) for v in ds.ImageOrientationPatient)
    position = tuple(float(v) for v in ds.ImagePositionPatient)
    if len(orientation) != 6 or len(position) != 3:
      raise ValueError(f"ImageOrientationPatient has {len(orientation)} values (6 expected), "
                       f"ImagePositionPatient {len(position)} (3 expected)")
    number = ds.get("InstanceNumber")
    spacing = ds.get("PixelSpacing")
    return SliceHeader(
        path=path, study_uid=str(ds.StudyInstanceUID), series_uid=str(ds.SeriesInstanceUID),
        instance_uid=str(ds.SOPInstanceUID), description=str(ds.get("SeriesDescription", "") or ""),
        orientation=orientation, position_mm=position,  # type: ignore[arg-type]
        instance_number=int(number) if number not in (None, "") else 0,
        rows=int(ds.Rows), columns=int(ds.Columns),
        pixel_spacing_mm=None if spacing in (None, "") else tuple(float(v) for v in spacing))
  except (ValueError, TypeError) as e:
    raise StudyError(study, path, f"bad DICOM header value: {e}", errors.CORRUPT_DICOM) from e


def group_series(headers: Sequence[SliceHeader]) -> dict[str, Series]:
  """Groups slice headers by SeriesInstanceUID; sagittal series sorted by x descending, others along their normal."""
  by_series: dict[str, list[SliceHeader]] = {}
  for h in headers:
    by_series.setdefault(h.series_uid, []).append(h)
  result = {}
  for uid, members in by_series.items():
    plane = plane_of(members[0].orientation)
    if plane == "sagittal":
      ordered = sorted(members, key=lambda h: (-h.position_mm[0], h.instance_number, h.path))
    else:
      normal = np.cross(members[0].orientation[:3], members[0].orientation[3:6])
      ordered = sorted(members, key=lambda h: (float(np.dot(normal, h.position_mm)), h.instance_number, h.path))
    result[uid] = Series(series_uid=uid, description=members[0].description, plane=plane, slices=tuple(ordered))
  return result


def _decode(header: SliceHeader, study: str) -> np.ndarray:
  """Decoded pixels `[H, W]` float64, MONOCHROME1 inverted so that brighter always means a larger value."""
  try:
    ds = pydicom.dcmread(header.path)
    pixels = np.asarray(ds.pixel_array)
  except Exception as e:  # pydicom raises many types for damaged pixel data; all mean the same to us.
    raise StudyError(study, header.path, f"cannot decode pixel data: {type(e).__name__}: {e}",
                     errors.CORRUPT_DICOM) from e
  if pixels.ndim != 2:
    raise StudyError(study, header.path, f"expected one 2-D grey frame, got pixel array of shape {pixels.shape}",
                     errors.BAD_IMAGE)
  pixels = pixels.astype(np.float64)
  if str(ds.get("PhotometricInterpretation", "MONOCHROME2")).strip().upper() == "MONOCHROME1":
    bits = int(ds.get("BitsStored", 16))
    pixels = (2.0**bits - 1.0) - pixels
  return pixels


def pixel_spacing(header: SliceHeader, study: str) -> np.ndarray:
  """PixelSpacing `[2]` float32 (row, col) mm of one slice; raises StudyError when missing or not positive."""
  spacing = header.pixel_spacing_mm
  if spacing is None or len(spacing) != 2:
    raise StudyError(study, header.path, f"PixelSpacing missing or not 2 values: {spacing!r}", errors.BAD_IMAGE)
  values = np.asarray(spacing, np.float32)
  if not np.all(np.isfinite(values)) or np.any(values <= 0):
    raise StudyError(study, header.path, f"PixelSpacing {values.tolist()} is not positive", errors.BAD_IMAGE)
  return values


def min_max_uint16(channel: np.ndarray) -> np.ndarray:
  """Min-max scales one `[H, W]` channel to uint16 0..65535; a constant channel gives zeros (never NaN)."""
  low, high = float(channel.min()), float(channel.max())
  if high <= low:
    return np.zeros(channel.shape, np.uint16)
  return np.rint((channel - low) * (UINT16_MAX / (high - low))).astype(np.uint16)


def choose_series(series: dict[str, Series], study: str, folder: str) -> Series:
  """The unannotated rule: among sagittal T2 (not T1) series the one whose middle slice is brightest (mean pixel);
  else the brightest sagittal series. Raises StudyError when there is no sagittal series."""
  sagittal = [s for s in series.values() if s.plane == "sagittal"]
  if not sagittal:
    planes = sorted({s.plane for s in series.values()})
    raise StudyError(study, folder, f"no sagittal series (planes found: {', '.join(planes)})", errors.NO_SAGITTAL)
  candidates = [s for s in sagittal if s.is_t2] or sagittal
  if len(candidates) == 1:
    return candidates[0]
  means = [float(_decode(s.slices[len(s.slices) // 2], study).mean()) for s in candidates]
  return candidates[int(np.argmax(means))]


def read_study(folder: str | os.PathLike, *, headers: Sequence[SliceHeader], problems: Sequence[StudyError] = (),
               instance_uid: str | None = None, series_uid: str | None = None, study_uid: str | None = None,
               study: str | None = None) -> StudyImage:
  """Reads the 3-slice input stack of one study.

  Args:
    folder: the study folder (`.../studyN`), named in errors.
    headers, problems: the folder's headers and the files that did not read (`layout.scan_headers(folder)`).
    instance_uid: the annotated SOPInstanceUID; when None, the T2-sagittal + middle-slice rule picks the slice.
    series_uid: the annotated SeriesInstanceUID; when given, the annotated instance must belong to it.
    study_uid: keep only files of this StudyInstanceUID (a folder may hold several studies).
    study: the study's name in error messages (default: the folder).

  Returns:
    StudyImage with `image` uint16 `[H, W, 3]` (slices z-1, z, z+1, edges repeated, each min-max scaled).

  Raises:
    StudyError: unreadable file, no sagittal series, annotated instance missing or not
      sagittal or in another series, bad pixel spacing, neighbour slices of another size.
  """
  folder = os.fspath(folder)
  study = study or folder
  if problems:
    raise problems[0]
  if study_uid is not None:
    headers = [h for h in headers if h.study_uid == study_uid]
    if not headers:
      raise StudyError(study, folder, f"no file with StudyInstanceUID {study_uid}", errors.MISSING_INSTANCE)
  all_series = group_series(headers)

  if instance_uid is not None:
    matches = [h for h in headers if h.instance_uid == instance_uid]
    if not matches:
      raise StudyError(study, folder, f"annotated instance {instance_uid} is not in the folder",
                       errors.MISSING_INSTANCE)
    chosen = all_series[matches[0].series_uid]
    if series_uid is not None and chosen.series_uid != series_uid:
      raise StudyError(study, matches[0].path, f"annotated instance {instance_uid} belongs to series "
                       f"{chosen.series_uid}, but the annotation names series {series_uid}", errors.SERIES_MISMATCH)
    if chosen.plane != "sagittal":
      if not any(s.plane == "sagittal" for s in all_series.values()):
        kind = errors.NO_SAGITTAL
      else:
        kind = errors.BAD_IMAGE
      raise StudyError(study, matches[0].path, f"annotated instance lies in a {chosen.plane} series, not sagittal",
                       kind)
    z = next(i for i, h in enumerate(chosen.slices) if h.instance_uid == instance_uid)
  else:
    chosen = choose_series(all_series, study, folder)
    z = len(chosen.slices) // 2

  centre = chosen.slices[z]
  last = len(chosen.slices) - 1
  neighbours = [chosen.slices[min(max(i, 0), last)] for i in (z - 1, z, z + 1)]
  decoded: dict[str, np.ndarray] = {}
  for h in neighbours:
    if h.path not in decoded:
      decoded[h.path] = _decode(h, study)
  shape = decoded[centre.path].shape
  for h in neighbours:
    if decoded[h.path].shape != shape:
      raise StudyError(study, h.path, f"neighbour slice has shape {decoded[h.path].shape}, the chosen slice {shape}",
                       errors.BAD_IMAGE)
  image = np.stack([min_max_uint16(decoded[h.path]) for h in neighbours], axis=-1)
  return StudyImage(
      image=image, pixel_spacing_mm=pixel_spacing(centre, study), study_uid=centre.study_uid,
      series_uid=centre.series_uid, instance_uid=centre.instance_uid, z_index=z,
      native_hw=(int(shape[0]), int(shape[1])), series_description=chosen.description, path=centre.path)


def to_float01(image: np.ndarray) -> np.ndarray:
  """uint16 `[..., H, W, C]` stack (0..65535) -> float32 in [0, 1] (the inverse of the 0..65535 scaling above)."""
  return np.asarray(image, np.float32) * np.float32(1.0 / UINT16_MAX)
