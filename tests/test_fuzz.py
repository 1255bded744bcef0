"""Fuzz tests of the data floor: no bad file aborts a build, and every reader raises nothing but StudyError.

Inputs come from `bad_inputs` (seeded): every truncation point of one DICOM header, random header byte corruptions,
and annotation entries with a wrong type in one field. The readers are tested directly per input; the TFDS build
runs once on one release holding many bad studies beside good ones, and once on the good ones alone.
"""

import copy
import json

import numpy as np
import pydicom
import pytest

import bad_inputs
import tfds_spine
from ccfnet_jax.data import annotations, dicom, dicom_write, errors, layout, phantom
from ccfnet_jax.data.errors import StudyError
from synthetic_studies import default_points, entry, read_folder, write_study

pytestmark = pytest.mark.filterwarnings("ignore")  # pydicom warns about every damaged value it meets


@pytest.fixture(autouse=True)
def _quiet_pydicom(monkeypatch):
  """No validation warnings (they change no value read, and logging thousands of them is slow)."""
  monkeypatch.setattr(pydicom.config.settings, "reading_validation_mode", pydicom.config.IGNORE)

NUM_CORRUPTIONS = 300
KINDS = {v for k, v in vars(errors).items() if k.isupper() and isinstance(v, str)}
COUNTS = {}  # inputs fuzzed per kind, printed at the end of the module (pytest -s)


def _check_error(e: StudyError, study: str) -> None:
  assert e.study == study and e.file and e.reason and e.kind in KINDS, e


def _read_with(folder, s, study: str, headers, problems, *, rule: bool):
  """What predict and evaluate read from a folder with these headers: pixel spacings, the annotated slice and
  (`rule`) the slice the unannotated rule picks; returns the annotated read, or its StudyError."""
  for p in problems:
    _check_error(p, study)
  for h in headers:
    try:
      dicom.pixel_spacing(h, study)
    except StudyError as e:
      _check_error(e, study)
  if rule:
    try:
      dicom.read_study(folder, headers=headers, problems=problems, study=study)
    except StudyError as e:
      _check_error(e, study)
  try:
    return dicom.read_study(folder, headers=headers, problems=problems, instance_uid=s.instance_uids[1],
                            series_uid=s.series_uid, study_uid=s.study_uid, study=study)
  except StudyError as e:
    _check_error(e, study)
    return e


@pytest.fixture(scope="module")
def small_study(tmp_path_factory):
  """Three T2 sagittal slices and one axial decoy of 8x8 px (few files: each input re-reads the folder)."""
  s = write_study(tmp_path_factory.mktemp("fuzz") / "study0", n_slices=3, hw=(8, 8), seed=4, decoys=False)
  decoy = s.folder / "decoy.dcm"
  dicom_write.write_series([decoy], [np.full((8, 8), 700, np.uint16)], study_uid=s.study_uid,
                           series_uid=s.series_uid + ".9", description="T2_TSE_TRA",
                           orientation=dicom_write.AXIAL_ORIENTATION, positions=[(0.0, 0.0, 0.0)])
  s.decoy_files.append(decoy)
  return s, read_folder(s.folder, instance_uid=s.instance_uids[1])


@pytest.mark.parametrize("target", ["annotated_slice", "decoy"])
@pytest.mark.parametrize("damage", ["truncation", "corruption"])
def test_damaged_header_bytes_raise_only_study_errors(small_study, target, damage):
  """Per input: the damaged file's header, then the readers over the folder's headers. The whole folder scan
  (`layout.scan_headers`, which reads every file's header the same way) runs for the random corruptions."""
  s, clean = small_study
  path = s.files[1] if target == "annotated_slice" else s.decoy_files[0]
  data = path.read_bytes()
  others, _ = layout.scan_headers(s.folder, "s")
  others = [h for h in others if h.path != str(path)]
  truncation = damage == "truncation"
  inputs = (bad_inputs.truncations(data) if truncation
            else bad_inputs.corruptions(data, NUM_CORRUPTIONS, seed=7 if target == "decoy" else 8))
  outcomes = {"read": 0, "skipped": 0}
  # (0028,0030) PixelSpacing follows the last tag every file must hold (Columns); only the chosen slice needs it.
  first_unused_tag = data.find(b"\x28\x00\x30\x00")
  try:
    for label, damaged in inputs:
      path.write_bytes(damaged)
      if truncation:
        try:
          headers, problems = [*others, dicom.read_header(str(path), "s")], []
        except StudyError as e:
          headers, problems = others, [e]
      else:
        headers, problems = layout.scan_headers(s.folder, "s")
      result = _read_with(s.folder, s, "s", headers, problems, rule=not truncation)
      if isinstance(result, StudyError):
        outcomes["skipped"] += 1
        continue
      outcomes["read"] += 1
      assert target == "decoy" or not truncation, f"{label}: a cut annotated slice read"
      if truncation:
        assert len(damaged) >= first_unused_tag, f"{label}: read a header without all of its image tags"
      if target == "decoy":  # a damaged file of another series never changes what is read
        np.testing.assert_array_equal(result.image, clean.image, err_msg=label)
        assert result.z_index == clean.z_index, label
  finally:
    path.write_bytes(data)
  COUNTS[f"{damage} of the {target}"] = outcomes
  assert outcomes["skipped"] > 0


