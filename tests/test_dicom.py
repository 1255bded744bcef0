"""DICOM writing and reading: round trip, slice order, edges, MONOCHROME1, series choice, bad files."""

import numpy as np
import pydicom
import pytest
from pydicom.uid import generate_uid

import bad_inputs
from ccfnet_jax.data import dicom, dicom_write, errors, layout
from ccfnet_jax.data.errors import StudyError
from synthetic_studies import read_folder, write_study


def scaled(pixels: np.ndarray) -> np.ndarray:
  """Independent min-max to 0..65535 (float, for comparison within rounding)."""
  p = pixels.astype(np.float64)
  return (p - p.min()) / (p.max() - p.min()) * 65535.0


def test_write_series_is_valid_dicom(tmp_path):
  pixels = np.arange(6 * 7, dtype=np.uint16).reshape(6, 7) * 1000
  uid = generate_uid()
  dicom_write.write_series([tmp_path / "a.dcm"], [pixels], study_uid="1.2.3", series_uid="1.2.3.4",
                           instance_uids=[uid], description="T2_TSE_SAG", positions=[(1.5, -2.0, 3.25)],
                           pixel_spacing_mm=(0.91149997, 0.5), monochrome1=True, bits_stored=16)
  ds = pydicom.dcmread(tmp_path / "a.dcm")  # no force: a Part 10 file
  assert ds.file_meta.TransferSyntaxUID == pydicom.uid.ExplicitVRLittleEndian
  assert ds.PhotometricInterpretation == "MONOCHROME1"
  assert (ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID) == ("1.2.3", "1.2.3.4", uid)
  assert ds.SeriesDescription == "T2_TSE_SAG"
  assert [float(v) for v in ds.PixelSpacing] == pytest.approx([0.91149997, 0.5])
  assert [float(v) for v in ds.ImagePositionPatient] == [1.5, -2.0, 3.25]
  assert [float(v) for v in ds.ImageOrientationPatient] == list(dicom_write.SAGITTAL_ORIENTATION)
  np.testing.assert_array_equal(ds.pixel_array, pixels)


def test_write_series_rejects_bad_arguments(tmp_path):
  with pytest.raises(ValueError, match="must agree"):
    dicom_write.write_series([tmp_path / "a.dcm"], [np.zeros((4, 4), np.uint16)] * 2, study_uid="1", series_uid="2",
                             positions=[(0, 0, 0)])
  with pytest.raises(ValueError, match="outside"):
    dicom_write.write_series([tmp_path / "a.dcm"], [np.full((4, 4), 5000)], study_uid="1", series_uid="2",
                             positions=[(0, 0, 0)], bits_stored=12)


def test_round_trip_annotated_middle_slice(tmp_path):
  s = write_study(tmp_path / "study0", n_slices=3, hw=(12, 16), spacing_mm=(0.7, 0.9))
  got = read_folder(s.folder, instance_uid=s.instance_uids[1], series_uid=s.series_uid)
  assert got.image.dtype == np.uint16 and got.image.shape == (12, 16, 3)
  for channel, k in enumerate((0, 1, 2)):
    np.testing.assert_allclose(got.image[..., channel], scaled(s.slices[k]), atol=0.5)
  np.testing.assert_array_equal(got.pixel_spacing_mm, np.float32([0.7, 0.9]))
  assert got.pixel_spacing_mm.dtype == np.float32
  assert (got.study_uid, got.series_uid, got.instance_uid) == (s.study_uid, s.series_uid, s.instance_uids[1])
  assert got.z_index == 1 and got.native_hw == (12, 16)
  assert got.path == str(s.files[1])


@pytest.mark.parametrize("z, expected", [(0, (0, 0, 1)), (3, (2, 3, 3))])
def test_edges_repeat_and_order_is_x_descending(tmp_path, z, expected):
  # Files are written in x-ascending order with InstanceNumbers following that order, so only a sort by x
  # descending gives the slice order write_study records.
  s = write_study(tmp_path / "s", n_slices=4, seed=3)
  got = read_folder(s.folder, instance_uid=s.instance_uids[z])
  assert got.z_index == z
  for channel, k in enumerate(expected):
    np.testing.assert_allclose(got.image[..., channel], scaled(s.slices[k]), atol=0.5)


