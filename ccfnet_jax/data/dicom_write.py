"""Writes a series of 2-D slices as valid DICOM MR files (pydicom 3, Explicit VR Little Endian).

Generic: it knows nothing about spines or annotations. Used by the tests to build small studies and by the phantom
generator to write studies in the official Tianchi layout (docs/method.md#data).
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage, generate_uid
from pydicom.valuerep import DSfloat

SAGITTAL_ORIENTATION: tuple[float, ...] = (0.0, 1.0, 0.0, 0.0, 0.0, -1.0)
"""Row direction +y, column direction -z: slice normal (row x column) is -x (as in the Tianchi files)."""
AXIAL_ORIENTATION: tuple[float, ...] = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)
CORONAL_ORIENTATION: tuple[float, ...] = (1.0, 0.0, 0.0, 0.0, 0.0, -1.0)


def _ds(value: float) -> DSfloat:
  """A decimal string that fits DICOM's 16-character DS limit."""
  return DSfloat(float(value), auto_format=True)


def new_dataset(sop_class_uid: str, instance_uid: str) -> Dataset:
  """An empty data set of one SOP instance with its file meta (Explicit VR Little Endian), ready to save."""
  meta = FileMetaDataset()
  meta.MediaStorageSOPClassUID = sop_class_uid
  meta.MediaStorageSOPInstanceUID = instance_uid
  meta.TransferSyntaxUID = ExplicitVRLittleEndian
  ds = Dataset()
  ds.file_meta = meta
  ds.SOPClassUID = sop_class_uid
  ds.SOPInstanceUID = instance_uid
  return ds


def write_series(
    paths: Sequence[str | os.PathLike],
    slices: Sequence[np.ndarray] | np.ndarray,
    *,
    study_uid: str,
    series_uid: str,
    instance_uids: Sequence[str] | None = None,
    description: str = "T2_TSE_SAG",
    orientation: Sequence[float] = SAGITTAL_ORIENTATION,
    positions: Sequence[Sequence[float]],
    pixel_spacing_mm: Sequence[float] = (1.0, 1.0),
    monochrome1: bool = False,
    instance_numbers: Sequence[int] | None = None,
    series_number: int = 1,
    slice_thickness_mm: float = 4.0,
    bits_stored: int = 16,
    patient_id: str = "ANONYMOUS",
) -> list[str]:
  """Writes slice `i` of one series to `paths[i]` as a DICOM MR image.

  Args:
    paths: one output file per slice (parent folders are created).
    slices: `[N, H, W]` (or N arrays `[H, W]` of one size) of unsigned integers < 2**bits_stored, stored as uint16.
      Stored values are written as given; with `monochrome1` the reader is expected to invert them.
    study_uid, series_uid: StudyInstanceUID and SeriesInstanceUID.
    instance_uids: SOPInstanceUID per slice; when None, derived from `series_uid` and the slice index (the same
      inputs write the same files, byte for byte).
    description: SeriesDescription (e.g. 'T2_TSE_SAG', 'T1_TSE_SAG', 'T2_TSE_TRA').
    orientation: ImageOrientationPatient, 6 direction cosines (row direction, column direction).
    positions: ImagePositionPatient per slice, `[N, 3]` mm (x, y, z of the top-left pixel centre).
    pixel_spacing_mm: PixelSpacing in DICOM order (row spacing, column spacing), mm.
    monochrome1: PhotometricInterpretation MONOCHROME1 instead of MONOCHROME2.
    instance_numbers: InstanceNumber per slice; 1..N when None.
    series_number, slice_thickness_mm, bits_stored, patient_id: further header values.

  Returns:
    The SOPInstanceUIDs written, one per slice.

  Raises:
    ValueError: when the argument lengths disagree, a slice is not 2-D, sizes differ or values do not fit.
  """
  n = len(paths)
  arrays = [np.asarray(s) for s in slices]
  if len(arrays) != n or len(positions) != n:
    raise ValueError(f"write_series: {n} paths, {len(arrays)} slices and {len(positions)} positions must agree")
  if instance_uids is None:
    instance_uids = [generate_uid(entropy_srcs=[series_uid, "instance", str(i)]) for i in range(n)]
  if instance_numbers is None:
    instance_numbers = list(range(1, n + 1))
  if len(instance_uids) != n or len(instance_numbers) != n:
    raise ValueError(f"write_series: {n} paths but {len(instance_uids)} instance uids / "
                     f"{len(instance_numbers)} instance numbers")
  if len(orientation) != 6 or len(pixel_spacing_mm) != 2:
    raise ValueError("write_series: orientation needs 6 values and pixel_spacing_mm 2 (row, col)")
  if not 1 <= bits_stored <= 16:
    raise ValueError(f"write_series: bits_stored {bits_stored} not in 1..16")
  shape = arrays[0].shape if arrays else None
  frame_of_reference = generate_uid(entropy_srcs=[series_uid, "frame of reference"])
  for path, array, uid, number, position in zip(paths, arrays, instance_uids, instance_numbers, positions):
    if array.ndim != 2 or array.shape != shape:
      raise ValueError(f"write_series: slice for {os.fspath(path)} has shape {array.shape}, expected 2-D {shape}")
    if array.size and (array.min() < 0 or array.max() >= 2**bits_stored):
      raise ValueError(f"write_series: slice for {os.fspath(path)} has values outside 0..{2**bits_stored - 1}")
    if len(position) != 3:
      raise ValueError(f"write_series: position for {os.fspath(path)} needs 3 values (x, y, z) mm")

    ds = new_dataset(MRImageStorage, uid)
    ds.Modality = "MR"
    ds.ImageType = ["ORIGINAL", "PRIMARY", "M", "NONE"]
    ds.SeriesDescription = description
    ds.ProtocolName = description
    ds.PatientName = patient_id
    ds.PatientID = patient_id
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = series_uid
    ds.FrameOfReferenceUID = frame_of_reference
    ds.SeriesNumber = int(series_number)
    ds.InstanceNumber = int(number)
    ds.ImagePositionPatient = [_ds(v) for v in position]
    ds.ImageOrientationPatient = [_ds(v) for v in orientation]
    ds.PixelSpacing = [_ds(v) for v in pixel_spacing_mm]
    ds.SliceThickness = _ds(slice_thickness_mm)
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME1" if monochrome1 else "MONOCHROME2"
    ds.Rows, ds.Columns = int(array.shape[0]), int(array.shape[1])
    ds.BitsAllocated = 16
    ds.BitsStored = int(bits_stored)
    ds.HighBit = int(bits_stored) - 1
    ds.PixelRepresentation = 0
    ds.PixelData = np.ascontiguousarray(array, dtype="<u2").tobytes()

    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
  return list(instance_uids)


def sagittal_positions(n: int, *, spacing_mm: float = 4.4, first_x_mm: float | None = None,
                       y_mm: float = 0.0, z_mm: float = 0.0) -> list[tuple[float, float, float]]:
  """ImagePositionPatient for `n` sagittal slices whose index order is x descending (slice 0 has the largest x).

  With SAGITTAL_ORIENTATION the slice normal points to -x, so index i sits at x = first_x - i * spacing.
  `first_x_mm` defaults to centring the stack on x = 0.
  """
  if first_x_mm is None:
    first_x_mm = (n - 1) * spacing_mm / 2
  return [(first_x_mm - i * spacing_mm, y_mm, z_mm) for i in range(n)]

