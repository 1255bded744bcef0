"""Annotation parsing: every label quirk (docs/method.md#labels) on small hand-made JSONs, and the reported problems."""

import numpy as np
import pytest

from ccfnet_jax import objects
from ccfnet_jax.data import annotations, errors
from ccfnet_jax.data.errors import StudyError
from synthetic_studies import default_points, entry, point, write_json


def parse_one(points, study_uid="1.1"):
  good, bad = annotations.parse_entries([entry(study_uid, "1.1.2", "1.1.2.3", points)], "test.json")
  assert not bad, bad
  return good[0]


def test_points_go_to_object_order_with_labels():
  # Points in scrambled order; expected arrays built by hand in NAMES order.
  pts = [point("L5-S1", 50, 60, "v3", 4), point("L1", 10, 11, "v2", 4), point("T12-L1", 12, 5, "v1", 4)]
  a = parse_one(pts)
  assert (a.study_uid, a.series_uid, a.instance_uid, a.z_index, a.source) == ("1.1", "1.1.2", "1.1.2.3", 4,
                                                                              "test.json")
  l1, top, bottom = objects.INDEX["L1"], objects.INDEX["T12-L1"], objects.INDEX["L5-S1"]
  expected_xy = np.zeros((11, 2), np.float32)
  expected_xy[l1], expected_xy[top], expected_xy[bottom] = (10, 11), (12, 5), (50, 60)
  np.testing.assert_array_equal(a.points_xy, expected_xy)
  assert a.points_xy.dtype == np.float32
  assert a.point_valid.tolist() == [i in (l1, top, bottom) for i in range(11)]
  expected_disease = [-1] * 11
  expected_disease[l1], expected_disease[top], expected_disease[bottom] = 1, 0, 1
  assert a.disease.tolist() == expected_disease and a.disease.dtype == np.int32
  assert a.tags[l1] == "v2" and a.tags[bottom] == "v3" and a.tags[objects.INDEX["L2"]] == ""


def test_label_key_comes_from_identification_when_both_keys_present():
  # study8-style vertebra: {'identification': 'L2', 'vertebra': 'v2', 'disc': ''}; a disc the other way round.
  pts = [{"coord": [5, 6], "tag": {"identification": "L2", "vertebra": "v2", "disc": ""}, "zIndex": 0},
         {"coord": [5, 9], "tag": {"identification": "L2-L3", "disc": "v1", "vertebra": "v2"}, "zIndex": 0}]
  a = parse_one(pts)
  assert a.disease[objects.INDEX["L2"]] == 1 and a.tags[objects.INDEX["L2"]] == "v2"
  assert a.disease[objects.INDEX["L2-L3"]] == 0 and a.tags[objects.INDEX["L2-L3"]] == "v1"


def test_empty_label_on_applicable_key_is_normal_but_valid():
  pts = [{"coord": [5, 6], "tag": {"identification": "L1-L2", "disc": "", "vertebra": ""}, "zIndex": 0}]
  a = parse_one(pts)
  i = objects.INDEX["L1-L2"]
  assert a.point_valid[i] and a.disease[i] == 0 and a.tags[i] == ""


@pytest.mark.parametrize("label, disease", [("v3,v5", 1), ("v5,v2", 1), ("v2,v5", 1), ("v5", 1), ("v1,v5", 0),
                                            ("v5, v1", 0), ("v4", 1), ("v1", 0)])
def test_comma_lists(label, disease):
  a = parse_one([point("L4-L5", 3, 4, label)])
  assert a.disease[objects.INDEX["L4-L5"]] == disease and a.tags[objects.INDEX["L4-L5"]] == label


def test_t11_t12_is_the_top_disc():
  a = parse_one([point("T11-T12", 7, 2, "v2")])
  i = objects.INDEX["T12-L1"]
  assert a.point_valid[i] and a.disease[i] == 1 and a.points_xy[i].tolist() == [7, 2]


def test_ten_points_leave_the_missing_one_invalid_and_unknown():
  pts = [p for p in default_points() if p["tag"]["identification"] != "T12-L1"]
  assert len(pts) == 10
  a = parse_one(pts)
  i = objects.INDEX["T12-L1"]
  assert not a.point_valid[i] and a.disease[i] == -1 and a.tags[i] == "" and a.points_xy[i].tolist() == [0, 0]
  assert a.point_valid.sum() == 10 and (a.disease[a.point_valid] >= 0).all()