def test_single_slice_series_repeats_it(tmp_path):
  s = write_study(tmp_path / "s", n_slices=1)
  got = read_folder(s.folder, instance_uid=s.instance_uids[0])
  for channel in range(3):
    np.testing.assert_allclose(got.image[..., channel], scaled(s.slices[0]), atol=0.5)


def test_monochrome1_is_inverted(tmp_path):
  s = write_study(tmp_path / "s", n_slices=3, monochrome1=True)
  got = read_folder(s.folder, instance_uid=s.instance_uids[1])
  p = s.slices[1].astype(np.float64)
  expected = (p.max() - p) / (p.max() - p.min()) * 65535.0  # brightest stored value becomes darkest
  np.testing.assert_allclose(got.image[..., 1], expected, atol=0.5)


def test_constant_slice_gives_zeros(tmp_path):
  folder = tmp_path / "s"
  dicom_write.write_series([folder / "a.dcm"], [np.full((5, 6), 1234, np.uint16)], study_uid="1.2", series_uid="1.3",
                           positions=[(0, 0, 0)])
  got = read_folder(folder)
  assert got.image.dtype == np.uint16
  np.testing.assert_array_equal(got.image, np.zeros((5, 6, 3), np.uint16))


@pytest.mark.parametrize("orientation, plane", [
    (dicom_write.SAGITTAL_ORIENTATION, "sagittal"), (dicom_write.AXIAL_ORIENTATION, "axial"),
    (dicom_write.CORONAL_ORIENTATION, "coronal"), ((0, 0.7071, 0.7071, 0.7071, 0.7071, 0), "oblique"),
    ((0, 0.9962, -0.0872, 0, 0.0872, 0.9962), "sagittal")])  # 5 degrees off sagittal
def test_plane_from_orientation_normal(orientation, plane):
  assert dicom.plane_of(orientation) == plane


def test_unannotated_picks_t2_sagittal_middle_slice_over_brighter_decoys(tmp_path):
  s = write_study(tmp_path / "s", n_slices=5, seed=1)  # T1 sagittal and axial decoys are brighter
  got = read_folder(s.folder)
  assert got.series_uid == s.series_uid and got.z_index == 2 and got.instance_uid == s.instance_uids[2]


def test_unannotated_picks_brightest_of_two_t2_sagittal_series(tmp_path):
  folder = tmp_path / "s"
  positions = dicom_write.sagittal_positions(3)
  for name, level in (("dim", 1000), ("bright", 2000)):
    # The middle slice decides: the "dim" series has bright edge slices but a dim middle one.
    values = [4000, level, 4000] if name == "dim" else [10, level, 10]
    dicom_write.write_series([folder / f"{name}{i}.dcm" for i in range(3)],
                             [np.full((6, 6), v, np.uint16) + np.eye(6, dtype=np.uint16) for v in values],
                             study_uid="1.2", series_uid=f"1.2.{level}", description="t2_tse_sag",
                             positions=positions)
  assert read_folder(folder).series_uid == "1.2.2000"


def test_unannotated_without_t2_takes_brightest_sagittal(tmp_path):
  folder = tmp_path / "s"
  for level in (500, 900):
    dicom_write.write_series([folder / f"{level}_{i}.dcm" for i in range(3)],
                             [np.full((6, 6), level, np.uint16) + np.eye(6, dtype=np.uint16)] * 3, study_uid="1.2",
                             series_uid=f"1.2.{level}", description="PD_SAG",
                             positions=dicom_write.sagittal_positions(3))
  assert read_folder(folder).series_uid == "1.2.900"


# ------------------------------------------------------------------------------------------------ bad input
def expect_error(kind, fn, *args, **kwargs) -> StudyError:
  with pytest.raises(StudyError) as info:
    fn(*args, **kwargs)
  assert info.value.kind == kind, info.value
  return info.value


