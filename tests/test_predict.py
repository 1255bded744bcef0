"""The inference product end to end, in small: train briefly on phantoms -> write the phantom studies as DICOM ->
predict -> evaluate, equal to the training-time evaluation of the same checkpoint; plus the output schema, unreadable
studies, checkpoint lookup and a mismatched checkpoint.

The model is the tests' TinyNet (`tests/tiny_training.py`, registered in the model registry) so that training and
compiling take seconds; the code paths (checkpoint, config, eval step, pipeline, DICOM reader) are the product's.
"""

from __future__ import annotations

import json
import pathlib

import jax
import numpy as np
import pytest

import tiny_training
from ccfnet_jax import checkpoint as checkpoint_lib
from ccfnet_jax import config as config_lib
from ccfnet_jax import metrics, objects, rundir, train
from ccfnet_jax.inference import loading, predictions, predictor as predictor_lib, report, scoring, studies
from ccfnet_jax.train import setup
from ccfnet_jax.data import annotations as annotations_lib
from ccfnet_jax.data import folds, layout, phantom, pipeline

NUM_STUDIES = 16
TRAIN_STEPS = 40
BATCH = 8
VAL_FOLD = 0


@pytest.fixture(scope="module")
def run(tmp_path_factory):
  """A briefly trained TinyNet run (fold 0) and phantom studies 0..15 written in the official DICOM layout, with an
  empty folder and a folder holding a corrupt file beside them, predicted with annotations and overlays."""
  root = tmp_path_factory.mktemp("predict")
  workdir = root / "run"
  config = tiny_training.tiny_config(num_steps=TRAIN_STEPS, eval_every_steps=TRAIN_STEPS // 2,
                                     phantom_studies=NUM_STUDIES,
                                     learning_rate=3e-3, fold=str(VAL_FOLD))
  for key in list(config.augment):  # no augmentation: a few steps then already find some points
    if key.endswith("_prob"):
      config.augment[key] = 0.0
  config.augment.point_jitter = False
  results = train.train_and_evaluate(config, str(workdir))

  studies_dir, annotation_path = phantom.write_official_layout(root / "data", NUM_STUDIES, seed=config.phantom_seed)
  (studies_dir / "study_empty").mkdir()
  (studies_dir / "study_corrupt").mkdir()
  (studies_dir / "study_corrupt" / "image0.dcm").write_bytes(b"this is not a DICOM file")

  loaded = loading.load_model(workdir, which="last")
  predictor = predictor_lib.Predictor(loaded.model, image_size=loaded.image_size, options=loaded.eval_options,
                                      batch_size=BATCH)
  prediction_run = studies.predict_studies(predictor, studies_dir, annotations=annotation_path,
                                           overlays_dir=root / "overlays", progress=False)
  output, sidecar = studies.write_outputs(prediction_run, root / "preds.json", studies.run_info(loaded, predictor))
  return {"root": root, "workdir": workdir, "config": config, "results": results, "studies_dir": studies_dir,
          "annotation_path": annotation_path, "loaded": loaded, "predictor": predictor, "output": output,
          "sidecar": sidecar}


def _val_annotations(run) -> tuple[pathlib.Path, set[str]]:
  """The annotation file restricted to the validation fold's studies (fold rule of `data.folds`)."""
  entries = json.loads(run["annotation_path"].read_text())
  fold_of = folds.assign_folds([e["studyUid"] for e in entries], run["config"].num_folds)
  val = [e for e in entries if fold_of[e["studyUid"]] == VAL_FOLD]
  path = run["root"] / "val_annotation.json"
  path.write_text(json.dumps(val))
  return path, {e["studyUid"] for e in val}


def test_predict_then_evaluate_equals_training_time_evaluation(run):
  val_path, val_uids = _val_annotations(run)
  assert len(val_uids) == NUM_STUDIES // 4
  result = scoring.evaluate_files(run["output"], val_path, run["studies_dir"])
  training_time = run["results"]["folds"][str(VAL_FOLD)]["last"]
  assert training_time["step"] == TRAIN_STEPS
  for name in metrics.METRIC_NAMES:
    assert result.metrics[name] == training_time[name], name
  assert result.counts["scored_studies"] == len(val_uids)
  assert result.counts["missing_predictions"] == 0
  assert result.counts["points_from_coord_float"] == objects.NUM_OBJECTS * len(val_uids)
  assert result.counts["points_from_coord"] == 0