def parse_bad(points_or_entry, kind):
  item = points_or_entry if isinstance(points_or_entry, dict) else entry("9.9", "9.9.1", "9.9.1.1", points_or_entry)
  good_entry = entry("1.1", "1.1.2", "1.1.2.3", default_points())
  good, bad = annotations.parse_entries([item, good_entry], "f.json")
  assert [g.study_uid for g in good] == ["1.1"], "the good study must survive"
  assert len(bad) == 1 and bad[0].kind == kind, bad
  assert bad[0].file == "f.json"
  return bad[0]


def test_unknown_identification_is_reported_not_raised():
  e = parse_bad(default_points() + [point("S1", 4, 4, "v1")], errors.UNKNOWN_IDENTIFICATION)
  assert e.study == "9.9" and "S1" in e.reason


def test_same_object_twice_is_reported():
  parse_bad([point("L3", 4, 4, "v1"), point("L3", 5, 5, "v2")], errors.DUPLICATE_POINT)


@pytest.mark.parametrize("bad_point", [
    {"coord": [1], "tag": {"identification": "L1", "vertebra": "v1"}},
    {"coord": [1, float("nan")], "tag": {"identification": "L1", "vertebra": "v1"}},
    {"coord": [1, 2], "tag": {"identification": "L1", "vertebra": "x9"}},
    {"coord": [1, 2], "tag": {"identification": "L1", "disc": "v1"}},  # no vertebra key at all
    {"coord": [1, 2], "tag": {"vertebra": "v1"}},
])
def test_malformed_points_are_reported(bad_point):
  parse_bad([bad_point], errors.BAD_ANNOTATION)


def test_malformed_study_entry_is_reported():
  parse_bad({"studyUid": "9.9", "data": []}, errors.BAD_ANNOTATION)
  parse_bad({"studyUid": "9.9", "data": [{"seriesUid": "1", "instanceUid": "2", "annotation": [{}, {}]}]},
            errors.BAD_ANNOTATION)


def test_points_disagreeing_on_z_index():
  parse_bad([point("L1", 1, 1, "v1", 3), point("L2", 1, 1, "v1", 4)], errors.BAD_ANNOTATION)


@pytest.mark.parametrize("z_index", [[1], {"z": 1}, None, 1.5, "1", True, 10**400])
def test_z_index_of_another_type_is_reported(z_index):
  e = parse_bad([point("L1", 1, 1, "v1", z_index), point("L2", 1, 1, "v1", 1)], errors.BAD_ANNOTATION)
  assert "zIndex" in e.reason


@pytest.mark.parametrize("coord", [[10**400, 1], [1, -(10**400)]])
def test_coordinates_too_large_for_a_float_are_reported(coord):
  e = parse_bad([{"coord": coord, "tag": {"identification": "L1", "vertebra": "v1"}, "zIndex": 0}],
                errors.BAD_ANNOTATION)
  assert "coord" in e.reason


@pytest.mark.parametrize("text", ["[" * 100000, "\x00\xff garbage", "", '{"a": 1}', "null"])
def test_unusable_json_files_raise_only_a_study_error(tmp_path, text):
  path = tmp_path / "x_annotation.json"
  path.write_bytes(text.encode("latin-1"))
  with pytest.raises(StudyError) as info:
    annotations.load_annotations(path)
  assert info.value.file == str(path) and info.value.kind == errors.BAD_ANNOTATION


def test_duplicated_study_uid_across_files_drops_every_copy(tmp_path):
  first = write_json(tmp_path / "a_annotation.json", [entry("1.1", "s", "i", default_points()),
                                                      entry("2.2", "s", "i", default_points())])
  second = write_json(tmp_path / "b_annotation.json", [entry("1.1", "s", "i", default_points())])
  good, bad = annotations.load_annotations([first, second])
  assert [g.study_uid for g in good] == ["2.2"]
  assert sorted(e.file for e in bad) == sorted([str(first), str(second)])
  assert all(e.kind == errors.DUPLICATE_STUDY and e.study == "1.1" for e in bad)


def test_unreadable_json_names_the_file(tmp_path):
  path = tmp_path / "x_annotation.json"
  path.write_text("[{not json")
  with pytest.raises(StudyError, match="x_annotation.json"):
    annotations.load_annotations(path)


def test_points_outside_the_image():
  a = parse_one([point("L1", 15.5, 3, "v1"), point("L2", 16, 3, "v1")])
  annotations.check_points_inside(a, (12, 17))  # x = 16 < W = 17: inside
  with pytest.raises(StudyError) as info:
    annotations.check_points_inside(a, (12, 16), study="study7", file="x.dcm")
  assert info.value.kind == errors.POINTS_OUTSIDE and "L2" in info.value.reason and "L1 " not in info.value.reason
  assert (info.value.study, info.value.file) == ("study7", "x.dcm")
