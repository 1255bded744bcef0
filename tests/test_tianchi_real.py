"""The 150 real Tianchi studies (read in place, never copied; skipped when absent).

Expected values are derived from the annotation JSON and the DICOM headers with simple code here, and from the
counts published with the release; never from the code under test.
"""

import collections
import json
import pathlib

import numpy as np
import pydicom
import pytest

import tfds_spine
from ccfnet_jax import objects
from ccfnet_jax.data import annotations, records
from synthetic_studies import read_folder

NAME = "lumbar_train150"


@pytest.fixture(scope="module")
def raw_entries(tianchi_dir) -> list[dict]:
  return json.loads((tianchi_dir / f"{NAME}_annotation.json").read_text(encoding="utf-8"))


def raw_points(entry: dict) -> list[dict]:
  return entry["data"][0]["annotation"][0]["data"]["point"]


def raw_label(point: dict) -> tuple[str, str]:
  """(kind, label) straight from the JSON: the key named by the identification ('-' -> disc)."""
  ident = point["tag"]["identification"]
  kind = "disc" if "-" in ident else "vertebra"
  return kind, point["tag"][kind]


@pytest.fixture(scope="module")
def folder_of(tianchi_dir) -> dict[str, pathlib.Path]:
  """studyUid -> folder, from each folder's DICOM headers read with pydicom directly."""
  result = {}
  for folder in sorted((tianchi_dir / NAME).iterdir()):
    ds = pydicom.dcmread(next(folder.glob("*.dcm")), stop_before_pixels=True)
    result[str(ds.StudyInstanceUID)] = folder
  return result


@pytest.fixture(scope="module")
def read_records(tianchi_dir, folder_of):
  parsed, problems = annotations.load_annotations(tianchi_dir / f"{NAME}_annotation.json")
  assert not problems, problems
  return {a.study_uid: records.read_annotated_study(folder_of[a.study_uid], a) for a in parsed}


def test_every_study_reads(read_records, raw_entries, folder_of):
  assert len(raw_entries) == 150 and len(folder_of) == 150
  assert set(read_records) == {e["studyUid"] for e in raw_entries} == set(folder_of)
  for entry in raw_entries:
    record = read_records[entry["studyUid"]]
    assert record["instance_uid"] == entry["data"][0]["instanceUid"]
    assert record["series_uid"] == entry["data"][0]["seriesUid"]


def test_points_inside_images_and_spacing_in_range(read_records):
  for uid, record in read_records.items():
    h, w = record["image"].shape[:2]
    xy = record["points_xy"][record["point_valid"]]
    assert ((xy >= 0) & (xy < [w, h])).all(), uid
    assert ((record["pixel_spacing_mm"] >= 0.3) & (record["pixel_spacing_mm"] <= 1.5)).all(), uid
    assert record["image"].dtype == np.uint16 and record["image"].max() == 65535


def test_image_is_the_labelled_frame(read_records, raw_entries, folder_of):
  # Only the labelled slice exists, so all three channels are it; the release stores uint8 x 16.
  for entry in raw_entries[:10]:
    record = read_records[entry["studyUid"]]
    path = next(p for p in folder_of[entry["studyUid"]].glob("*.dcm")
                if pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID == entry["data"][0]["instanceUid"])
    frame = pydicom.dcmread(path).pixel_array.astype(np.float64)
    expected = (frame - frame.min()) / (frame.max() - frame.min()) * 65535
    for c in range(3):
      np.testing.assert_allclose(record["image"][..., c], expected, atol=0.5)


def test_disease_counts_per_class_match_the_annotation(read_records, raw_entries):
  raw = collections.Counter(raw_label(p) for e in raw_entries for p in raw_points(e))
  ours = collections.Counter()
  for record in read_records.values():
    for i in np.flatnonzero(record["point_valid"]):
      kind = "vertebra" if i in objects.VERTEBRA_INDICES else "disc"
      ours[(kind, str(record["tags"][i]))] += 1
  assert ours == raw
  # The counts published with the release (single labels).
  readme = {("vertebra", "v2"): 585, ("vertebra", "v1"): 165, ("disc", "v1"): 417, ("disc", "v2"): 221,
            ("disc", "v3"): 217, ("disc", "v4"): 28, ("disc", ""): 2, ("disc", "v5"): 2}
  assert {k: ours[k] for k in readme} == readme
  # Binary labels: 0 when the codes include v1 or the label is empty, else 1.
  binary = collections.Counter()
  for e in raw_entries:
    for p in raw_points(e):
      kind, label = raw_label(p)
      binary[(kind, 0 if (label == "" or "v1" in label.split(",")) else 1)] += 1
  got = collections.Counter()
  for record in read_records.values():
    for i in np.flatnonzero(record["point_valid"]):
      got[("vertebra" if i in objects.VERTEBRA_INDICES else "disc", int(record["disease"][i]))] += 1
  assert got == binary
  assert sum(int((r["disease"] == -1).sum()) for r in read_records.values()) == 1  # one study lacks T12-L1


def test_unannotated_rule_picks_the_labelled_series(read_records, folder_of):
  # As published: the T2-sagittal + brightest rule picks the labelled series in all 150 studies.
  for uid, folder in list(folder_of.items()):
    assert read_folder(folder).series_uid == read_records[uid]["series_uid"], folder


# ----------------------------------------------------------------------------------------- the TFDS build
@pytest.fixture(scope="module")
def built(tianchi_dir, tmp_path_factory):
  builder = tfds_spine.prepare("tianchi", tmp_path_factory.mktemp("tfds"), manual_dir=tianchi_dir)
  return builder


def test_built_dataset_equals_the_annotation(built, raw_entries, folder_of):
  summary = tfds_spine.build_summary(built)
  assert summary["num_examples"] == 150 and summary["num_skipped"] == 0
  source = built.as_data_source(split="fold0+fold1+fold2+fold3")
  assert len(source) == 150
  examples = {source[i]["study_uid"].decode(): source[i] for i in range(150)}
  assert set(examples) == {e["studyUid"] for e in raw_entries}
  for entry in raw_entries:
    ex = examples[entry["studyUid"]]
    points = raw_points(entry)
    assert int(ex["point_valid"].sum()) == len(points)
    for p in points:
      ident = p["tag"]["identification"]
      i = objects.NAMES.index({"T11-T12": "T12-L1"}.get(ident, ident))
      kind, label = raw_label(p)
      assert ex["points_xy"][i].tolist() == [float(c) for c in p["coord"]], (entry["studyUid"], ident)
      assert ex["tags"][i].decode() == label
      assert ex["disease"][i] == (0 if (label == "" or "v1" in label.split(",")) else 1)
    labelled = next(p for p in folder_of[entry["studyUid"]].glob("*.dcm")
                    if pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID == entry["data"][0]["instanceUid"])
    ds = pydicom.dcmread(labelled, stop_before_pixels=True)
    np.testing.assert_array_equal(ex["pixel_spacing_mm"], np.float32([float(v) for v in ds.PixelSpacing]))
    assert ex["image"].shape == (ds.Rows, ds.Columns, 3)
    assert ex["instance_uid"].decode() == entry["data"][0]["instanceUid"]
  sizes = collections.Counter(int(ex["fold"]) for ex in examples.values())
  assert sorted(sizes.values()) == [37, 37, 38, 38]
