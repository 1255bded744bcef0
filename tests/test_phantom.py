"""Tests of the synthetic lumbar-spine phantom (ccfnet_jax.data.phantom)."""

import hashlib
import json
import pathlib
import re

import numpy as np
import pydicom
import pytest

from ccfnet_jax import objects
from ccfnet_jax.data import annotations, dicom, layout, phantom, records
from synthetic_studies import read_folder

UID = re.compile(r"^[0-9]+(\.[0-9]+)*$")
TOP_DISC = objects.INDEX["T12-L1"]


def _first_index_missing_top_disc(limit: int = 300) -> int:
  for index in range(limit):
    if not phantom.phantom_study(index, 0).point_valid[TOP_DISC]:
      return index
  raise AssertionError(f"no phantom among the first {limit} lacks its top disc")


def test_same_index_and_seed_give_identical_bytes():
  a, b = phantom.generate_study(3, seed=1), phantom.generate_study(3, seed=1)
  assert a.keys() == b.keys()
  for key in a:
    if isinstance(a[key], str):
      assert a[key] == b[key]
    else:
      assert a[key].dtype == b[key].dtype and a[key].tobytes() == b[key].tobytes(), key


def test_other_index_or_seed_gives_another_study():
  base = phantom.generate_study(3, seed=1)
  for other in (phantom.generate_study(4, seed=1), phantom.generate_study(3, seed=2)):
    assert other["study_uid"] != base["study_uid"]
    assert other["series_uid"] != base["series_uid"] and other["instance_uid"] != base["instance_uid"]
    assert other["image"].shape != base["image"].shape or not np.array_equal(other["image"], base["image"])


@pytest.mark.parametrize("index", [0, 1, 2, 5, 8])
def test_record_contract(index):
  record = phantom.generate_study(index, seed=0)
  assert set(record) == set(records.RECORD_FIELDS)
  records.validate_record(record)  # the record definition shared with the DICOM reader and TFDS builder

  image = record["image"]
  assert image.dtype == np.uint16 and image.ndim == 3 and image.shape[2] == 3
  height, width = image.shape[:2]
  assert 256 <= height <= 448 and 256 <= width <= 448
  assert np.all(image.reshape(-1, 3).min(0) == 0) and np.all(image.reshape(-1, 3).max(0) == 65535)
  # Neighbouring slices resemble the annotated one but are not copies of it.
  assert not np.array_equal(image[..., 0], image[..., 1]) and not np.array_equal(image[..., 2], image[..., 1])
  mid = image[..., 1].astype(np.float64)
  for k in (0, 2):
    assert np.corrcoef(mid.ravel(), image[..., k].astype(np.float64).ravel())[0, 1] > 0.8

  spacing = record["pixel_spacing_mm"]
  assert spacing.dtype == np.float32 and spacing.shape == (2,)
  assert np.all((spacing >= 0.5) & (spacing <= 1.2))

  xy, valid = record["points_xy"], record["point_valid"]
  assert xy.dtype == np.float32 and xy.shape == (11, 2) and valid.dtype == np.bool_ and valid.shape == (11,)
  assert np.array_equal(xy, np.round(xy)), "points are whole pixels, as the official annotation stores them"
  assert np.all((xy[valid] >= 0) & (xy[valid] < [width, height]))
  assert np.all(xy[~valid] == 0)

  # Anatomy: top to bottom the objects alternate disc, vertebra, ..., 9..24 mm apart.
  chain = [objects.INDEX[n] for n in ("T12-L1", "L1", "L1-L2", "L2", "L2-L3", "L3", "L3-L4", "L4", "L4-L5", "L5",
                                      "L5-S1") if valid[objects.INDEX[n]]]
  ys = xy[chain, 1]
  assert np.all(np.diff(ys) > 0)
  steps_mm = np.hypot(*(np.diff(xy[chain], axis=0) * spacing[::-1]).T)
  assert np.all((steps_mm > 9.0) & (steps_mm < 24.0)), steps_mm

  disease, tags = record["disease"], record["tags"]
  assert disease.dtype == np.int32 and disease.shape == (11,) and len(tags) == 11
  for i in range(11):
    if not valid[i]:
      assert disease[i] == objects.UNKNOWN and tags[i] == ""
      continue
    assert disease[i] == objects.binary_disease_label(str(tags[i]))
    codes = str(tags[i]).split(",")
    if i in objects.VERTEBRA_INDICES:
      assert codes in (["v1"], ["v2"])
    else:
      assert all(c in ("v1", "v2", "v3", "v4", "v5") for c in codes) and len(set(codes)) == len(codes)

  for key in ("study_uid", "series_uid", "instance_uid"):
    assert isinstance(record[key], str) and UID.match(record[key]) and len(record[key]) <= 64
  assert len({record["study_uid"], record["series_uid"], record["instance_uid"]}) == 3


