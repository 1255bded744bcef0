"""The lumbar_spine TFDS builder: builds and reads back without TensorFlow; bad studies reported, skipped, counted;
folds reproducible and balanced."""

import collections
import hashlib
import importlib.util
import json
import pathlib
import subprocess
import sys

import numpy as np
import pytest
import tensorflow_datasets as tfds
from pydicom.uid import generate_uid

import tfds_spine
from ccfnet_jax import objects
from ccfnet_jax.data import dicom_write, errors, folds
from synthetic_studies import default_points, entry, point, write_json, write_study

HW = (12, 16)


# ------------------------------------------------------------------------------------------------------ folds
def test_folds_follow_the_sha256_rule_and_are_balanced():
  uids = [f"1.2.840.{i}" for i in range(10)]
  got = folds.assign_folds(uids)
  # Independent statement of the rule: rank by SHA-256 hex digest, fold = rank mod 4.
  ranked = sorted(uids, key=lambda u: hashlib.sha256(u.encode()).hexdigest())
  assert got == {u: r % 4 for r, u in enumerate(ranked)}
  assert sorted(collections.Counter(got.values()).values()) == [2, 2, 3, 3]
  assert folds.assign_folds(list(reversed(uids))) == got  # input order does not matter


@pytest.mark.parametrize("n", [1, 5, 150, 201])
def test_fold_sizes_differ_by_at_most_one(n):
  sizes = collections.Counter(folds.assign_folds([str(i) for i in range(n)], 4).values())
  assert sum(sizes.values()) == n and max(sizes.values()) - min(sizes.values(), default=0) <= 1
  assert set(sizes) == set(range(min(n, 4)))


def test_folds_reject_repeated_uids():
  with pytest.raises(ValueError, match="more than once"):
    folds.assign_folds(["a", "b", "a"])


def test_fold_splits_name_the_other_folds_for_training():
  assert tfds_spine.fold_splits(1, 4) == ("fold0+fold2+fold3", "fold1")
  assert tfds_spine.fold_splits(0, 2) == ("fold1", "fold0")
  for bad in ((4, 4), (-1, 4), (0, 1)):
    with pytest.raises(ValueError, match="fold"):
      tfds_spine.fold_splits(*bad)


# ------------------------------------------------------------------------------------------------ tianchi
def points_for(z_index: int) -> list[dict]:
  return default_points(z_index, HW)