def test_annotation_field_mutations_are_reported_never_raised(tmp_path):
  base = entry("9.9", "9.9.1", "9.9.1.1", default_points(1))
  others = [entry(f"1.{k}", f"1.{k}.2", f"1.{k}.2.3", default_points(1)) for k in range(2)]
  count = 0
  reported = 0
  mutated_entries = []
  for label, mutated in bad_inputs.annotation_mutations(base):
    good, bad = annotations.parse_entries([mutated, *copy.deepcopy(others)], "f.json")
    assert {g.study_uid for g in good} >= {"1.0", "1.1"}, label
    for e in bad:
      assert e.file == "f.json" and e.kind in KINDS and e.reason, label
    reported += len(bad)
    count += 1
    mutated_entries.append(mutated)
  COUNTS["annotation field mutations"] = {"inputs": count, "reported": reported}
  assert count > 500 and reported > 0.8 * count
  # All of them in one file: the good studies still load.
  path = tmp_path / "x_annotation.json"
  path.write_text(json.dumps(mutated_entries + others), encoding="utf-8")
  good, bad = annotations.load_annotations(path)
  assert {g.study_uid for g in good} == {"1.0", "1.1"} and len(bad) >= reported


# --------------------------------------------------------------------------------------------- the TFDS build
SEED = 11
NUM_GOOD = 4


def _file_of_instance(folder, instance_uid: str):
  """The file holding `instance_uid`, found with pydicom directly."""
  for path in sorted(folder.glob("*.dcm")):
    if pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID == instance_uid:
      return path
  raise AssertionError(f"no file of {instance_uid} in {folder}")


def _cut(path, at: int) -> None:
  path.write_bytes(path.read_bytes()[:at])


def _damages():
  """(name, damage(study, folder) -> the file expected in the report, kind when the study is skipped or None when it
  is built with that file left out)."""
  def annotated(study, folder):
    return _file_of_instance(folder, study.instance_uid())

  def neighbour(study, folder):
    return _file_of_instance(folder, study.t2_instance_uids[study.z_index + 1])

  def decoy(study, folder, series_uid):
    for path in sorted(folder.glob("*.dcm")):
      if pydicom.dcmread(path, stop_before_pixels=True).SeriesInstanceUID == series_uid:
        return path
    raise AssertionError(series_uid)

  def cut_annotated(at):
    def damage(study, folder):
      path = annotated(study, folder)
      _cut(path, at)
      return path
    return damage

  def unknown_vr(study, folder):
    path = neighbour(study, folder)
    path.write_bytes(bad_inputs.with_unknown_vr(path.read_bytes()))
    return path

  def cut_decoy_meta(study, folder):
    path = decoy(study, folder, study.axial_series_uid)
    _cut(path, 150)
    return path

  def other(kind):
    def damage(study, folder):
      path = folder / f"extra_{kind}.dcm"
      bad_inputs.write_other_file(path, kind, study.study_uid)
      return path.with_name(f"{path.stem}_0{path.suffix}") if kind == "localizer" else path
    return damage

  def nan_decoy(study, folder):
    path = decoy(study, folder, study.t1_series_uid)
    bad_inputs.set_geometry(path, position=[float("nan"), 0.0, 0.0])
    return path

  def nan_neighbour(study, folder):
    path = neighbour(study, folder)
    bad_inputs.set_geometry(path, position=[float("nan"), 0.0, 0.0])
    return path

  def jpeg_ls(study, folder):
    path = annotated(study, folder)
    bad_inputs.make_jpeg_ls(path)
    return path

  return [
      ("annotated slice cut at byte 141", cut_annotated(141), errors.CORRUPT_DICOM),
      ("annotated slice cut at byte 152", cut_annotated(152), errors.CORRUPT_DICOM),
      ("annotated slice cut in its data set", cut_annotated(600), errors.CORRUPT_DICOM),
      ("unknown VR in a neighbour slice", unknown_vr, errors.CORRUPT_DICOM),
      ("axial decoy cut in its file meta", cut_decoy_meta, errors.CORRUPT_DICOM),
      ("NaN position of a neighbour slice", nan_neighbour, errors.BAD_GEOMETRY),
      ("annotated slice in JPEG-LS", jpeg_ls, errors.UNSUPPORTED_TRANSFER_SYNTAX),
      *[(f"a {kind} of another series", other(kind), None) for kind in bad_inputs.OTHER_KINDS],
      ("NaN position of a T1 decoy", nan_decoy, None),
  ]