def test_prevalence_and_vocabulary_over_many_studies():
  studies = [phantom.phantom_study(i, seed=0) for i in range(300)]  # labels only, no pixels
  disease = np.stack([s.disease for s in studies])
  vertebra = disease[:, list(objects.VERTEBRA_INDICES)]
  disc = disease[:, list(objects.DISC_INDICES)]
  assert 0.65 <= vertebra.mean() <= 0.9  # the real data: 585 / 750 = 78 %
  disc_known = disc[disc >= 0]
  assert 0.38 <= disc_known.mean() <= 0.62  # the real data: ~52 %
  # Lower discs degenerate more often than the top one.
  assert disc[:, -2:][disc[:, -2:] >= 0].mean() > disc[:, 0][disc[:, 0] >= 0].mean() + 0.2
  missing = np.mean([not s.point_valid[TOP_DISC] for s in studies])
  assert 0.0 < missing <= 0.08
  disc_tags = {s.tags[i] for s in studies for i in objects.DISC_INDICES}
  assert {"v1", "v2", "v3", "v4"} <= disc_tags
  assert any("," in t and "v5" in t for t in disc_tags)
  sizes = {(s.height, s.width) for s in studies}
  assert len(sizes) > 10 and any(h != w for h, w in sizes)


def test_missing_top_disc_is_unknown():
  index = _first_index_missing_top_disc()
  record = phantom.generate_study(index, seed=0)
  assert not record["point_valid"][TOP_DISC] and record["point_valid"].sum() == 10
  assert record["disease"][TOP_DISC] == -1 and record["tags"][TOP_DISC] == ""
  assert np.all(record["points_xy"][TOP_DISC] == 0)


def _window_mean(image: np.ndarray, xy: np.ndarray, radius: int) -> float:
  x, y = int(xy[0]), int(xy[1])
  return float(image[y - radius:y + radius + 1, x - radius:x + radius + 1].mean())


def test_degenerated_discs_are_darker_on_average():
  normal, diseased = [], []
  for index in range(40):
    record = phantom.generate_study(index, seed=5)
    image = record["image"][..., 1].astype(np.float64)
    radius = max(1, int(2.5 / record["pixel_spacing_mm"][0]))
    # Relative to the study's own vertebral bodies (each slice is scaled by its own min and max).
    reference = np.mean([_window_mean(image, record["points_xy"][i], radius) for i in objects.VERTEBRA_INDICES])
    for i in objects.DISC_INDICES:
      if record["point_valid"][i]:
        value = _window_mean(image, record["points_xy"][i], radius) / reference
        (diseased if record["disease"][i] == 1 else normal).append(value)
  assert len(normal) > 50 and len(diseased) > 50
  assert np.mean(diseased) < 0.8 * np.mean(normal)
  # ... but not separable: some degenerated discs look brighter than some normal ones (label noise, strength).
  assert np.max(diseased) > np.min(normal)


def test_vertebral_degeneration_changes_the_body_only():
  study = phantom.phantom_study(2, seed=0)
  vertebra = objects.INDEX["L3"]
  study.looks.strength[vertebra] = 1.0
  study.looks.looks_diseased[vertebra] = False
  healthy = phantom.render_slice(study, study.z_index).astype(np.float64)
  study.looks.looks_diseased[vertebra] = True
  degenerated = phantom.render_slice(study, study.z_index).astype(np.float64)
  change = np.abs(degenerated - healthy)
  assert change.max() > 0.1 * 65535
  # Everything that changed lies within ~25 mm of the body centre.
  rows, cols = np.nonzero(change > 0.02 * 65535)
  x, y = study.points_xy[vertebra]
  distance_mm = np.hypot((cols - x) * study.spacing_mm[1], (rows - y) * study.spacing_mm[0])
  assert distance_mm.max() < 25.0


def test_bad_arguments():
  with pytest.raises(ValueError, match="index"):
    phantom.generate_study(-1)
  with pytest.raises(ValueError, match="seed"):
    phantom.generate_study(0, seed=-3)
  with pytest.raises(ValueError, match="n_studies"):
    phantom.write_official_layout("/nonexistent", 0)


