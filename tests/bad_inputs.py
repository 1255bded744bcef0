"""Bad inputs for the fuzz tests: damaged DICOM bytes and annotation entries with a wrong type in one field.

Everything is deterministic (seeded), so a failure names an input that can be made again.
"""

from __future__ import annotations

import copy
import pathlib
from collections.abc import Iterator
from typing import Any

import numpy as np
import pydicom
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.encaps import encapsulate
from pydicom.sequence import Sequence
from pydicom.uid import generate_uid

from ccfnet_jax.data import dicom_write

PIXEL_DATA_TAG = b"\xe0\x7f\x10\x00"  # (7FE0,0010) in little endian


def pixel_data_offset(data: bytes) -> int:
  """Where the PixelData element starts: the end of the header (file meta and data set) that readers parse."""
  offset = data.rfind(PIXEL_DATA_TAG)
  if offset < 0:
    raise ValueError("no PixelData element in the file")
  return offset


def truncations(data: bytes) -> Iterator[tuple[str, bytes]]:
  """The file cut at every byte of its header, 0 .. the start of PixelData inclusive: (label, bytes)."""
  for cut in range(pixel_data_offset(data) + 1):
    yield f"cut at byte {cut}", data[:cut]


def corruptions(data: bytes, count: int, seed: int) -> Iterator[tuple[str, bytes]]:
  """`count` copies of the file with 1..3 random header bytes replaced by random values: (label, bytes)."""
  rng = np.random.default_rng(seed)
  end = pixel_data_offset(data)
  for k in range(count):
    damaged = bytearray(data)
    where = rng.integers(0, end, size=int(rng.integers(1, 4)))
    for i in where:
      damaged[int(i)] = int(rng.integers(0, 256))
    yield f"corruption {k}: bytes {sorted(int(i) for i in where)}", bytes(damaged)


# One value of each JSON type, and a few values that are the right type but out of range.
WRONG_VALUES: dict[str, Any] = {
    "list": [1, "a"], "object": {"a": 1}, "null": None, "number": 3, "float": 2.5, "string": "x", "bool": True,
    "huge_int": 10**400, "nan": float("nan"), "empty_list": [], "empty_string": "",
}


def _json_type(value: Any) -> str:
  if value is None:
    return "null"
  if isinstance(value, bool):
    return "bool"
  if isinstance(value, (int, float)):
    return "number"
  if isinstance(value, str):
    return "string"
  return "list" if isinstance(value, list) else "object"


def _paths(value: Any, path: tuple = ()) -> Iterator[tuple]:
  """Every path (keys / indices) in a JSON value, the root included, parents before children."""
  yield path
  if isinstance(value, dict):
    for key, child in value.items():
      yield from _paths(child, path + (key,))
  elif isinstance(value, list):
    for i, child in enumerate(value):
      yield from _paths(child, path + (i,))


def _set(root: Any, path: tuple, value: Any) -> Any:
  if not path:
    return value
  node = root
  for key in path[:-1]:
    node = node[key]
  node[path[-1]] = value
  return root


def annotation_mutations(entry: dict) -> Iterator[tuple[str, Any]]:
  """Copies of one study entry with one field (any depth, the entry itself included) replaced by a value of another
  JSON type, or by an empty / huge / NaN value: (label, mutated entry)."""
  for path in _paths(entry):
    node = entry
    for key in path:
      node = node[key]
    original_type = _json_type(node)
    for name, value in WRONG_VALUES.items():
      if _json_type(value) == original_type and name in ("list", "object", "null", "number", "string", "bool"):
        continue  # same type as what belongs there
      mutated = _set(copy.deepcopy(entry), path, copy.deepcopy(value))
      yield f"{'.'.join(map(str, path)) or '<entry>'} = {name}", mutated
    if isinstance(node, dict):
      for key in node:
        mutated = copy.deepcopy(entry)
        target = mutated
        for k in path:
          target = target[k]
        del target[key]
        yield f"{'.'.join(map(str, path + (key,)))} deleted", mutated


# ------------------------------------------------------------------------------------------------ other files
def with_unknown_vr(data: bytes, tag: tuple[int, int] = (0x0008, 0x103E)) -> bytes:
  """The file with the explicit VR of element `tag` (default SeriesDescription) replaced by the unknown VR 'ZZ'."""
  key = tag[0].to_bytes(2, "little") + tag[1].to_bytes(2, "little")
  at = data.rfind(key)
  if at < 0:
    raise ValueError(f"no element {tag} in the file")
  return data[:at + 4] + b"ZZ" + data[at + 6:]