def test_predictions_equal_the_training_pipeline_path(run):
  """The same checkpoint on the TFDS records the training run evaluated (generated phantoms, not DICOM) gives the
  same float points and probabilities as predict on the DICOM files, and the same metrics at any hit radius."""
  val_source = setup.open_fold(run["config"], VAL_FOLD, str(run["workdir"])).val_source
  reference = {}
  for batch in pipeline.eval_dataset(val_source, batch_size=BATCH, image_size=run["config"].image_size):
    out = run["predictor"](batch)
    for i in np.flatnonzero(batch["example_valid"]):
      uid = val_source[int(batch["record_index"][i])]["study_uid"]
      uid = uid.decode() if isinstance(uid, bytes) else uid
      reference[uid] = (out["pred_xy"][i], out["pred_prob"][i], val_source[int(batch["record_index"][i])])
  predicted = predictions.load_predictions(run["output"])
  assert set(reference) <= set(predicted)
  for uid, (xy, prob, _) in reference.items():
    np.testing.assert_array_equal(predicted[uid].xy, xy.astype(np.float64))
    np.testing.assert_array_equal(predicted[uid].prob, prob.astype(np.float64))

  # Larger hit radii (the briefly trained model finds few points within 6 mm): more hits, defined AUCs, still equal.
  uids = sorted(reference)
  stack = lambda f: np.stack([f(reference[u]) for u in uids])  # noqa: E731
  val_path, _ = _val_annotations(run)
  for radius_mm in (6.0, 40.0, 1e4):
    expected = metrics.evaluate(stack(lambda r: r[0]), stack(lambda r: r[1]), stack(lambda r: r[2]["points_xy"]),
                                stack(lambda r: r[2]["point_valid"]), stack(lambda r: r[2]["disease"]),
                                stack(lambda r: r[2]["pixel_spacing_mm"]), max_distance_mm=radius_mm)
    result = scoring.evaluate_files(run["output"], val_path, run["studies_dir"], max_distance_mm=radius_mm)
    assert result.metrics == expected, radius_mm
  assert result.metrics["disc_recall"] == 100.0 and result.metrics["vertebra_auc"] > 0


def test_output_schema(run):
  entries = json.loads(pathlib.Path(run["output"]).read_text())
  truth = {a.study_uid: a for a in annotations_lib.load_annotations(run["annotation_path"])[0]}
  assert isinstance(entries, list) and len(entries) == NUM_STUDIES
  assert {e["studyUid"] for e in entries} == set(truth)
  sizes = {h.instance_uid: (h.rows, h.columns) for i in range(NUM_STUDIES)
           for h in layout.scan_headers(run["studies_dir"] / f"study{i}")[0]}
  for entry in entries:
    gt = truth[entry["studyUid"]]
    assert set(entry) == {"studyUid", "version", "data"}
    (series,) = entry["data"]
    assert series["seriesUid"] == gt.series_uid and series["instanceUid"] == gt.instance_uid
    (annotation,) = series["annotation"]
    points = annotation["data"]["point"]
    assert [p["tag"]["identification"] for p in points] == list(objects.NAMES)
    height, width = sizes[series["instanceUid"]]
    for point in points:
      assert set(point) == {"coord", "coord_float", "prob", "tag", "zIndex"}
      name = point["tag"]["identification"]
      key = "disc" if "-" in name else "vertebra"
      assert set(point["tag"]) == {"identification", key}
      assert point["tag"][key] == ("v2" if point["prob"] >= 0.5 else "v1")
      assert all(isinstance(c, int) and not isinstance(c, bool) for c in point["coord"])
      assert all(isinstance(c, float) for c in point["coord_float"])
      assert 0.0 <= point["prob"] <= 1.0
      assert point["zIndex"] == gt.z_index
      # The nearest integer, clipped into the image.
      for c, f, size in zip(point["coord"], point["coord_float"], (width, height)):
        assert c == min(max(int(np.floor(f + 0.5)), 0), size - 1)