def test_official_layout_reads_back_as_the_records(tmp_path):
  missing = _first_index_missing_top_disc()
  phantom.write_official_layout(tmp_path, 2, seed=0, name="lumbar_phantom", start_index=0)
  study_dir, json_path = phantom.write_official_layout(tmp_path, 1, seed=0, name="other", start_index=missing)
  assert study_dir == tmp_path / "other" and json_path == tmp_path / "other_annotation.json"

  entries = json.loads((tmp_path / "lumbar_phantom_annotation.json").read_text())
  assert len(entries) == 2
  for entry in entries:
    for point in entry["data"][0]["annotation"][0]["data"]["point"]:
      assert all(isinstance(c, int) for c in point["coord"])
      assert set(point["tag"]) == {"identification", objects.label_key(point["tag"]["identification"])}

  for name, index in (("lumbar_phantom", 0), ("lumbar_phantom", 1), ("other", missing)):
    expected = records.validate_record(phantom.generate_study(index, seed=0))
    folder = tmp_path / name / f"study{index}"
    files = sorted(p.name for p in folder.iterdir())
    assert files == sorted(f"image{k}.dcm" for k in range(len(files)))
    headers, problems = layout.scan_headers(folder)
    assert not problems
    series = dicom.group_series(headers)
    assert sorted(s.description for s in series.values()) == ["T1_TSE_SAG", "T2_TSE_SAG", "T2_TSE_TRA"]
    t2 = series[expected["series_uid"]]
    assert t2.plane == "sagittal" and len(t2.slices) >= 5

    found, problems = annotations.load_annotations(tmp_path / f"{name}_annotation.json")
    assert not problems
    annotation = next(a for a in found if a.study_uid == expected["study_uid"])
    assert 1 <= annotation.z_index <= len(t2.slices) - 2
    got = records.read_annotated_study(folder, annotation)
    for key, value in expected.items():
      if isinstance(value, str):
        assert got[key] == value, key
      else:
        assert got[key].dtype == value.dtype and np.array_equal(got[key], value), key
    # Without the annotation, the reader's T2-sagittal rule picks the same series.
    assert read_folder(folder).series_uid == expected["series_uid"]


def test_official_layout_is_byte_identical_across_writes(tmp_path):
  """Every UID of the written files (instances, frame of reference) derives from the seed: no random UIDs."""
  for run in ("a", "b"):
    phantom.write_official_layout(tmp_path / run, 1, seed=3)
  files = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*") if p.is_file())
  assert len(files) > 5
  for f in files:
    assert (tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes(), f


# ------------------------------------------------------------------------------------------------ pinned values
# These values were computed once with the phantom generator as it stood before it was split into the package
# `ccfnet_jax.data.phantom` (anatomy / raster / official_layout), by running the old single-module code; they pin
# that the split, and any later refactoring, changes no byte of any phantom. A deliberate change of the phantoms
# must update them (and every data set built from phantoms changes with it).
PINNED_IMAGE_SHA256 = "3f63d4334c798878f82e247df9c031a010363df961d0c77998df16ca7a42314d"
PINNED_T1_SHA256 = "7e0dbcdeed6d4db8b2b12b254b3053eb07c5b3800fd673ff9592c84b695195f0"
PINNED_LAYOUT_SHA256 = "5335afefe1f75f5afe78c5828c88537dc3d666efaa4da41a90e2457d6db85e52"
PINNED_PIXELS = {(0, 0): [928, 3086, 1501], (100, 120): [8418, 7713, 7709], (160, 216): [1316, 2652, 2333],
                 (319, 431): [1689, 897, 862], (200, 50): [1929, 1890, 1393]}
PINNED_POINTS = [[261, 93], [250, 136], [245, 179], [246, 226], [252, 267], [268, 74], [255, 114], [247, 158],
                 [245, 202], [248, 246], [260, 290]]


def test_phantom_pixels_points_and_labels_are_pinned():
  record = phantom.generate_study(3, seed=1)
  image = record["image"]
  assert image.shape == (320, 432, 3)
  for (y, x), value in PINNED_PIXELS.items():
    assert image[y, x].tolist() == value, (y, x)
  assert hashlib.sha256(image.tobytes()).hexdigest() == PINNED_IMAGE_SHA256
  assert record["points_xy"].tolist() == PINNED_POINTS
  assert record["disease"].tolist() == [0, 1, 1, 1, 1, 0, 0, 1, 1, 1, 0]
  assert list(record["tags"]) == ["v1", "v2", "v2", "v2", "v2", "v1", "v1", "v2", "v2", "v3", "v1"]
  assert record["pixel_spacing_mm"].tolist() == [0.7432000041007996] * 2  # float32(0.7432)
  assert record["study_uid"] == "1.2.826.0.1.3680043.8.498.10150576865513545014778031813020283832"
  study = phantom.phantom_study(3, seed=1)
  assert (study.num_slices, study.z_index) == (7, 3)
  t1 = phantom.render_slice(study, study.z_index, "t1", shape=(study.height // 2, study.width // 2))
  assert hashlib.sha256(t1.tobytes()).hexdigest() == PINNED_T1_SHA256


def _layout_digest(root: pathlib.Path) -> str:
  """SHA-256 over every written file: the JSON's bytes, and each DICOM data set's elements (tag, VR, value), so the
  pin does not depend on the pydicom version named in the file meta."""
  digest = hashlib.sha256()
  for f in sorted(p for p in root.rglob("*") if p.is_file()):
    digest.update(str(f.relative_to(root)).encode())
    if f.suffix == ".dcm":
      for elem in pydicom.dcmread(f):
        digest.update(f"{elem.tag}{elem.VR}".encode())
        digest.update(elem.value if isinstance(elem.value, bytes) else repr(elem.value).encode())
    else:
      digest.update(f.read_bytes())
  return digest.hexdigest()


def test_official_layout_files_are_pinned(tmp_path):
  phantom.write_official_layout(tmp_path, 2, seed=3)
  assert _layout_digest(tmp_path) == PINNED_LAYOUT_SHA256