def test_empty_and_missing_folder(tmp_path):
  (tmp_path / "empty").mkdir()
  (tmp_path / "empty" / "notes.txt").write_text("not a dicom")
  e = expect_error(errors.EMPTY_FOLDER, read_folder, tmp_path / "empty")
  assert "empty" in e.file
  expect_error(errors.MISSING_FOLDER, read_folder, tmp_path / "nowhere")


def test_corrupt_file_names_the_file(tmp_path):
  s = write_study(tmp_path / "s")
  bad = s.folder / "image99.dcm"
  bad.write_bytes(b"this is not DICOM" * 20)
  e = expect_error(errors.CORRUPT_DICOM, read_folder, s.folder, instance_uid=s.instance_uids[1])
  assert e.file == str(bad) and "header" in e.reason


def test_file_truncated_in_header_fails_the_study(tmp_path):
  s = write_study(tmp_path / "s")
  decoy = s.decoy_files[0]
  decoy.write_bytes(decoy.read_bytes()[:400])  # cut before the series/geometry tags
  e = expect_error(errors.CORRUPT_DICOM, read_folder, s.folder, instance_uid=s.instance_uids[1])
  assert e.file == str(decoy)


def test_truncated_pixels_of_a_needed_slice_fail_but_of_a_decoy_do_not(tmp_path):
  s = write_study(tmp_path / "s", n_slices=3)
  decoy = s.decoy_files[-1]
  decoy.write_bytes(decoy.read_bytes()[:-20])
  got = read_folder(s.folder, instance_uid=s.instance_uids[1])  # decoy pixels are never decoded
  assert got.instance_uid == s.instance_uids[1]
  neighbour = s.files[2]
  neighbour.write_bytes(neighbour.read_bytes()[:-20])
  e = expect_error(errors.CORRUPT_DICOM, read_folder, s.folder, instance_uid=s.instance_uids[1])
  assert e.file == str(neighbour) and "pixel" in e.reason


def test_no_sagittal_series(tmp_path):
  folder = tmp_path / "s"
  uids = dicom_write.write_series([folder / f"a{i}.dcm" for i in range(2)], [np.ones((4, 4), np.uint16)] * 2,
                                  study_uid="1.2", series_uid="1.3", orientation=dicom_write.AXIAL_ORIENTATION,
                                  positions=[(0, 0, 0), (0, 0, 4)])
  e = expect_error(errors.NO_SAGITTAL, read_folder, folder)
  assert "axial" in e.reason
  expect_error(errors.NO_SAGITTAL, read_folder, folder, instance_uid=uids[0])


def test_missing_instance_and_series_mismatch(tmp_path):
  s = write_study(tmp_path / "s")
  e = expect_error(errors.MISSING_INSTANCE, read_folder, s.folder, instance_uid="1.2.3.999")
  assert "1.2.3.999" in e.reason
  expect_error(errors.SERIES_MISMATCH, read_folder, s.folder, instance_uid=s.instance_uids[0],
               series_uid="1.2.3.4.5")


def test_missing_pixel_spacing(tmp_path):
  s = write_study(tmp_path / "s", n_slices=1, decoys=False)
  ds = pydicom.dcmread(s.files[0])
  del ds.PixelSpacing
  ds.save_as(s.files[0], enforce_file_format=True)
  e = expect_error(errors.BAD_IMAGE, read_folder, s.folder, instance_uid=s.instance_uids[0])
  assert "PixelSpacing" in e.reason


# ------------------------------------------------------------------------------------------------ damaged files
@pytest.mark.parametrize("cut", [141, 152])
def test_file_cut_inside_its_file_meta_fails_the_study_naming_file_and_study(tmp_path, cut):
  s = write_study(tmp_path / "s")
  bad = s.files[1]
  bad.write_bytes(bad.read_bytes()[:cut])
  e = expect_error(errors.CORRUPT_DICOM, read_folder, s.folder, instance_uid=s.instance_uids[1], study="study s")
  assert e.file == str(bad) and e.study == "study s"


def test_unknown_value_representation_is_a_corrupt_file(tmp_path):
  s = write_study(tmp_path / "s")
  bad = s.decoy_files[0]
  bad.write_bytes(bad_inputs.with_unknown_vr(bad.read_bytes()))
  e = expect_error(errors.CORRUPT_DICOM, read_folder, s.folder, instance_uid=s.instance_uids[1], study="s")
  assert e.file == str(bad)