@pytest.fixture(scope="module")
def manual_dir(tmp_path_factory) -> tuple[pathlib.Path, dict, dict]:
  """A tiny release in a folder whose name holds glob characters: 3 annotation files (one not JSON), 6 good studies
  and one of each kind of bad input.

  Returns (manual_dir, expected good entries by studyUid, expected skip counts by kind).
  """
  root = tmp_path_factory.mktemp("manual") / "release[v1]*"
  entries, good = [], {}
  for i in range(5):
    s = write_study(root / "lumbar_t" / f"study{i}", n_slices=3, hw=HW, spacing_mm=(0.5 + 0.1 * i, 0.6), seed=i)
    e = entry(s.study_uid, s.series_uid, s.instance_uids[i % 3], points_for(i % 3))
    entries.append(e)
    good[s.study_uid] = (e, s)
  # A corrupt file beside readable ones.
  s = write_study(root / "lumbar_t" / "study_corrupt", hw=HW, seed=10)
  (s.folder / "image77.dcm").write_bytes(b"\0" * 300)
  entries.append(entry(s.study_uid, s.series_uid, s.instance_uids[1], points_for(1)))
  # The annotated slice's pixels truncated.
  s = write_study(root / "lumbar_t" / "study_truncated", hw=HW, seed=11)
  s.files[1].write_bytes(s.files[1].read_bytes()[:-30])
  entries.append(entry(s.study_uid, s.series_uid, s.instance_uids[1], points_for(1)))
  # Only an axial series.
  folder, uid, series = root / "lumbar_t" / "study_axial", generate_uid(), generate_uid()
  inst = dicom_write.write_series([folder / "image0.dcm"], [np.ones(HW, np.uint16)], study_uid=uid, series_uid=series,
                                  orientation=dicom_write.AXIAL_ORIENTATION, positions=[(0, 0, 0)])
  entries.append(entry(uid, series, inst[0], points_for(0)))
  # Annotation names an instance that is not in the folder.
  s = write_study(root / "lumbar_t" / "study_missing", hw=HW, seed=12)
  entries.append(entry(s.study_uid, s.series_uid, generate_uid(), points_for(1)))
  # A point outside the 12x16 image.
  s = write_study(root / "lumbar_t" / "study_outside", hw=HW, seed=13)
  outside = points_for(1)[:-1] + [point("L5-S1", 3, 12, "v1", 1)]  # y = 12 = H
  entries.append(entry(s.study_uid, s.series_uid, s.instance_uids[1], outside))
  # Unknown identification.
  s = write_study(root / "lumbar_t" / "study_unknown", hw=HW, seed=14)
  entries.append(entry(s.study_uid, s.series_uid, s.instance_uids[1], points_for(1) + [point("S2", 3, 3, "v1", 1)]))
  # The same studyUid annotated twice.
  s = write_study(root / "lumbar_t" / "study_dup", hw=HW, seed=15)
  entries += [entry(s.study_uid, s.series_uid, s.instance_uids[1], points_for(1))] * 2
  # An empty folder, and an annotated study with no folder at all.
  (root / "lumbar_t" / "study_empty").mkdir()
  entries.append(entry(generate_uid(), generate_uid(), generate_uid(), points_for(1)))
  # A second pair; its one study has 10 points (no T12-L1) and a T11-T12 alias would be absent too.
  s = write_study(root / "lumbar_u" / "study0", n_slices=1, hw=HW, spacing_mm=(0.8, 0.8), seed=20)
  pts = [p for p in points_for(0) if p["tag"]["identification"] != "T12-L1"]
  e = entry(s.study_uid, s.series_uid, s.instance_uids[0], pts)
  write_json(root / "lumbar_u_annotation.json", [e])
  good[s.study_uid] = (e, s)
  # A third pair whose annotation file is no JSON: reported, the other pairs still build.
  write_study(root / "lumbar_w" / "study0", hw=HW, seed=30)
  (root / "lumbar_w_annotation.json").write_text("[{not json")
  # A study whose zIndex is a list, among good ones.
  s = write_study(root / "lumbar_t" / "study_zlist", hw=HW, seed=16)
  bad_z = [dict(p, zIndex=[1]) for p in points_for(1)]
  entries.append(entry(s.study_uid, s.series_uid, s.instance_uids[1], bad_z))
  write_json(root / "lumbar_t_annotation.json", entries)
  expected_skips = {errors.BAD_ANNOTATION: 2, errors.CORRUPT_DICOM: 2, errors.NO_SAGITTAL: 1,
                    errors.MISSING_INSTANCE: 1, errors.POINTS_OUTSIDE: 1, errors.UNKNOWN_IDENTIFICATION: 1, errors.DUPLICATE_STUDY: 2,
                    errors.EMPTY_FOLDER: 1, errors.MISSING_FOLDER: 1}
  return root, good, expected_skips


@pytest.fixture(scope="module")
def tianchi_build(manual_dir, tmp_path_factory):
  root, good, expected = manual_dir
  data_dir = tmp_path_factory.mktemp("data")
  builder = tfds_spine.prepare("tianchi", data_dir, manual_dir=root)
  return builder, good, expected, data_dir


def expected_arrays(points: list[dict]):
  """points_xy, valid, disease and tags in object order, computed straight from the hand-made JSON."""
  xy, valid = np.zeros((11, 2), np.float32), np.zeros(11, bool)
  disease, tags = np.full(11, -1), [b""] * 11
  for p in points:
    name = p["tag"]["identification"]
    i = objects.NAMES.index(name)
    label = p["tag"]["disc" if "-" in name else "vertebra"]
    xy[i], valid[i], tags[i] = p["coord"], True, label.encode()
    disease[i] = 0 if "v1" in label.split(",") else 1
  return xy, valid, disease, tags


