"""Predicting a folder of DICOM studies: read each study's slice, run the model in batches, collect the failures.

Studies: every sub-folder of the studies folder (official layout `DIR/studyN/imageK.dcm`, all series of a study
mixed flat; `DIR` itself when it holds `.dcm` files directly), in one order (`data.layout`). The slice: with
annotations, the annotated instance of the study (joined by StudyInstanceUID); otherwise, or for a study the
annotation file does not list, the T2 sagittal series' middle slice (docs/method.md#data). Input: the training
pipeline's own example (`pipeline.to_example`: stretched to the training image size). A study that cannot be read
is reported with its file, reason and kind, and the others are predicted.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import os
import pathlib
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np

from ccfnet_jax import config as config_lib
from ccfnet_jax import rundir
from ccfnet_jax.data import annotations as annotations_lib
from ccfnet_jax.data import dicom, draw, errors, layout, pipeline
from ccfnet_jax.data.errors import StudyError
from ccfnet_jax.inference import predictions as predictions_lib
from ccfnet_jax.inference import predictor as predictor_lib
from ccfnet_jax.inference import report
from ccfnet_jax.inference.loading import LoadedModel

UNEXPECTED_ERROR = "unexpected_error"
"""Kind of a study that failed with an error the DICOM reader does not classify (reported, the run goes on)."""


def read_slice(folder: pathlib.Path, annotations: Mapping[str, annotations_lib.StudyAnnotation] | None
               ) -> tuple[dicom.StudyImage, annotations_lib.StudyAnnotation | None, str | None]:
  """Reads the slice to predict on in one study folder.

  Returns:
    (the slice stack, its annotation or None, a warning or None).
  Raises:
    StudyError: the folder is empty or holds an unreadable file, no usable sagittal series, several studies, ...
  """
  name = folder.name
  headers, problems = layout.scan_headers(folder, name)
  uids = sorted({h.study_uid for h in headers})
  annotated = [annotations[uid] for uid in uids if annotations and uid in annotations]
  if annotated:
    ann = annotated[0]
    image = dicom.read_study(folder, headers=headers, problems=problems, instance_uid=ann.instance_uid,
                             series_uid=ann.series_uid, study_uid=ann.study_uid, study=name)
    return image, ann, None
  if len(uids) > 1:
    raise StudyError(name, str(folder), f"the folder holds {len(uids)} studies ({', '.join(uids)}); predict needs "
                     "one study per folder (or an annotation naming the one to use)", errors.BAD_IMAGE)
  warning = None
  if annotations is not None:
    warning = (f"{name}: studyUid {uids[0]} is not in the annotation file: slice chosen by the T2 sagittal "
               "middle-slice rule")
  return dicom.read_study(folder, headers=headers, problems=problems, study=name), None, warning


@dataclasses.dataclass
class _Loaded:
  folder: pathlib.Path
  image: dicom.StudyImage | None = None
  annotation: annotations_lib.StudyAnnotation | None = None
  example: dict[str, np.ndarray] | None = None
  error: StudyError | None = None
  warning: str | None = None


def _load(folder: pathlib.Path, annotations: Mapping[str, annotations_lib.StudyAnnotation] | None,
          image_size: int) -> _Loaded:
  """Reads one study and builds its model input; any failure becomes a StudyError in the result (never raised)."""
  try:
    image, annotation, warning = read_slice(folder, annotations)
    record = predictor_lib.unlabelled_record(image.image, image.pixel_spacing_mm, image.study_uid, image.series_uid,
                                         image.instance_uid)
    example = pipeline.to_example(record, image_size)
    return _Loaded(folder, image, annotation, example, warning=warning)
  except StudyError as e:
    return _Loaded(folder, error=e)
  except Exception as e:  # pylint: disable=broad-except  (one bad study must not stop a run over thousands)
    return _Loaded(folder, error=StudyError(folder.name, str(folder), f"{type(e).__name__}: {e}", UNEXPECTED_ERROR))


def draw_overlay(loaded: _Loaded, pred: predictions_lib.StudyPrediction, directory: str | os.PathLike) -> str:
  """Writes `directory/<folder name>.png`: the slice with the predicted points, names and probabilities."""
  assert loaded.image is not None
  labels = None if loaded.annotation is None else loaded.annotation.disease
  picture = draw.draw_study(loaded.image.image, pred.pred_xy, probs=pred.prob, labels=labels,
                            title=f"{loaded.folder.name} z={pred.z_index}")
  path = os.path.join(os.fspath(directory), f"{loaded.folder.name}.png")
  picture.save(path)
  return path


@dataclasses.dataclass
class PredictionRun:
  """What `predict_studies` returns: predictions in folder order, failed studies, warnings."""
  predictions: list[predictions_lib.StudyPrediction]
  failed: errors.SkipReport
  warnings: list[str]
  annotation_errors: list[StudyError]
  num_folders: int
  report_studies: list[report.StudyResult] = dataclasses.field(default_factory=list)

  def entries(self) -> list[dict[str, Any]]:
    return [predictions_lib.prediction_entry(p) for p in self.predictions]


def predict_studies(predictor: predictor_lib.Predictor, studies_dir: str | os.PathLike, *,
                    annotations: str | os.PathLike | Sequence[str | os.PathLike] | None = None,
                    overlays_dir: str | os.PathLike | None = None, num_threads: int = 4,
                    progress: bool = True, report_tiles: bool = False) -> PredictionRun:
  """Predicts every study folder under `studies_dir` (see the module docstring).

  Reading runs in `num_threads` threads one batch ahead of the model. Unreadable studies are collected in
  `PredictionRun.failed` with their reasons; the others are predicted. With `report_tiles`, each predicted study's
  slice, prediction and (with annotations) ground truth are kept for the QC page (`PredictionRun.report_studies`).
  """
  import tqdm  # pylint: disable=g-import-not-at-top

  folders = layout.study_folders(studies_dir)
  by_uid = None
  annotation_errors: list[StudyError] = []
  if annotations is not None:
    good, annotation_errors = annotations_lib.load_annotations(annotations)
    by_uid = {a.study_uid: a for a in good}
  if overlays_dir is not None:
    os.makedirs(overlays_dir, exist_ok=True)
  size = predictor.batch_size
  chunks = [folders[i:i + size] for i in range(0, len(folders), size)]
  failed = errors.SkipReport()
  warnings_: list[str] = []
  predictions: list[predictions_lib.StudyPrediction] = []
  report_studies: list[report.StudyResult] = []
  with concurrent.futures.ThreadPoolExecutor(max(1, num_threads)) as pool, \
      tqdm.tqdm(total=len(folders), unit="study", desc="predict", disable=not progress) as bar:

    def submit(chunk):
      return [pool.submit(_load, folder, by_uid, predictor.image_size) for folder in chunk]

    pending = submit(chunks[0]) if chunks else []
    for k in range(len(chunks)):
      loaded = [future.result() for future in pending]
      pending = submit(chunks[k + 1]) if k + 1 < len(chunks) else []
      good = []
      for item in loaded:
        if item.error is not None:
          failed.add(item.error)
        else:
          good.append(item)
          if item.warning:
            warnings_.append(item.warning)
      if good:
        out = predictor(predictor_lib.stack_examples([g.example for g in good], size, predictor.image_size))
        for i, item in enumerate(good):
          image = item.image
          pred = predictions_lib.StudyPrediction(
              folder=str(item.folder), study_uid=image.study_uid, series_uid=image.series_uid,
              instance_uid=image.instance_uid, z_index=int(image.z_index),
              native_hw=tuple(int(v) for v in image.native_hw), pred_xy=out["pred_xy"][i], prob=out["pred_prob"][i])
          predictions.append(pred)
          if overlays_dir is not None:
            draw_overlay(item, pred, overlays_dir)
          if report_tiles:
            report_studies.append(_report_study(item, pred))
      bar.update(len(loaded))
  return PredictionRun(predictions, failed, warnings_, annotation_errors, len(folders), report_studies)


def _report_study(loaded: _Loaded, pred: predictions_lib.StudyPrediction) -> report.StudyResult:
  """A QC tile's inputs: the middle slice (kept small), the prediction, and the annotation where there is one."""
  image = loaded.image.image[..., loaded.image.image.shape[-1] // 2]
  ann = loaded.annotation
  if ann is None:
    return report.StudyResult(loaded.folder.name, image, pred.pred_xy, pred.prob)
  return report.StudyResult(loaded.folder.name, image, pred.pred_xy, pred.prob, gt_xy=ann.points_xy,
                            gt_valid=ann.point_valid, gt_disease=ann.disease,
                            pixel_spacing_mm=loaded.image.pixel_spacing_mm)


def write_outputs(run: PredictionRun, output: str | os.PathLike, info: Mapping[str, Any] | None = None
                  ) -> tuple[str, str]:
  """Writes the predictions file and its `.errors.json` sidecar; returns both paths."""
  output = os.fspath(output)
  rundir.write_json(output, run.entries(), indent=None)  # compact, as the official files
  sidecar = {
      "predictions": os.path.abspath(output),
      "num_study_folders": run.num_folders,
      "num_predicted": len(run.predictions),
      **run.failed.as_dict(),
      "warnings": run.warnings,
      "annotation_errors": [e.as_dict() for e in run.annotation_errors],
      "disease_threshold": predictions_lib.DISEASE_THRESHOLD,
      **dict(info or {}),
  }
  path = predictions_lib.sidecar_path(output)
  rundir.write_json(path, sidecar, indent=1)
  return output, path


def run_info(loaded: LoadedModel, predictor: predictor_lib.Predictor) -> dict[str, Any]:
  """What was run, for the sidecar."""
  ref = loaded.checkpoint
  return {"checkpoint": ref.step_dir, "step": ref.step, "which": ref.which, "config": ref.config_path,
          "model": config_lib.describe_model(loaded.config), "image_size": loaded.image_size,
          **dataclasses.asdict(loaded.eval_options), "batch_size": predictor.batch_size, "devices": jax.device_count()}