@pytest.mark.parametrize("kind", bad_inputs.OTHER_KINDS)
def test_files_of_another_series_that_are_no_usable_image_are_left_out(tmp_path, kind):
  s = write_study(tmp_path / "s", n_slices=3)
  clean_annotated = read_folder(s.folder, instance_uid=s.instance_uids[1])
  clean_rule = read_folder(s.folder)
  bad_inputs.write_other_file(s.folder / "other.dcm", kind, s.study_uid)
  got = read_folder(s.folder, instance_uid=s.instance_uids[1])
  np.testing.assert_array_equal(got.image, clean_annotated.image)
  assert got.instance_uid == clean_annotated.instance_uid
  assert read_folder(s.folder).instance_uid == clean_rule.instance_uid
  _, problems = layout.scan_headers(s.folder)
  assert problems and all(p.kind == errors.NOT_AN_IMAGE and p.series_uid for p in problems)
  assert {e.file for e in got.ignored} == {p.file for p in problems}


@pytest.mark.parametrize("kind", bad_inputs.OTHER_KINDS)
def test_an_unusable_file_in_the_needed_series_fails_the_study(tmp_path, kind):
  s = write_study(tmp_path / "s", n_slices=3)
  bad_inputs.write_other_file(s.folder / "other.dcm", kind, s.study_uid, series_uid=s.series_uid)
  e = expect_error(errors.NOT_AN_IMAGE, read_folder, s.folder, instance_uid=s.instance_uids[1])
  assert "other" in e.file


def test_missing_pixel_decoder_names_the_transfer_syntax_and_the_packages(tmp_path):
  s = write_study(tmp_path / "s", n_slices=3)
  bad_inputs.make_jpeg_ls(s.files[2])
  e = expect_error(errors.UNSUPPORTED_TRANSFER_SYNTAX, read_folder, s.folder, instance_uid=s.instance_uids[1])
  assert e.file == str(s.files[2])
  assert "JPEG-LS" in e.reason and "pylibjpeg" in e.reason and "gdcm" in e.reason
  read_folder(s.folder, instance_uid=s.instance_uids[0]).image  # slices 0 and 1 alone still read  # noqa: B018


@pytest.mark.filterwarnings("ignore:Invalid value for VR DS")
@pytest.mark.parametrize("field", ["position", "orientation"])
@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_geometry_is_rejected_in_the_needed_series_and_ignored_elsewhere(tmp_path, field, value):
  s = write_study(tmp_path / "s", n_slices=3)
  geometry = {"position": [value, 0.0, 0.0]} if field == "position" else {"orientation": [0, 1, 0, 0, 0, value]}
  bad_inputs.set_geometry(s.decoy_files[0], **geometry)  # a T1 decoy
  got = read_folder(s.folder, instance_uid=s.instance_uids[1])
  assert got.z_index == 1 and [e.kind for e in got.ignored] == [errors.BAD_GEOMETRY]
  bad_inputs.set_geometry(s.files[0], **geometry)  # a neighbour of the annotated slice
  e = expect_error(errors.BAD_GEOMETRY, read_folder, s.folder, instance_uid=s.instance_uids[1])
  assert e.file == str(s.files[0]) and ("nan" in e.reason or "inf" in e.reason)


def test_the_same_instance_in_two_files_is_refused(tmp_path):
  s = write_study(tmp_path / "s", n_slices=3, decoys=False)
  (s.folder / "copy.dcm").write_bytes(s.files[1].read_bytes())
  e = expect_error(errors.BAD_IMAGE, read_folder, s.folder, instance_uid=s.instance_uids[1])
  assert "2 files" in e.reason


def test_a_folder_where_no_file_reads_raises_its_first_problem(tmp_path):
  (tmp_path / "s").mkdir()
  (tmp_path / "s" / "a.dcm").write_bytes(b"junk" * 50)
  e = expect_error(errors.CORRUPT_DICOM, layout.scan_headers, tmp_path / "s", "s")
  assert e.file.endswith("a.dcm")