def test_tianchi_build_skips_and_counts_bad_studies(tianchi_build):
  builder, good, expected, _ = tianchi_build
  summary = tfds_spine.build_summary(builder)
  assert summary["skipped_by_kind"] == expected
  assert summary["num_skipped"] == sum(expected.values()) == len(summary["skipped"])
  assert summary["num_examples"] == len(good)
  assert all(s["study"] and s["reason"] and s["file"] for s in summary["skipped"])
  truncated = [s for s in summary["skipped"] if "study_truncated" in s["file"]]
  assert len(truncated) == 1 and "pixel" in truncated[0]["reason"]
  # The summary is stored beside the data, not only logged.
  stored = json.loads((pathlib.Path(builder.data_dir) / "metadata.json").read_text())
  assert stored["build_summary"]["skipped_by_kind"] == expected


def test_tianchi_examples_equal_the_annotation(tianchi_build):
  builder, good, _, data_dir = tianchi_build
  source = builder.as_data_source(split="fold0+fold1+fold2+fold3")
  assert len(source) == len(good)
  expected_folds = folds.assign_folds(good)
  seen = set()
  for k in range(len(source)):
    ex = source[k]
    uid = ex["study_uid"].decode()
    e, s = good[uid]
    xy, valid, disease, tags = expected_arrays(e["data"][0]["annotation"][0]["data"]["point"])
    np.testing.assert_array_equal(ex["points_xy"], xy)
    np.testing.assert_array_equal(ex["point_valid"], valid)
    np.testing.assert_array_equal(ex["disease"], disease)
    assert list(ex["tags"]) == tags
    np.testing.assert_array_equal(ex["pixel_spacing_mm"], np.float32(s.spacing_mm))
    assert ex["instance_uid"].decode() == e["data"][0]["instanceUid"]
    assert ex["series_uid"].decode() == s.series_uid
    z = s.instance_uids.index(e["data"][0]["instanceUid"])
    centre = s.slices[z].astype(np.float64)
    np.testing.assert_allclose(ex["image"][..., 1], (centre - centre.min()) / np.ptp(centre) * 65535, atol=0.5)
    assert ex["image"].dtype == np.uint16 and ex["image"].shape == HW + (3,)
    assert int(ex["fold"]) == expected_folds[uid]
    seen.add(uid)
  assert seen == set(good)
  for k in range(4):
    fold_source = builder.as_data_source(split=f"fold{k}")
    assert {int(fold_source[i]["fold"]) for i in range(len(fold_source))} <= {k}
    assert len(fold_source) == sum(1 for f in expected_folds.values() if f == k)


def test_load_source_reuses_the_build(tianchi_build, manual_dir):
  builder, good, _, data_dir = tianchi_build
  before = (pathlib.Path(builder.data_dir) / "metadata.json").stat().st_mtime_ns
  source = tfds_spine.load_source("tianchi", "fold0+fold1+fold2", data_dir, manual_dir=manual_dir[0])
  assert len(source) == len(good) - len(builder.as_data_source(split="fold3"))
  assert (pathlib.Path(builder.data_dir) / "metadata.json").stat().st_mtime_ns == before  # not rebuilt


def test_tianchi_without_annotation_files_explains_the_manual_dir(tmp_path):
  (tmp_path / "manual").mkdir()
  with pytest.raises(AssertionError, match="lumbar_train150_annotation.json"):  # empty: TFDS shows our instructions
    tfds_spine.prepare("tianchi", tmp_path / "data", manual_dir=tmp_path / "manual")
  (tmp_path / "manual" / "lumbar_x").mkdir()  # a folder without its annotation JSON
  with pytest.raises(FileNotFoundError, match="no \\*_annotation.json"):
    tfds_spine.prepare("tianchi", tmp_path / "data", manual_dir=tmp_path / "manual")


def test_fewer_usable_studies_than_folds_is_a_clear_error(tmp_path):
  manual = tmp_path / "manual"
  studies = [write_study(manual / "lumbar_v" / f"study{i}", hw=HW, seed=i) for i in range(4)]
  entries = [entry(s.study_uid, s.series_uid, s.instance_uids[1], points_for(1)) for s in studies]
  entries[0]["data"][0]["instanceUid"] = "1.2.3.404"  # leaves 3 usable studies for 4 folds
  write_json(manual / "lumbar_v_annotation.json", entries)
  with pytest.raises(ValueError, match="only 3 usable studies.*missing_instance.*1.2.3.404"):
    tfds_spine.prepare("tianchi", tmp_path / "data", manual_dir=manual)


