"""Predicts the 11 points and their disease probabilities for every study folder, as an official-schema JSON file.

    python -m ccfnet_jax.predict --workdir=runs/r18 --studies=DIR --output=preds.json \
        [--annotations=ann.json] [--overlays=DIR] [--which=best|last] [--fold=K] [--batch_size=N]
    python -m ccfnet_jax.predict --checkpoint=runs/r18/fold_0/checkpoints/1200 [--config=configs/r18_msc.py] ...

Studies: every sub-folder of `--studies` (official layout `DIR/studyN/imageK.dcm`, all series of a study mixed flat;
`DIR` itself when it holds `.dcm` files directly). The slice: with `--annotations`, the annotated instance of the study
(joined by StudyInstanceUID); otherwise, or for a study the annotation file does not list, the T2 sagittal series'
middle slice (`dicom.read_study`, SPEC §8). Input: the training pipeline's own example (`pipeline.to_example`: stretch
to the training image size). Model: eval mode, flip TTA, decode, back to native pixels (`inference.Predictor` = the
training loop's evaluation step), in batches sharded over every device.

Output (`--output`, a list with one entry per predicted study, the official annotation schema):

    {"studyUid", "version": "ccfnet_jax <version>",
     "data": [{"seriesUid", "instanceUid",
               "annotation": [{"annotator": "ccfnet_jax",
                               "data": {"point": [{"coord": [x, y], "coord_float": [x, y], "prob": p,
                                                   "tag": {"identification": "L1", "vertebra": "v2"},
                                                   "zIndex": z}, ... 11 points]}}]}]}

- `coord`: integers, (column, row) in original pixels of the slice: the float point rounded to the nearest integer
  (annotation coordinates are positions on the same continuous axis, SPEC §5) and clipped into the image.
- `coord_float` (not in the official schema): the unrounded float coordinates, so that scoring our own predictions
  is exact (`ccfnet_jax.evaluate` uses them when present).
- `prob`: the predicted probability that the object is diseased (SPEC §5). `tag`: the label key by the kind of the
  object (`vertebra` for L1..L5, `disc` for the six discs) with `v2` (diseased: degeneration / bulge) when
  `prob >= DISEASE_THRESHOLD` (0.5) and `v1` (normal) otherwise. The binary rule treats every code but `v1` alone as
  diseased (SPEC §6), so `v2` stands for "diseased" here; the model does not tell bulge from protrusion.
- `zIndex`: the slice's 0-based position in its series sorted by ImagePositionPatient x descending.

Sidecar `<output stem>.errors.json` (always written): the study folders that could not be predicted, each with
folder, file, reason and kind (the run goes on without them), warnings (e.g. a study the annotation file does not
list), problems in the annotation file, and what was run (checkpoint, step, image size, threshold).

Overlays (`--overlays=DIR`): `DIR/<study folder>.png`, the slice with each point, its name and its probability
(`draw.draw_study`; with annotations, a ring in the colour of the true label).
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

from ccfnet_jax import __version__, inference, objects, parallel
from ccfnet_jax.data import annotations as annotations_lib
from ccfnet_jax.data import dicom, draw, errors, layout, pipeline
from ccfnet_jax.data.errors import StudyError
from ccfnet_jax.train import write_json

DISEASE_THRESHOLD = 0.5
"""A point is tagged diseased (`v2`) when its probability is >= this, else normal (`v1`)."""
NORMAL_TAG, DISEASED_TAG = "v1", "v2"
COORD_FLOAT_KEY = "coord_float"
PROB_KEY = "prob"
VERSION = f"ccfnet_jax {__version__}"
ANNOTATOR = "ccfnet_jax"
UNEXPECTED_ERROR = "unexpected_error"
"""Kind of a study that failed with an error the DICOM reader does not classify (reported, the run goes on)."""


@dataclasses.dataclass(frozen=True)
class StudyPrediction:
  """The prediction for one study folder.

  pred_xy: float32 `[11, 2]` (x, y) native px (unrounded); prob: float32 `[11]`; native_hw: (H, W) px.
  """
  folder: str
  study_uid: str
  series_uid: str
  instance_uid: str
  z_index: int
  native_hw: tuple[int, int]
  pred_xy: np.ndarray
  prob: np.ndarray


# ---------------------------------------------------------------------------------------------------------------
# Study folders and reading.
# ---------------------------------------------------------------------------------------------------------------


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
    record = inference.unlabelled_record(image.image, image.pixel_spacing_mm, image.study_uid, image.series_uid,
                                         image.instance_uid)
    example = pipeline.to_example(record, image_size)
    return _Loaded(folder, image, annotation, example, warning=warning)
  except StudyError as e:
    return _Loaded(folder, error=e)
  except Exception as e:  # pylint: disable=broad-except  (one bad study must not stop a run over thousands)
    return _Loaded(folder, error=StudyError(folder.name, str(folder), f"{type(e).__name__}: {e}", UNEXPECTED_ERROR))


# ---------------------------------------------------------------------------------------------------------------
# Output.
# ---------------------------------------------------------------------------------------------------------------


def rounded_coord(xy: np.ndarray, native_hw: tuple[int, int]) -> list[int]:
  """(x, y) float native px -> [x, y] integers: nearest integer, clipped to [0, W - 1] x [0, H - 1]."""
  height, width = native_hw
  x = int(np.clip(np.floor(float(xy[0]) + 0.5), 0, width - 1))
  y = int(np.clip(np.floor(float(xy[1]) + 0.5), 0, height - 1))
  return [x, y]


def disease_tag(prob: float) -> str:
  """'v2' (diseased) when `prob >= DISEASE_THRESHOLD`, else 'v1' (normal)."""
  return DISEASED_TAG if prob >= DISEASE_THRESHOLD else NORMAL_TAG


def prediction_entry(pred: StudyPrediction) -> dict[str, Any]:
  """One study in the official annotation schema, plus `prob` and `coord_float` per point (module docstring)."""
  points = []
  for k, name in enumerate(objects.NAMES):
    prob = float(pred.prob[k])
    points.append({
        "coord": rounded_coord(pred.pred_xy[k], pred.native_hw),
        COORD_FLOAT_KEY: [float(pred.pred_xy[k, 0]), float(pred.pred_xy[k, 1])],
        PROB_KEY: prob,
        "tag": {"identification": name, objects.label_key(name): disease_tag(prob)},
        "zIndex": int(pred.z_index),
    })
  return {"studyUid": pred.study_uid, "version": VERSION,
          "data": [{"seriesUid": pred.series_uid, "instanceUid": pred.instance_uid,
                    "annotation": [{"annotator": ANNOTATOR, "data": {"point": points}}]}]}


def sidecar_path(output: str | os.PathLike) -> str:
  """`preds.json` -> `preds.errors.json` (beside the output)."""
  output = os.fspath(output)
  stem = output[:-5] if output.lower().endswith(".json") else output
  return stem + ".errors.json"


def draw_overlay(loaded: _Loaded, pred: StudyPrediction, directory: str | os.PathLike) -> str:
  """Writes `directory/<folder name>.png`: the slice with the predicted points, names and probabilities."""
  assert loaded.image is not None
  labels = None if loaded.annotation is None else loaded.annotation.disease
  picture = draw.draw_study(loaded.image.image, pred.pred_xy, probs=pred.prob, labels=labels,
                              title=f"{loaded.folder.name} z={pred.z_index}")
  path = os.path.join(os.fspath(directory), f"{loaded.folder.name}.png")
  picture.save(path)
  return path


# ---------------------------------------------------------------------------------------------------------------
# The run.
# ---------------------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class PredictionRun:
  """What `predict_studies` returns: predictions in folder order, failed studies, warnings."""
  predictions: list[StudyPrediction]
  failed: errors.SkipReport
  warnings: list[str]
  annotation_errors: list[StudyError]
  num_folders: int

  def entries(self) -> list[dict[str, Any]]:
    return [prediction_entry(p) for p in self.predictions]


def predict_studies(predictor: inference.Predictor, studies_dir: str | os.PathLike, *,
                    annotations: str | os.PathLike | Sequence[str | os.PathLike] | None = None,
                    overlays_dir: str | os.PathLike | None = None, num_threads: int = 4,
                    progress: bool = True) -> PredictionRun:
  """Predicts every study folder under `studies_dir` (see the module docstring).

  Reading runs in `num_threads` threads one batch ahead of the model. Unreadable studies are collected in
  `PredictionRun.failed` with their reasons; the others are predicted.
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
  predictions: list[StudyPrediction] = []
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
        out = predictor(inference.stack_examples([g.example for g in good], size, predictor.image_size))
        for i, item in enumerate(good):
          image = item.image
          pred = StudyPrediction(folder=str(item.folder), study_uid=image.study_uid, series_uid=image.series_uid,
                                 instance_uid=image.instance_uid, z_index=int(image.z_index),
                                 native_hw=tuple(int(v) for v in image.native_hw), pred_xy=out["pred_xy"][i],
                                 prob=out["pred_prob"][i])
          predictions.append(pred)
          if overlays_dir is not None:
            draw_overlay(item, pred, overlays_dir)
      bar.update(len(loaded))
  return PredictionRun(predictions, failed, warnings_, annotation_errors, len(folders))


