"""Writes phantom studies as the official release: DICOM study folders and the annotation JSON (docs/method.md#data).

Reading them back (`layout.scan_headers`, `dicom.read_study`, `annotations`) gives exactly the records of
`generate_study`, so the whole DICOM path can be tested on phantoms.
"""

from __future__ import annotations

import json
import os
import pathlib

import numpy as np

from ccfnet_jax import objects
from ccfnet_jax.data import dicom_write
from ccfnet_jax.data.phantom import raster
from ccfnet_jax.data.phantom.anatomy import (DECOYS, ORDER, SLICE_GAP_MM, PhantomStudy, phantom_study, study_rng,
                                             study_uid)


def _axial_decoy(rng: np.random.Generator, size: int = 128) -> np.ndarray:
  """A plainly synthetic axial slice `[size, size]` uint16: body outline, vertebral body and canal, mid-grey, noisy."""
  c = (np.arange(size, dtype=np.float32) - (size - 1) / 2.0) / np.float32(size / 2.0)
  x, y = c[None, :], c[:, None]
  image = np.where(x * x / 0.85 + y * y / 0.55 < 1.0, 0.35, 0.02).astype(np.float32)
  image = np.where((x / 0.18)**2 + ((y + 0.05) / 0.16)**2 < 1.0, 0.45, image)
  image = np.where((x / 0.08)**2 + ((y - 0.2) / 0.07)**2 < 1.0, 0.8, image)
  image = image + rng.standard_normal((size, size), dtype=np.float32) * np.float32(0.03)
  return np.clip(image * 3000.0, 0.0, 4095.0).astype(np.uint16)


def _annotation_entry(study: PhantomStudy, rng: np.random.Generator) -> dict:
  """The official JSON entry of one study: points in random order, integer coords, one label key each."""
  points = []
  for i in rng.permutation(objects.NUM_OBJECTS):
    if not study.point_valid[i]:
      continue
    name = objects.NAMES[i]
    points.append({"coord": [int(study.points_xy[i, 0]), int(study.points_xy[i, 1])],
                   "tag": {"identification": name, objects.label_key(name): study.tags[i]},
                   "zIndex": study.z_index})
  return {"studyUid": study.study_uid, "version": "v0.1",
          "data": [{"seriesUid": study.t2_series_uid, "instanceUid": study.instance_uid(),
                    "annotation": [{"annotator": 1, "data": {"point": points}}]}]}


def write_official_layout(root: str | os.PathLike, n_studies: int, seed: int = 0, name: str = "lumbar_phantom",
                          start_index: int = 0) -> tuple[pathlib.Path, pathlib.Path]:
  """Writes phantom studies `start_index .. start_index + n_studies - 1` in the official Tianchi layout.

  Writes `root/<name>/study<index>/image<K>.dcm` and `root/<name>_annotation.json`. Each study folder holds, mixed
  flat with shuffled file numbers K:
    - the labelled T2 sagittal series `T2_TSE_SAG` (5..7 slices at the native size; slice k at x = (n-1)/2 * 4.4 mm
      - k * 4.4 mm, so x descending is slice order and the annotated slice's index is the JSON `zIndex`; its
      neighbours are the lateral neighbours, rendered with the same rule as `generate_study`);
    - a dimmer T1 sagittal decoy `T1_TSE_SAG` (3 slices at half resolution, same field of view);
    - an axial T2 decoy `T2_TSE_TRA` (3 plainly synthetic 128x128 slices).
  Pixels are stored as 16-bit (BitsStored 16, MONOCHROME2); each T2 slice spans the full 0..65535 range, so reading
  it back gives exactly the record of `generate_study(index, seed)`. The JSON has one entry per study (in shuffled
  order, joined by studyUid), integer coords equal to the record's points.

  Returns:
    (study_dir, annotation_path) = (`root/<name>`, `root/<name>_annotation.json`).
  """
  if n_studies < 1:
    raise ValueError(f"write_official_layout: n_studies must be >= 1, got {n_studies}")
  root = pathlib.Path(root)
  study_dir = root / name
  annotation_path = root / f"{name}_annotation.json"
  entries = []
  for index in range(start_index, start_index + n_studies):
    study = phantom_study(index, seed)
    rng = study_rng(seed, index, DECOYS)
    folder = study_dir / f"study{index}"
    n_t2, n_t1, n_ax = study.num_slices, 3, 3
    file_numbers = rng.permutation(n_t2 + n_t1 + n_ax)
    paths = [folder / f"image{k}.dcm" for k in file_numbers]
    series_numbers = rng.permutation([2, 3, 4])
    row_mm, col_mm = study.spacing_mm
    patient = f"PHANTOM-{seed}-{index}"

    def sagittal(n: int, first: int, shape: tuple[int, int], spacing: tuple[float, float]) -> list:
      # Top-left pixel centre such that the image centre lies at y = z = 0.
      y0 = -(shape[1] - 1) / 2.0 * spacing[1]
      z0 = (shape[0] - 1) / 2.0 * spacing[0]
      x = dicom_write.sagittal_positions(study.num_slices, spacing_mm=SLICE_GAP_MM, y_mm=y0, z_mm=z0)
      return x[first:first + n]

    t2_slices = [raster.render_slice(study, k) for k in range(n_t2)]
    dicom_write.write_series(
        paths[:n_t2], t2_slices, study_uid=study.study_uid, series_uid=study.t2_series_uid,
        instance_uids=study.t2_instance_uids, description="T2_TSE_SAG",
        positions=sagittal(n_t2, 0, (study.height, study.width), study.spacing_mm),
        pixel_spacing_mm=study.spacing_mm, series_number=int(series_numbers[0]), patient_id=patient)

    t1_shape = (study.height // 2, study.width // 2)
    t1_spacing = (row_mm * study.height / t1_shape[0], col_mm * study.width / t1_shape[1])
    first = study.z_index - 1
    t1_slices = [raster.render_slice(study, k, "t1", shape=t1_shape) // 32 for k in range(first, first + n_t1)]
    dicom_write.write_series(
        paths[n_t2:n_t2 + n_t1], t1_slices, study_uid=study.study_uid, series_uid=study.t1_series_uid,
        instance_uids=[study_uid(seed, index, "instance", "T1_TSE_SAG", k) for k in range(n_t1)],
        description="T1_TSE_SAG", positions=sagittal(n_t1, first, t1_shape, t1_spacing),
        pixel_spacing_mm=t1_spacing, series_number=int(series_numbers[1]), patient_id=patient)

    dicom_write.write_series(
        paths[n_t2 + n_t1:], [_axial_decoy(rng) for _ in range(n_ax)], study_uid=study.study_uid,
        series_uid=study.axial_series_uid,
        instance_uids=[study_uid(seed, index, "instance", "T2_TSE_TRA", k) for k in range(n_ax)],
        description="T2_TSE_TRA", orientation=dicom_write.AXIAL_ORIENTATION,
        positions=[(-100.0, -100.0, 30.0 - 30.0 * k) for k in range(n_ax)], pixel_spacing_mm=(1.6, 1.6),
        series_number=int(series_numbers[2]), patient_id=patient)
    entries.append(_annotation_entry(study, rng))

  order = study_rng(seed, start_index, ORDER, n_studies).permutation(len(entries))
  annotation_path.parent.mkdir(parents=True, exist_ok=True)
  with open(annotation_path, "w", encoding="utf-8") as f:
    json.dump([entries[i] for i in order], f)
  return study_dir, annotation_path