def test_unknown_config_and_misplaced_num_studies(tmp_path):
  with pytest.raises(ValueError, match="unknown lumbar_spine config"):
    tfds_spine.get_builder("mnist", tmp_path)
  with pytest.raises(ValueError, match="phantom"):
    tfds_spine.get_builder("tianchi", tmp_path, num_studies=3)
  assert tfds_spine.get_builder("phantom", tmp_path).builder_config.name == "phantom"
  assert tfds_spine.get_builder("phantom", tmp_path, num_studies=4, seed=1).builder_config.name == "phantom_n4_s1"


# ------------------------------------------------------------------------------------------------ phantom
def test_phantom_config_builds_and_reads(tmp_path):
  pytest.importorskip("ccfnet_jax.data.phantom")
  n = 6
  source = tfds_spine.load_source("phantom", "fold0+fold1+fold2+fold3", tmp_path, num_studies=n)
  assert len(source) == n
  uids = [source[i]["study_uid"].decode() for i in range(n)]
  assert len(set(uids)) == n
  expected_folds = folds.assign_folds(uids)
  for i in range(n):
    ex = source[i]
    assert ex["image"].dtype == np.uint16 and ex["image"].ndim == 3 and ex["image"].shape[-1] == 3
    assert int(ex["fold"]) == expected_folds[ex["study_uid"].decode()]
    h, w = ex["image"].shape[:2]
    xy = ex["points_xy"][ex["point_valid"]]
    assert ((xy >= 0) & (xy < [w, h])).all()
  builder = tfds_spine.get_builder("phantom", tmp_path, num_studies=n)
  assert tfds_spine.build_summary(builder)["num_examples"] == n


def test_standard_tfds_calls_build_and_read_without_tensorflow(tmp_path):
  """tfds.builder / download_and_prepare / tfds.data_source, exactly as TFDS documents them, on phantom studies
  written in the official layout; array_record is the builder's own default, so no TensorFlow is needed."""
  phantom = pytest.importorskip("ccfnet_jax.data.phantom")
  assert importlib.util.find_spec("tensorflow") is None  # the point of the test: no TensorFlow installed
  phantom.write_official_layout(tmp_path / "manual", 4, seed=5)
  data_dir = tmp_path / "data"
  builder = tfds.builder("lumbar_spine/tianchi", data_dir=data_dir)
  builder.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=tmp_path / "manual"))
  assert builder.info.file_format == tfds.core.FileFormat.ARRAY_RECORD
  source = tfds.data_source("lumbar_spine/tianchi", data_dir=data_dir, split="fold0+fold1+fold2+fold3")
  assert len(source) == 4
  by_uid = {source[i]["study_uid"].decode(): source[i] for i in range(4)}
  for index in range(4):
    record = phantom.generate_study(index, seed=5)
    ex = by_uid[record["study_uid"]]
    for name in ("image", "pixel_spacing_mm", "points_xy", "point_valid", "disease"):
      np.testing.assert_array_equal(ex[name], np.asarray(record[name]), err_msg=name)
    assert [t.decode() for t in ex["tags"]] == list(record["tags"])
    assert (ex["series_uid"].decode(), ex["instance_uid"].decode()) == (record["series_uid"], record["instance_uid"])


# ------------------------------------------------------------------------------------------------ command
def _build_command(*args):
  return subprocess.run([sys.executable, "-m", "tfds_spine.build", *args], cwd=pathlib.Path(__file__).parents[1],
                        capture_output=True, text=True, timeout=300)


def test_build_command_builds_phantoms_and_refuses_old_flags(tmp_path):
  result = _build_command("--dataset=phantom", "--phantom_studies=4", f"--data_dir={tmp_path}")
  assert result.returncode == 0, result.stderr[-2000:]
  assert '"num_examples": 4' in result.stdout
  assert len(tfds_spine.load_source("phantom", "fold0+fold1+fold2+fold3", tmp_path, num_studies=4)) == 4
  for old, new in (("--config=phantom", "--dataset"), ("--num_studies=4", "--phantom_studies")):
    result = _build_command(old, f"--data_dir={tmp_path / 'other'}")
    assert result.returncode != 0 and f"is now {new}" in result.stderr, result.stderr[-2000:]
  assert not (tmp_path / "other").exists()