def test_unreadable_studies_are_listed_and_the_rest_predicted(run):
  sidecar = json.loads(pathlib.Path(run["sidecar"]).read_text())
  assert sidecar["num_study_folders"] == NUM_STUDIES + 2
  assert sidecar["num_predicted"] == NUM_STUDIES
  failed = {e["study"]: e for e in sidecar["skipped"]}
  assert set(failed) == {"study_empty", "study_corrupt"}
  assert failed["study_empty"]["kind"] == "empty_folder"
  assert failed["study_corrupt"]["kind"] == "corrupt_dicom"
  assert failed["study_corrupt"]["file"].endswith("study_corrupt/image0.dcm")
  assert sidecar["step"] == TRAIN_STEPS and sidecar["disease_threshold"] == 0.5


def test_overlays_written(run):
  pictures = sorted(p.name for p in (run["root"] / "overlays").iterdir())
  assert pictures == sorted(f"study{i}.png" for i in range(NUM_STUDIES))


def test_unannotated_prediction_uses_the_t2_middle_slice(run, tmp_path):
  """Without annotations the slice is the middle one of the T2 sagittal series (not a decoy series)."""
  truth = {a.study_uid: a for a in annotations_lib.load_annotations(run["annotation_path"])[0]}
  one = tmp_path / "studies"
  one.mkdir()
  (one / "study3").symlink_to(run["studies_dir"] / "study3")
  result = studies.predict_studies(run["predictor"], one, progress=False)
  (pred,) = result.predictions
  gt = truth[pred.study_uid]
  assert pred.series_uid == gt.series_uid
  num_t2 = sum(h.series_uid == gt.series_uid for h in layout.scan_headers(one / "study3")[0])
  assert num_t2 >= 3 and pred.z_index == num_t2 // 2
  assert not result.warnings and not result.failed.errors

  # With an annotation file that does not list the study: the same slice, and a warning saying so.
  empty = tmp_path / "ann.json"
  empty.write_text("[]")
  listed = studies.predict_studies(run["predictor"], one, annotations=empty, progress=False)
  assert listed.predictions[0].instance_uid == pred.instance_uid
  assert len(listed.warnings) == 1 and "not in the annotation file" in listed.warnings[0]


def test_find_checkpoint_accepts_every_level(run):
  workdir = run["workdir"]
  step_dir = workdir / "fold_0" / "checkpoints" / str(TRAIN_STEPS)
  for path in (workdir, workdir / "fold_0", workdir / "fold_0" / "checkpoints", step_dir):
    ref = loading.find_checkpoint(path, which="last")
    assert pathlib.Path(ref.step_dir) == step_dir and ref.step == TRAIN_STEPS
    assert ref.config_path == str(workdir / rundir.CONFIG_FILE)
  with pytest.raises(loading.CheckpointError, match="no checkpoint found"):
    loading.find_checkpoint(run["studies_dir"])
  with pytest.raises(loading.CheckpointError, match="fold 3"):
    loading.find_checkpoint(workdir, fold=3)