@pytest.fixture(scope="module")
def builds(tmp_path_factory):
  """A clean build of NUM_GOOD phantom studies, and a build of the same studies beside one bad study per damage,
  an annotation with a list zIndex, an annotation file that is no JSON and one that holds an object."""
  root = tmp_path_factory.mktemp("fuzz_build")
  clean_dir, dirty_dir = root / "clean", root / "release[v1]*?"
  phantom.write_official_layout(clean_dir, NUM_GOOD, seed=SEED)
  phantom.write_official_layout(dirty_dir, NUM_GOOD, seed=SEED)
  damages = _damages()
  num_bad = len(damages) + 1
  study_dir, json_path = phantom.write_official_layout(dirty_dir, num_bad, seed=SEED, name="lumbar_bad",
                                                       start_index=NUM_GOOD)
  expected = {}
  for k, (name, damage, kind) in enumerate(damages):
    study = phantom.phantom_study(NUM_GOOD + k, SEED)
    path = damage(study, study_dir / f"study{study.index}")
    expected[study.study_uid] = (name, str(path), kind, study.index)
  # The last bad study: its annotation's zIndex is a list.
  entries = json.loads(json_path.read_text())
  z_study = phantom.phantom_study(NUM_GOOD + num_bad - 1, SEED)
  for e in entries:
    if e["studyUid"] == z_study.study_uid:
      for p in e["data"][0]["annotation"][0]["data"]["point"]:
        p["zIndex"] = [p["zIndex"]]
  json_path.write_text(json.dumps(entries))
  expected[z_study.study_uid] = ("zIndex is a list", str(json_path), errors.BAD_ANNOTATION, z_study.index)
  # Two pairs whose annotation files are unusable as a whole.
  for name, text in (("lumbar_junk", "[{not json"), ("lumbar_object", '{"studyUid": "1"}')):
    write_study(dirty_dir / name / "study0", hw=(8, 8))
    (dirty_dir / f"{name}_annotation.json").write_text(text)
  clean = tfds_spine.prepare("tianchi", root / "data_clean", manual_dir=clean_dir)
  dirty = tfds_spine.prepare("tianchi", root / "data_dirty", manual_dir=dirty_dir)  # must not raise
  COUNTS["TFDS build"] = {"bad studies": len(expected), "unusable annotation files": 2, "good studies": NUM_GOOD,
                          "builds": 2}
  return clean, dirty, expected, dirty_dir


def _examples(builder) -> dict[str, dict]:
  source = builder.as_data_source(split="+".join(f"fold{k}" for k in range(tfds_spine.NUM_FOLDS)))
  return {source[i]["study_uid"].decode(): source[i] for i in range(len(source))}


def test_build_reports_every_bad_study_with_file_study_and_kind(builds):
  _, dirty, expected, dirty_dir = builds
  summary = tfds_spine.build_summary(dirty)
  skipped = {s["study"].split(" ")[0]: s for s in summary["skipped"]}
  for uid, (name, path, kind, _) in expected.items():
    if kind is None:
      assert uid not in skipped, (name, skipped.get(uid))
      continue
    assert uid in skipped, name
    assert skipped[uid]["kind"] == kind and skipped[uid]["file"] == path, (name, skipped[uid])
    assert skipped[uid]["study"].startswith(uid) and skipped[uid]["reason"], name
  junk = [s for s in summary["skipped"] if "lumbar_junk" in s["file"] or "lumbar_object" in s["file"]]
  assert len(junk) == 2 and all(s["kind"] == errors.BAD_ANNOTATION for s in junk)
  assert summary["num_skipped"] == sum(kind is not None for _, _, kind, _ in expected.values()) + 2
  ignored = {s["file"]: s for s in summary["ignored_files"]}
  for uid, (name, path, kind, _) in expected.items():
    if kind is None:
      assert path in ignored and ignored[path]["study"].startswith(uid), name
      assert ignored[path]["kind"] in (errors.NOT_AN_IMAGE, errors.BAD_GEOMETRY), name


def test_good_studies_build_unchanged_beside_bad_ones(builds):
  clean, dirty, expected, _ = builds
  clean_examples, dirty_examples = _examples(clean), _examples(dirty)
  assert len(clean_examples) == NUM_GOOD
  left_out = {uid: index for uid, (_, _, kind, index) in expected.items() if kind is None}
  assert set(dirty_examples) == set(clean_examples) | set(left_out)
  for uid, ex in clean_examples.items():
    for key, value in ex.items():
      if key != "fold":  # folds are dealt over the studies built, so they differ
        np.testing.assert_array_equal(dirty_examples[uid][key], value, err_msg=key)
  for uid, index in left_out.items():  # a study whose extra file was left out reads as if the file was not there
    record = phantom.generate_study(index, SEED)
    for key in ("image", "points_xy", "disease", "pixel_spacing_mm"):
      np.testing.assert_array_equal(dirty_examples[uid][key], record[key], err_msg=key)


def test_print_fuzz_counts():
  """Runs last in this module: prints how many inputs of each kind were fuzzed (`pytest -s`)."""
  for what, n in COUNTS.items():
    print(f"fuzz: {what}: {n}")
