"""The official release on disk (ccfnet_jax.data.layout): pairs, the one study-folder order, the header scan."""

import numpy as np
import pytest

from ccfnet_jax.data import dicom_write, errors, layout
from ccfnet_jax.data.errors import StudyError
from synthetic_studies import write_study


def test_release_pairs_works_with_glob_characters_in_the_path(tmp_path):
  manual = tmp_path / "release[v1]*?"
  (manual / "lumbar_b").mkdir(parents=True)
  (manual / "lumbar_b_annotation.json").write_text("[]")
  (manual / "lumbar_a_annotation.json").write_text("[]")  # no folder beside it: still a pair
  (manual / "notes_annotation.json.bak").write_text("[]")
  (manual / "_annotation.json").write_text("[]")  # no name
  pairs = layout.release_pairs(manual)
  assert pairs == [(manual / "lumbar_a_annotation.json", manual / "lumbar_a"),
                   (manual / "lumbar_b_annotation.json", manual / "lumbar_b")]
  with pytest.raises(FileNotFoundError, match="no such directory"):
    layout.release_pairs(tmp_path / "absent")


def test_study_folders_natural_order_hidden_skipped(tmp_path):
  for name in ("study10", "study2", "study1", ".hidden", "a", "study02"):
    (tmp_path / name).mkdir()
  (tmp_path / "readme.txt").write_text("x")
  names = [p.name for p in layout.study_folders(tmp_path)]
  assert names == ["a", "study1", "study02", "study2", "study10"]


def test_study_folders_is_the_root_when_it_holds_dicom_files(tmp_path):
  (tmp_path / "sub").mkdir()
  (tmp_path / "x.DCM").write_bytes(b"")
  assert layout.study_folders(tmp_path) == [tmp_path]
  with pytest.raises(FileNotFoundError):
    layout.study_folders(tmp_path / "absent")


def test_dicom_files_skips_hidden_and_other_files(tmp_path):
  for name in ("b.dcm", "a.DCM", "._a.dcm", "c.txt"):
    (tmp_path / name).write_bytes(b"")
  (tmp_path / "d.dcm").mkdir()
  assert [p.rsplit("/", 1)[-1] for p in layout.dicom_files(tmp_path)] == ["a.DCM", "b.dcm"]


def test_scan_headers_returns_the_bad_files_beside_the_good(tmp_path):
  s = write_study(tmp_path / "s", n_slices=3)
  (s.folder / "zz.dcm").write_bytes(b"not dicom" * 40)
  headers, problems = layout.scan_headers(s.folder, "my study")
  assert len(headers) == 3 + len(s.decoy_files)
  assert {h.instance_uid for h in headers} >= set(s.instance_uids)
  assert len(problems) == 1 and problems[0].file == str(s.folder / "zz.dcm")
  assert problems[0].study == "my study" and problems[0].kind == errors.CORRUPT_DICOM


def test_scan_headers_of_missing_and_empty_folders(tmp_path):
  with pytest.raises(StudyError) as info:
    layout.scan_headers(tmp_path / "nowhere")
  assert info.value.kind == errors.MISSING_FOLDER
  (tmp_path / "empty").mkdir()
  with pytest.raises(StudyError) as info:
    layout.scan_headers(tmp_path / "empty", "e")
  assert info.value.kind == errors.EMPTY_FOLDER and info.value.study == "e"


def test_scan_headers_reads_no_pixels(tmp_path):
  # A file whose pixel data is cut still scans: only its header is read.
  folder = tmp_path / "s"
  dicom_write.write_series([folder / "a.dcm"], [np.ones((8, 8), np.uint16)], study_uid="1.2", series_uid="1.3",
                           positions=[(0, 0, 0)])
  path = folder / "a.dcm"
  path.write_bytes(path.read_bytes()[:-40])
  headers, problems = layout.scan_headers(folder)
  assert not problems and headers[0].rows == 8
