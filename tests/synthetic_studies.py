"""Tiny synthetic studies in the official Tianchi layout, for the DICOM and dataset-builder tests.

Each study folder holds a T2 sagittal series (its slices written in shuffled file order, with InstanceNumbers that
do not follow the x order), a brighter T1 sagittal decoy and an axial decoy, like the real release.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib

import numpy as np
from pydicom.uid import generate_uid

from ccfnet_jax.data import dicom, dicom_write, layout

SLICE_GAP_MM = 4.4


@dataclasses.dataclass
class WrittenStudy:
  folder: pathlib.Path
  study_uid: str
  series_uid: str
  instance_uids: list[str]       # T2 sagittal slices in x-descending order (index = zIndex)
  slices: list[np.ndarray]       # their stored pixels, same order
  files: list[pathlib.Path]      # their files, same order
  spacing_mm: tuple[float, float]
  decoy_files: list[pathlib.Path]


def write_study(folder: pathlib.Path, *, n_slices: int = 3, hw: tuple[int, int] = (12, 16),
                spacing_mm: tuple[float, float] = (0.7, 0.9), monochrome1: bool = False, seed: int = 0,
                t2_description: str = "T2_TSE_SAG", decoys: bool = True, study_uid: str | None = None) -> WrittenStudy:
  """Writes one study; T2 slice i (x-descending order) has distinct random pixels in 100..3000.

  Every UID derives from (seed, the folder's parent and own name), so the same call writes the same bytes.
  """
  rng = np.random.default_rng(seed)

  def uid(*parts: object) -> str:
    return generate_uid(entropy_srcs=[str(seed), folder.parent.name, folder.name, *map(str, parts)])

  study_uid = study_uid or uid("study")
  series_uid = uid("series")
  slices = [rng.integers(100, 3000, size=hw).astype(np.uint16) for _ in range(n_slices)]
  n_decoy = 5 if decoys else 0
  numbers = rng.permutation(n_slices + n_decoy)  # file names say nothing about series or order
  files = [folder / f"image{numbers[i]}.dcm" for i in range(n_slices)]
  positions = dicom_write.sagittal_positions(n_slices, spacing_mm=SLICE_GAP_MM)
  # Write in reverse x order with InstanceNumbers that run against x, so neither can stand in for the x sort.
  order = list(range(n_slices))[::-1]
  uids = [uid("instance", i) for i in range(n_slices)]
  dicom_write.write_series([files[i] for i in order], [slices[i] for i in order], study_uid=study_uid,
                           series_uid=series_uid, instance_uids=[uids[i] for i in order], description=t2_description,
                           positions=[positions[i] for i in order], pixel_spacing_mm=spacing_mm,
                           monochrome1=monochrome1, instance_numbers=[i + 1 for i in range(n_slices)])
  decoy_files = []
  if decoys:
    t1 = [folder / f"image{numbers[n_slices + i]}.dcm" for i in range(2)]
    dicom_write.write_series(t1, [np.full(hw, 3500 + i, np.uint16) for i in range(2)], study_uid=study_uid,
                             series_uid=uid("t1"), description="T1_TSE_SAG",
                             positions=dicom_write.sagittal_positions(2), pixel_spacing_mm=(1.5, 1.5))
    axial = [folder / f"image{numbers[n_slices + 2 + i]}.dcm" for i in range(3)]
    dicom_write.write_series(axial, [np.full((8, 8), 3900, np.uint16)] * 3, study_uid=study_uid,
                             series_uid=uid("axial"), description="T2_TSE_TRA",
                             orientation=dicom_write.AXIAL_ORIENTATION,
                             positions=[(0.0, 0.0, 4.0 * i) for i in range(3)], pixel_spacing_mm=(1.5, 1.5))
    decoy_files = t1 + axial
  return WrittenStudy(folder, study_uid, series_uid, uids, slices, files, spacing_mm, decoy_files)


def point(identification: str, x: float, y: float, label: str, z_index: int = 0, both_keys: bool = False) -> dict:
  """One annotation point in the official schema (label on the key its identification selects)."""
  key = "disc" if "-" in identification else "vertebra"
  tag = {"identification": identification, key: label}
  if both_keys:
    tag["vertebra" if key == "disc" else "disc"] = ""
  return {"coord": [x, y], "tag": tag, "zIndex": z_index}


DEFAULT_NAMES = ("L1", "L2", "L3", "L4", "L5", "T12-L1", "L1-L2", "L2-L3", "L3-L4", "L4-L5", "L5-S1")


def default_points(z_index: int = 1, hw: tuple[int, int] = (12, 16)) -> list[dict]:
  """11 points inside an `hw` image, labels alternating normal/diseased."""
  return [point(name, 1 + i % (hw[1] - 2), 1 + i % (hw[0] - 2), "v1" if i % 2 else "v2", z_index)
          for i, name in enumerate(DEFAULT_NAMES)]


def entry(study_uid: str, series_uid: str, instance_uid: str, points: list[dict]) -> dict:
  """One study of the official annotation list."""
  return {"studyUid": study_uid, "version": "v0.1",
          "data": [{"seriesUid": series_uid, "instanceUid": instance_uid,
                    "annotation": [{"annotator": 1, "data": {"point": points}}]}]}


def write_json(path: pathlib.Path, entries: list[dict]) -> pathlib.Path:
  path.write_text(json.dumps(entries), encoding="utf-8")
  return path


def read_folder(folder, **kwargs) -> dicom.StudyImage:
  """`dicom.read_study` of one folder after its header scan, as the dataset builder and predict do."""
  headers, problems = layout.scan_headers(folder, kwargs.get("study"))
  return dicom.read_study(folder, headers=headers, problems=problems, **kwargs)