OTHER_KINDS = ("structured_report", "presentation_state", "localizer", "enhanced_multiframe")


def write_other_file(path, kind: str, study_uid: str, series_uid: str | None = None) -> str:
  """Writes a file a study folder may hold beside its images but that no reader should use; returns its
  SOPInstanceUID. Kinds: a structured report and a presentation state (no image), a 3-plane localizer (one file
  per plane, `path` gets `_k` suffixes), an enhanced multi-frame MR image (geometry in functional groups only)."""
  path = pathlib.Path(path)

  def uid(*parts: object) -> str:  # the same call writes the same bytes
    return generate_uid(entropy_srcs=[study_uid, kind, path.name, *map(str, parts)])

  series_uid = series_uid or uid("series")
  if kind == "localizer":
    orientations = (dicom_write.SAGITTAL_ORIENTATION, dicom_write.AXIAL_ORIENTATION,
                    dicom_write.CORONAL_ORIENTATION)
    paths = [path.with_name(f"{path.stem}_{k}{path.suffix}") for k in range(3)]
    uids = []
    for k, (p, orientation) in enumerate(zip(paths, orientations)):
      uids += dicom_write.write_series([p], [np.full((6, 6), 900, np.uint16)], study_uid=study_uid,
                                       series_uid=series_uid, description="localizer", orientation=orientation,
                                       positions=[(0.0, 0.0, 0.0)], instance_uids=[uid("instance", k)])
    for p in paths:
      ds = pydicom.dcmread(p)
      ds.ImageType = ["ORIGINAL", "PRIMARY", "LOCALIZER"]
      ds.save_as(p, enforce_file_format=True)
    return uids[0]
  sop_class = {"structured_report": "1.2.840.10008.5.1.4.1.1.88.11",
               "presentation_state": "1.2.840.10008.5.1.4.1.1.11.1",
               "enhanced_multiframe": "1.2.840.10008.5.1.4.1.1.4.1"}[kind]
  instance_uid = uid("instance")
  ds = dicom_write.new_dataset(sop_class, instance_uid)
  ds.StudyInstanceUID, ds.SeriesInstanceUID = study_uid, series_uid
  ds.Modality = {"structured_report": "SR", "presentation_state": "PR"}.get(kind, "MR")
  if kind == "structured_report":
    ds.ValueType, ds.CompletionFlag = "CONTAINER", "COMPLETE"
  if kind == "enhanced_multiframe":
    frames = 3
    ds.NumberOfFrames = frames
    ds.Rows = ds.Columns = 6
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    plane = Dataset()
    plane.ImageOrientationPatient = list(dicom_write.SAGITTAL_ORIENTATION)
    shared = Dataset()
    shared.PlaneOrientationSequence = Sequence([plane])
    ds.SharedFunctionalGroupsSequence = Sequence([shared])
    ds.PixelData = np.full((frames, 6, 6), 1000, "<u2").tobytes()
  path.parent.mkdir(parents=True, exist_ok=True)
  ds.save_as(path, enforce_file_format=True)
  return instance_uid


def make_jpeg_ls(path) -> None:
  """Rewrites a DICOM file as if its pixels were JPEG-LS compressed (no decoder for it is installed)."""
  ds = pydicom.dcmread(path)
  ds.file_meta.TransferSyntaxUID = pydicom.uid.JPEGLSLossless
  ds.PixelData = encapsulate([b"\xff\xd8\xff\xf7" + b"\0" * 60])
  ds["PixelData"].VR = "OB"
  ds.save_as(path, enforce_file_format=True)


def set_geometry(path, *, position=None, orientation=None) -> None:
  """Rewrites ImagePositionPatient / ImageOrientationPatient of a file as the given values, written as text so that
  values no writer should produce (NaN, inf) get in too."""
  ds = pydicom.dcmread(path)
  for keyword, values in (("ImagePositionPatient", position), ("ImageOrientationPatient", orientation)):
    if values is not None:
      text = "\\".join(str(float(v)) for v in values)
      ds[keyword] = DataElement(ds.data_element(keyword).tag, "DS", text)
  ds.save_as(path, enforce_file_format=True)
