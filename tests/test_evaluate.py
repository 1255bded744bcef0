"""`ccfnet_jax.evaluate`: scoring hand-made predictions files (the official schema plus `prob`) against phantom
studies written in the official DICOM layout. Expected numbers are derived here from the ground truth by counting."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from ccfnet_jax.inference import predictions, scoring
from ccfnet_jax.data import phantom

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def data(tmp_path_factory):
  """Three phantom studies (DICOM + annotation JSON), the JSON entries in study order and their pixel spacings."""
  root = tmp_path_factory.mktemp("evaluate")
  studies_dir, annotation_path = phantom.write_official_layout(root, 3, seed=7)
  entries = {e["studyUid"]: e for e in json.loads(annotation_path.read_text())}
  ordered = [entries[phantom.generate_study(i, seed=7)["study_uid"]] for i in range(3)]
  spacing = [phantom.generate_study(i, seed=7)["pixel_spacing_mm"].astype(np.float64) for i in range(3)]
  return {"root": root, "studies_dir": studies_dir, "annotation_path": annotation_path, "entries": ordered,
          "spacing": spacing}


def _label(point: dict) -> int:
  """Binary disease label of an annotation point, written out here: 0 when its tag contains 'v1', else 1."""
  name = point["tag"]["identification"]
  tag = point["tag"]["disc" if "-" in name else "vertebra"]
  return 0 if "v1" in [c.strip() for c in tag.split(",")] else 1


def _prediction(entry: dict, *, dx_px: float = 0.0, dy_px: float = 0.0, prob_from_label: bool = True,
                drop: tuple[str, ...] = (), float_coords: dict | None = None) -> dict:
  """A predictions entry made from an annotation entry: points shifted, `prob` = the true label (perfect ranking)."""
  out = copy.deepcopy(entry)
  points = []
  for point in out["data"][0]["annotation"][0]["data"]["point"]:
    if point["tag"]["identification"] in drop:
      continue
    x, y = point["coord"]
    point["coord"] = [x + dx_px, y + dy_px]
    point["prob"] = float(_label(point)) if prob_from_label else 0.5
    if float_coords is not None:
      point["coord_float"] = float_coords[point["tag"]["identification"]]
    points.append(point)
  out["data"][0]["annotation"][0]["data"]["point"] = points
  return out


def _write(tmp_path, entries: list[dict], name: str = "preds.json"):
  path = tmp_path / name
  path.write_text(json.dumps(entries))
  return path


def _points(entry: dict) -> list[dict]:
  return entry["data"][0]["annotation"][0]["data"]["point"]


def _expected_auc(hit_labels: list[int]) -> float:
  """AUC of a perfect ranking (prob = label): 100 with both classes among the hits, else 0 (the reference's rule)."""
  return 100.0 if len(set(hit_labels)) == 2 else 0.0


def test_perfect_predictions(data, tmp_path):
  preds = _write(tmp_path, [_prediction(e) for e in data["entries"]])
  result = scoring.evaluate_files(preds, data["annotation_path"], data["studies_dir"])
  labels = {"disc": [], "vertebra": []}
  for entry in data["entries"]:
    for point in _points(entry):
      labels["disc" if "-" in point["tag"]["identification"] else "vertebra"].append(_label(point))
  assert result.metrics["disc_recall"] == 100.0 and result.metrics["vertebra_recall"] == 100.0
  assert result.metrics["disc_auc"] == _expected_auc(labels["disc"])
  assert result.metrics["vertebra_auc"] == _expected_auc(labels["vertebra"])
  assert result.counts["scored_studies"] == 3 and result.counts["missing_predictions"] == 0
  assert result.counts["points_from_coord"] == sum(len(_points(e)) for e in data["entries"])


def test_hits_at_6mm_in_mm_with_the_dicom_spacing_and_missing_studies_are_misses(data, tmp_path):
  e0, e1, _ = data["entries"]
  col0, row1 = data["spacing"][0][1], data["spacing"][1][0]
  preds = _write(tmp_path, [
      _prediction(e0, dx_px=5.9 / col0),  # 5.9 mm to the right: every point a hit
      _prediction(e1, dy_px=6.1 / row1),  # 6.1 mm down: every point a miss
      # study 2: no prediction -> misses
  ])
  result = scoring.evaluate_files(preds, data["annotation_path"], data["studies_dir"])
  for group, is_group in (("disc", lambda n: "-" in n), ("vertebra", lambda n: "-" not in n)):
    n_total = sum(is_group(p["tag"]["identification"]) for e in data["entries"] for p in _points(e))
    hits = [p for p in _points(e0) if is_group(p["tag"]["identification"])]
    assert result.metrics[f"{group}_recall"] == pytest.approx(100.0 * len(hits) / n_total)
    assert result.metrics[f"{group}_auc"] == _expected_auc([_label(p) for p in hits])
  m = result.metrics
  assert m["score"] == pytest.approx((m["disc_recall"] + m["vertebra_recall"]) / 2
                                     * (m["disc_auc"] + m["vertebra_auc"]) / 2 / 100)
  assert result.counts["missing_predictions"] == 1 and result.counts["predicted_studies"] == 2


def test_missing_points_count_as_misses(data, tmp_path):
  preds = _write(tmp_path, [_prediction(data["entries"][0], drop=("L1", "L2"))] +
                 [_prediction(e) for e in data["entries"][1:]])
  result = scoring.evaluate_files(preds, data["annotation_path"], data["studies_dir"])
  n_vertebrae = sum("-" not in p["tag"]["identification"] for e in data["entries"] for p in _points(e))
  assert result.metrics["vertebra_recall"] == pytest.approx(100.0 * (n_vertebrae - 2) / n_vertebrae)
  assert result.metrics["disc_recall"] == 100.0
  assert result.counts["missing_points"] == 2


def test_coord_float_is_used_unless_use_rounded(data, tmp_path):
  entries = []
  for entry in data["entries"]:
    exact = {p["tag"]["identification"]: [float(c) for c in p["coord"]] for p in _points(entry)}
    entries.append(_prediction(entry, dx_px=100.0, float_coords=exact))  # coord far off, coord_float exact
  preds = _write(tmp_path, entries)
  with_float = scoring.evaluate_files(preds, data["annotation_path"], data["studies_dir"])
  assert with_float.metrics["disc_recall"] == 100.0 and with_float.metrics["vertebra_recall"] == 100.0
  rounded = scoring.evaluate_files(preds, data["annotation_path"], data["studies_dir"], use_rounded=True)
  assert rounded.metrics["disc_recall"] == 0.0 and rounded.metrics["vertebra_recall"] == 0.0
  assert rounded.counts["points_from_coord_float"] == 0 and with_float.counts["points_from_coord"] == 0


def test_annotated_study_without_dicom_is_excluded_and_listed(data, tmp_path):
  extra = copy.deepcopy(data["entries"][0])
  extra["studyUid"] = "1.2.3.4"
  extra["data"][0]["instanceUid"] = "1.2.3.4.5"
  annotations = tmp_path / "ann.json"
  annotations.write_text(json.dumps(data["entries"] + [extra]))
  preds = _write(tmp_path, [_prediction(e) for e in data["entries"]] + [{**_prediction(data["entries"][0]),
                                                                         "studyUid": "9.9.9"}])
  result = scoring.evaluate_files(preds, annotations, data["studies_dir"])
  assert result.counts["excluded_studies"] == 1 and result.counts["scored_studies"] == 3
  assert result.counts["unannotated_predictions"] == 1
  assert result.excluded[0]["study"] == "1.2.3.4" and "1.2.3.4.5" in result.excluded[0]["reason"]
  assert result.metrics["disc_recall"] == 100.0


@pytest.mark.parametrize("mutate, message", [
    (lambda p: p.pop("prob"), "no finite number under 'prob'"),
    (lambda p: p["tag"].update(identification="L9"), "unknown identification 'L9'"),
    (lambda p: p.update(coord=[1.0]), "coord .* is not two finite numbers"),
])
def test_bad_prediction_file_names_the_study_and_problem(data, tmp_path, mutate, message):
  entry = _prediction(data["entries"][0])
  mutate(_points(entry)[0])
  preds = _write(tmp_path, [entry])
  with pytest.raises(predictions.PredictionFileError, match=message) as error:
    scoring.evaluate_files(preds, data["annotation_path"], data["studies_dir"])
  assert entry["studyUid"] in str(error.value) and str(preds) in str(error.value)


def test_duplicate_study_in_predictions_is_refused(data, tmp_path):
  entry = _prediction(data["entries"][0])
  preds = _write(tmp_path, [entry, entry])
  with pytest.raises(predictions.PredictionFileError, match="predicted twice"):
    predictions.load_predictions(preds)


def test_command_prints_and_writes_the_metrics(data, tmp_path):
  preds = _write(tmp_path, [_prediction(e) for e in data["entries"][:2]])
  output = tmp_path / "metrics.json"
  done = subprocess.run([sys.executable, "-m", "ccfnet_jax.evaluate", f"--predictions={preds}",
                         f"--annotations={data['annotation_path']}", f"--studies={data['studies_dir']}",
                         f"--output={output}"], cwd=REPO, capture_output=True, text=True, timeout=120,
                        env={**os.environ, "JAX_PLATFORMS": "cpu"})
  assert done.returncode == 0, done.stderr
  written = json.loads(output.read_text())
  expected = scoring.evaluate_files(preds, data["annotation_path"], data["studies_dir"])
  assert written["metrics"] == expected.metrics
  assert written["counts"]["missing_predictions"] == 1
  assert "missing_predictions 1" in done.stdout and "score" in done.stdout