def write_outputs(run: PredictionRun, output: str | os.PathLike, info: Mapping[str, Any] | None = None
                  ) -> tuple[str, str]:
  """Writes the predictions file and its `.errors.json` sidecar; returns both paths."""
  output = os.fspath(output)
  write_json(output, run.entries(), indent=None)  # compact, as the official files
  sidecar = {
      "predictions": os.path.abspath(output),
      "num_study_folders": run.num_folders,
      "num_predicted": len(run.predictions),
      **run.failed.as_dict(),
      "warnings": run.warnings,
      "annotation_errors": [e.as_dict() for e in run.annotation_errors],
      "disease_threshold": DISEASE_THRESHOLD,
      **dict(info or {}),
  }
  path = sidecar_path(output)
  write_json(path, sidecar, indent=1)
  return output, path


def run_info(loaded: inference.LoadedModel, predictor: inference.Predictor) -> dict[str, Any]:
  """What was run, for the sidecar."""
  ref = loaded.checkpoint
  return {"checkpoint": ref.step_dir, "step": ref.step, "which": ref.which, "config": ref.config_path,
          "model": inference.describe_model(loaded.config), "image_size": loaded.image_size,
          "flip_tta": loaded.flip_tta, "batch_size": predictor.batch_size, "devices": jax.device_count()}


