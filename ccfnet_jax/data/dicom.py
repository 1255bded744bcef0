"""Reads the DICOM files of one study into the 3-slice input stack (docs/method.md#data).

A study folder holds every series of one study mixed flat (`studyN/imageK.dcm`; file names carry no meaning).
Reading:
  1. `layout.scan_headers` reads every file's header (`read_header`, no pixels); `group_series` groups them by
     SeriesInstanceUID; each series gets its plane from the normal of ImageOrientationPatient, and a sagittal series
     is sorted by ImagePositionPatient x, descending (index = zIndex).
  2. `read_study`: picks the slice — the annotation's SOPInstanceUID when given, else the T2-sagittal +
     brightest-middle-slice rule — and decodes only the pixels it needs: slices (z-1, z, z+1) with the edges
     repeated, MONOCHROME1 inverted, each channel min-max scaled to 0..65535 (uint16; a constant slice gives 0).

Bad input policy: every problem is a `StudyError` naming the file, the study and a kind; nothing else escapes.
  - A file whose header cannot be read or is incomplete (not DICOM, cut short, an unknown VR, a broken value) fails
    the study (corrupt_dicom): its series is unknown, or it claims to be an image and lacks the image tags, so it
    might be one of the slices we need.
  - A complete header that is no single-frame image we can place (a structured report, a presentation state, a
    localizer, an enhanced multi-frame image: not_an_image), or whose geometry is not finite (bad_geometry), fails
    the study only when it belongs to the series or instance we need; otherwise it is left out and reported in
    `StudyImage.ignored`.
  - Pixels are decoded only where needed (the chosen slice, its neighbours, the middle slices the series rule
    compares); a cut pixel section is corrupt_dicom, a compression without an installed decoder
    unsupported_transfer_syntax, naming the packages that would decode it.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Sequence

import numpy as np
import pydicom
from pydicom.pixels import get_decoder

from ccfnet_jax.data import errors
from ccfnet_jax.data.errors import StudyError

UINT16_MAX = 65535
_IDENTITY = {"study_uid": "StudyInstanceUID", "series_uid": "SeriesInstanceUID", "instance_uid": "SOPInstanceUID"}
_IMAGE_TAGS = ("ImageOrientationPatient", "ImagePositionPatient", "Rows", "Columns")
_PLANE_THRESHOLD = 0.75
# SOP classes that are no image, or whose geometry lives in per-frame groups (one file per slice is what we read).
_NOT_IMAGE_SOP_PREFIXES = ("1.2.840.10008.5.1.4.1.1.88.", "1.2.840.10008.5.1.4.1.1.11.", "1.2.840.10008.5.1.4.1.1.104.",
                           "1.2.840.10008.5.1.4.1.1.66", "1.2.840.10008.5.1.4.1.1.481.")
_MULTIFRAME_SOP_CLASSES = ("1.2.840.10008.5.1.4.1.1.4.1", "1.2.840.10008.5.1.4.1.1.4.4", "1.2.840.10008.5.1.4.1.1.2.1",
                           "1.2.840.10008.5.1.4.1.1.2.2")


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
    ignored: the folder's bad files that the chosen slices do not need (left out, see the module docstring).
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
  ignored: tuple[StudyError, ...] = ()


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


def _text(ds: pydicom.Dataset, keyword: str) -> str:
  value = ds.get(keyword)
  return "" if value is None else str(value).strip()


def read_header(path: str, study: str) -> SliceHeader:
  """Reads one file's header without its pixels.

  Raises:
    StudyError: corrupt_dicom (unreadable or incomplete header), not_an_image or bad_geometry; the last two carry
      the file's study, series and instance UIDs.
  """
  def fail(reason: str, kind: str = errors.CORRUPT_DICOM, **ids: str) -> StudyError:
    return StudyError(study, path, reason, kind, **ids)

  try:
    ds = pydicom.dcmread(path, stop_before_pixels=True)
  except Exception as e:  # a damaged file makes pydicom raise nearly anything (struct.error, ...): all mean corrupt
    raise fail(f"unreadable DICOM header: {type(e).__name__}: {e}") from e
  try:
    ids = {key: _text(ds, keyword) for key, keyword in _IDENTITY.items()}
    meta = getattr(ds, "file_meta", pydicom.Dataset())
    sop_class = _text(ds, "SOPClassUID") or _text(meta, "MediaStorageSOPClassUID")
    frames = ds.get("NumberOfFrames")
    image_type = [str(v).upper() for v in (ds.get("ImageType") or [])]
  except Exception as e:  # pydicom converts values lazily: a broken value raises here
    raise fail(f"bad DICOM header value: {type(e).__name__}: {e}") from e
  missing = [keyword for key, keyword in _IDENTITY.items() if not ids[key]]
  if missing:
    raise fail(f"DICOM header lacks {', '.join(missing)} (cut short, or not a DICOM image)")
  not_image = None
  if sop_class.startswith(_NOT_IMAGE_SOP_PREFIXES):
    not_image = f"SOP class {sop_class} is no image"
  elif sop_class in _MULTIFRAME_SOP_CLASSES or (frames not in (None, "") and _as_int(frames, 1) > 1):
    not_image = f"a multi-frame image (SOP class {sop_class}, {frames} frames): one file per slice is read"
  elif "LOCALIZER" in image_type:
    not_image = "a localizer (ImageType LOCALIZER)"
  if not_image:
    raise fail(not_image, errors.NOT_AN_IMAGE, **ids)
  try:
    missing = [k for k in _IMAGE_TAGS if k not in ds or ds.get(k) in (None, "")]
    if missing:
      raise fail(f"DICOM header lacks {', '.join(missing)} (cut short, or not an image)", **ids)
    orientation = tuple(float(v) for v in ds.ImageOrientationPatient)
    position = tuple(float(v) for v in ds.ImagePositionPatient)
    number = ds.get("InstanceNumber")
    spacing = ds.get("PixelSpacing")
    rows, columns = int(ds.Rows), int(ds.Columns)
    header = SliceHeader(
        path=path, study_uid=ids["study_uid"], series_uid=ids["series_uid"], instance_uid=ids["instance_uid"],
        description=_text(ds, "SeriesDescription"), orientation=orientation,
        position_mm=position,  # type: ignore[arg-type]
        instance_number=_as_int(number, 0), rows=rows, columns=columns,
        pixel_spacing_mm=None if spacing in (None, "") else tuple(float(v) for v in spacing))
  except StudyError:
    raise
  except Exception as e:  # lazily converted values (DS, IS, US) of a damaged header
    raise fail(f"bad DICOM header value: {type(e).__name__}: {e}", **ids) from e
  if len(orientation) != 6 or len(position) != 3:
    raise fail(f"ImageOrientationPatient has {len(orientation)} values (6 expected), ImagePositionPatient "
               f"{len(position)} (3 expected)", errors.BAD_GEOMETRY, **ids)
  if not all(math.isfinite(v) for v in orientation + position):
    raise fail(f"ImageOrientationPatient {list(orientation)} / ImagePositionPatient {list(position)} hold a value "
               "that is not finite: the slice cannot be placed", errors.BAD_GEOMETRY, **ids)
  if np.linalg.norm(np.cross(orientation[:3], orientation[3:])) < 0.5:
    raise fail(f"ImageOrientationPatient {list(orientation)} is not two orthogonal unit directions",
               errors.BAD_GEOMETRY, **ids)
  if rows < 1 or columns < 1:
    raise fail(f"image of {rows}x{columns} pixels", errors.BAD_IMAGE, **ids)
  return header


def _as_int(value, default: int) -> int:
  """An IS value as int (a damaged one may hold '1.5' or junk: `default`)."""
  try:
    return int(value) if value not in (None, "") else default
  except (TypeError, ValueError, OverflowError):
    return default


def group_series(headers: Sequence[SliceHeader]) -> dict[str, Series]:
  """Groups slice headers by SeriesInstanceUID; sagittal series sorted by x descending, others along their normal.

  A series whose slices lie in different planes gets the plane 'mixed' and is never chosen.
  """
  by_series: dict[str, list[SliceHeader]] = {}
  for h in headers:
    by_series.setdefault(h.series_uid, []).append(h)
  result = {}
  for uid, members in by_series.items():
    planes = {plane_of(h.orientation) for h in members}
    plane = planes.pop() if len(planes) == 1 else "mixed"
    if plane == "sagittal":
      ordered = sorted(members, key=lambda h: (-h.position_mm[0], h.instance_number, h.path))
    else:
      normal = np.cross(members[0].orientation[:3], members[0].orientation[3:6])
      ordered = sorted(members, key=lambda h: (float(np.dot(normal, h.position_mm)), h.instance_number, h.path))
    result[uid] = Series(series_uid=uid, description=members[0].description, plane=plane, slices=tuple(ordered))
  return result


def _decoder_problem(ds: pydicom.Dataset) -> str | None:
  """Why the pixels of `ds` cannot be decoded here (its transfer syntax has no installed decoder), or None."""
  syntax = getattr(ds, "file_meta", pydicom.Dataset()).get("TransferSyntaxUID")
  if syntax is None:
    return None
  try:
    decoder = get_decoder(syntax)
  except NotImplementedError:
    return f"pixel data in transfer syntax {syntax} ({syntax.name}), which pydicom cannot decode"
  if decoder.is_available:
    return None
  plugins = "; ".join(decoder.missing_dependencies)
  return (f"pixel data in {syntax.name} ({syntax}) needs a decoder plugin that is not installed: one of {plugins} "
          "(e.g. pip install pylibjpeg pylibjpeg-libjpeg pylibjpeg-openjpeg, or python-gdcm)")


def _decode(header: SliceHeader, study: str) -> np.ndarray:
  """Decoded pixels `[H, W]` float64, MONOCHROME1 inverted so that brighter always means a larger value."""
  def fail(reason: str, kind: str) -> StudyError:
    return StudyError(study, header.path, reason, kind, study_uid=header.study_uid, series_uid=header.series_uid,
                      instance_uid=header.instance_uid)

  try:
    ds = pydicom.dcmread(header.path)
  except Exception as e:  # pydicom raises many types for a damaged file; all mean the same to us.
    raise fail(f"cannot read the file: {type(e).__name__}: {e}", errors.CORRUPT_DICOM) from e
  try:
    unsupported = _decoder_problem(ds)
  except Exception:  # a damaged transfer syntax value: decoding below reports it
    unsupported = None
  if unsupported:
    raise fail(unsupported, errors.UNSUPPORTED_TRANSFER_SYNTAX)
  try:
    pixels = np.asarray(ds.pixel_array)
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).strip().upper()
    bits = int(ds.get("BitsStored", 16))
  except Exception as e:  # pydicom raises many types for damaged pixel data; all mean the same to us.
    raise fail(f"cannot decode pixel data: {type(e).__name__}: {e}", errors.CORRUPT_DICOM) from e
  if pixels.ndim != 2:
    raise fail(f"expected one 2-D grey frame, got pixel array of shape {pixels.shape}", errors.BAD_IMAGE)
  pixels = pixels.astype(np.float64)
  if not np.all(np.isfinite(pixels)):
    raise fail("pixel values that are not finite", errors.BAD_IMAGE)
  if photometric == "MONOCHROME1":
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
    headers, problems: the folder's headers and the files that did not read (`layout.scan_headers(folder)`); a
      problem fails the study when it is corrupt_dicom, names no series, or lies in the series or is the instance
      the slice needs, and is left out (`StudyImage.ignored`) otherwise.
    instance_uid: the annotated SOPInstanceUID; when None, the T2-sagittal + middle-slice rule picks the slice.
    series_uid: the annotated SeriesInstanceUID; when given, the annotated instance must belong to it.
    study_uid: keep only files of this StudyInstanceUID (a folder may hold several studies).
    study: the study's name in error messages (default: the folder).

  Returns:
    StudyImage with `image` uint16 `[H, W, 3]` (slices z-1, z, z+1, edges repeated, each min-max scaled).

  Raises:
    StudyError: a problem that matters (above), no sagittal series, annotated instance missing, in two files, not
      sagittal or in another series, bad pixel spacing, neighbour slices of another size.
  """
  folder = os.fspath(folder)
  study = study or folder
  problems = [p.for_study(study) for p in problems]
  for p in problems:
    if p.kind == errors.CORRUPT_DICOM or not p.series_uid:
      raise p
  if instance_uid is not None:
    for p in problems:
      if p.instance_uid == instance_uid:
        raise p
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
    if len(matches) > 1:
      raise StudyError(study, matches[1].path, f"annotated instance {instance_uid} is in {len(matches)} files: "
                       f"{', '.join(h.path for h in matches)}", errors.BAD_IMAGE)
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
  for p in problems:
    if p.series_uid in (chosen.series_uid, series_uid):
      raise p

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
      native_hw=(int(shape[0]), int(shape[1])), series_description=chosen.description, path=centre.path,
      ignored=tuple(problems))


def to_float01(image: np.ndarray) -> np.ndarray:
  """uint16 `[..., H, W, C]` stack (0..65535) -> float32 in [0, 1] (the inverse of the 0..65535 scaling above)."""
  return np.asarray(image, np.float32) * np.float32(1.0 / UINT16_MAX)