def test_best_checkpoint_is_the_one_training_reports_as_best(run):
  """Two evaluations (steps 20 and 40) were checkpointed; 'best' is the step the training results call best."""
  best = run["results"]["folds"][str(VAL_FOLD)]["best"]["step"]
  assert best in (TRAIN_STEPS // 2, TRAIN_STEPS)
  ref = loading.find_checkpoint(run["workdir"], which="best")
  assert ref.step == best and ref.which == "best"


def test_mismatched_checkpoint_is_refused_naming_the_parameter(run):
  config, _ = config_lib.load_run_config(run["workdir"] / rundir.CONFIG_FILE)
  config.model.name = "ccfnet"  # the TinyNet checkpoint with the CCF-Net R18-MSC config
  with pytest.raises(loading.CheckpointMismatchError) as error:
    loading.load_model(run["workdir"], config=config)
  message = str(error.value)
  assert "ccfnet depth=18 msc=True" in message
  assert "params/backbone/conv1/kernel" in message  # a CCF-Net parameter the checkpoint lacks
  assert "params/convs/0/kernel" in message  # a TinyNet parameter CCF-Net does not have


def test_shape_mismatch_is_named():
  saved = {"params/head/kernel": (1, 1, 16, 44), "params/stem/kernel": (3, 3, 3, 8), "step": ()}
  expected = {"params/head/kernel": (1, 1, 32, 44), "params/stem/kernel": (3, 3, 3, 8)}
  with pytest.raises(loading.CheckpointMismatchError,
                     match=r"params/head/kernel: checkpoint \(1, 1, 16, 44\), model \(1, 1, 32, 44\)"):
    checkpoint_lib.check_compatible(saved, expected, where="ckpt", model="m", groups=("params",))
  checkpoint_lib.check_compatible(expected, expected, where="ckpt", model="m", groups=("params",))  # equal pass


def test_rounding_and_tags():
  assert predictions.rounded_coord(np.array([10.49, 3.5]), (20, 30)) == [10, 4]
  assert predictions.rounded_coord(np.array([-3.2, 19.7]), (20, 30)) == [0, 19]  # clipped into the 20 x 30 image
  assert predictions.disease_tag(0.5) == "v2" and predictions.disease_tag(0.4999) == "v1"
  assert predictions.sidecar_path("out/preds.json") == "out/preds.errors.json"


def test_predictor_batch_size_must_fit_the_mesh(run):
  with pytest.raises(ValueError, match="multiple of the number of devices"):
    predictor_lib.Predictor(run["loaded"].model, image_size=run["loaded"].image_size, batch_size=jax.device_count() + 1)


def test_a_final_model_on_every_study_is_predicted_like_any_run(tmp_path, run):
  """`fold=none` trains on all 16 studies with no validation, keeps its last checkpoint, says so in results.json,
  and predict / export find it with no --fold (or with fold='none')."""
  config = tiny_training.tiny_config(num_steps=4, phantom_studies=NUM_STUDIES, fold="none", checkpoint_every_steps=2)
  workdir = tmp_path / "final"
  results = train.train_and_evaluate(config, str(workdir))
  assert results["folds"] == {} and results["final"]["step"] == 4 and results["final"]["checkpoint"] == "last"
  assert results["final"]["train_studies"] == NUM_STUDIES
  lines = [json.loads(line) for line in (workdir / "fold_none" / "metrics.jsonl").read_text().splitlines()]
  assert not [r for r in lines if r["split"] == "eval"]
  config_line = next(r for r in lines if r["split"] == "config")  # pos_weight from the labels of every study
  assert config_line["pos_weight_vertebra"] != pytest.approx(
      json.loads((run["workdir"] / "fold_0" / "metrics.jsonl").read_text().splitlines()[0])["pos_weight_vertebra"])
  for fold in (None, "none"):
    ref = loading.find_checkpoint(workdir, which="best", fold=fold)
    assert ref.step == 4 and ref.which == "last" and "fold_none" in ref.step_dir
  loaded = loading.load_model(workdir)
  runner = predictor_lib.Predictor(loaded.model, image_size=loaded.image_size, batch_size=BATCH)
  predicted = studies.predict_studies(runner, run["studies_dir"], progress=False)
  assert len(predicted.predictions) == NUM_STUDIES
  assert all(np.all(np.isfinite(p.pred_xy)) for p in predicted.predictions)


def test_the_qc_page_has_a_tile_per_predicted_study_and_lists_the_failed(run, tmp_path):
  predicted = studies.predict_studies(run["predictor"], run["studies_dir"], annotations=run["annotation_path"],
                                      progress=False, report_tiles=True)
  page = report.write_report(tmp_path / "qc", predicted.report_studies, predicted.failed)
  text = open(page, encoding="utf-8").read()
  assert text.count('class="tile') == len(predicted.predictions) == NUM_STUDIES
  assert "study_corrupt" in text and "study_empty" in text
  summary = json.loads(text.split('id="summary">')[1].split("</script>")[0])
  assert summary["metrics"] is not None and len(summary["studies"]) == NUM_STUDIES
  assert all(len(s["error_mm"]) == objects.NUM_OBJECTS for s in summary["studies"])