# ---------------------------------------------------------------------------------------------------------------
# Command.
# ---------------------------------------------------------------------------------------------------------------


def define_flags() -> None:
  """The command's flags (defined only when run as a program, so importing this module defines none)."""
  from absl import flags  # pylint: disable=g-import-not-at-top

  inference.define_checkpoint_flags()
  flags.DEFINE_string("studies", None, "Folder of study folders (official layout).", required=True)
  flags.DEFINE_string("output", None, "Predictions JSON to write.", required=True)
  flags.DEFINE_string("annotations", None, "Official annotation JSON: predict on the annotated slices.")
  flags.DEFINE_string("overlays", None, "Folder for overlay PNGs (one per study).")
  flags.DEFINE_integer("batch_size", None, "Global batch size (a multiple of the device count; default 8 or the "
                       "device count).")
  flags.DEFINE_integer("num_threads", 4, "Threads reading DICOM files.")
  flags.DEFINE_integer("cpu_devices", 0, "XLA devices a CPU host is split into, as in run.py (0: one per core that "
                       "divides the batch size; 1: JAX's single CPU device).")


def main(argv: Sequence[str]) -> None:
  from absl import app, flags  # pylint: disable=g-import-not-at-top

  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  FLAGS = flags.FLAGS  # pylint: disable=invalid-name
  parallel.configure_cpu_devices(FLAGS.cpu_devices, (FLAGS.batch_size or inference.DEFAULT_BATCH_SIZE,))
  loaded = inference.load_model_from_flags()
  predictor = inference.Predictor(loaded.model, image_size=loaded.image_size, flip_tta=loaded.flip_tta,
                                  batch_size=FLAGS.batch_size)
  print(f"model {inference.describe_model(loaded.config)} from {loaded.checkpoint.step_dir} "
        f"({loaded.checkpoint.which}, step {loaded.checkpoint.step}); {loaded.image_size} px, "
        f"batch {predictor.batch_size} on {jax.device_count()} device(s)", flush=True)
  if not os.path.isdir(FLAGS.studies):
    raise SystemExit(f"error: --studies={FLAGS.studies} is not a directory")
  run = predict_studies(predictor, FLAGS.studies, annotations=FLAGS.annotations, overlays_dir=FLAGS.overlays,
                        num_threads=FLAGS.num_threads)
  output, sidecar = write_outputs(run, FLAGS.output, run_info(loaded, predictor))
  print(f"predicted {len(run.predictions)} of {run.num_folders} studies -> {output}; "
        f"{len(run.failed.errors)} failed, {len(run.warnings)} warnings -> {sidecar}", flush=True)
  for error in run.failed.errors:
    print(f"  failed: {error.study}: {error.reason} [{error.kind}] ({error.file})", flush=True)


if __name__ == "__main__":
  from absl import app as _app  # pylint: disable=g-import-not-at-top
  define_flags()
  _app.run(main)
