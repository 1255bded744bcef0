"""TFDS builder `lumbar_spine`: one example per annotated study, splits `fold0`..`fold3`, array_record, no TensorFlow.

Configs:
  tianchi: the official Tianchi release from a manual dir holding `<name>_annotation.json` + `<name>/` pairs.
  phantom: synthetic studies from `ccfnet_jax.data.phantom.generate_study` (no download). `phantom_config(n, seed)`
    gives a config of another size; its name says so (`phantom_n8_s0`) so it never shadows the default build.

Bad studies are logged (study, file, reason), skipped, and tallied; the tally is stored in the dataset's
metadata (`builder.info.metadata["build_summary"]`, i.e. `metadata.json` beside the array_record files).
Folds follow `ccfnet_jax.data.folds` (docs/method.md#folds) over the studies built, so fold sizes differ by at most one.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Iterator
from typing import Any

import numpy as np
import tensorflow_datasets as tfds

from ccfnet_jax.data import annotations as annotations_lib
from ccfnet_jax.data import dicom, errors, folds, layout, phantom, records
from ccfnet_jax.data.errors import SkipReport, StudyError

logger = logging.getLogger(__name__)

NUM_FOLDS = 4
DEFAULT_PHANTOM_STUDIES = 200

_DESCRIPTION = """Sagittal lumbar-spine MRI, one example per study: the annotated T2 slice with its two neighbours
(3 channels, uint16, native size), pixel spacing, the 11 points (L1..L5, T12-L1..L5-S1) and their disease labels."""

_MANUAL = """Put the official Tianchi spinal-disease release in the manual dir, keeping its layout:
  <manual_dir>/lumbar_train150_annotation.json  and  <manual_dir>/lumbar_train150/studyN/imageK.dcm
  (likewise lumbar_train51, ...). Every `<name>_annotation.json` with a `<name>/` folder beside it is read."""


@dataclasses.dataclass(eq=False)
class LumbarSpineConfig(tfds.core.BuilderConfig):
  """`source` is 'tianchi' or 'phantom'; `num_studies` and `seed` apply to phantoms only."""
  source: str = "phantom"
  num_studies: int = DEFAULT_PHANTOM_STUDIES
  seed: int = 0


TIANCHI = LumbarSpineConfig(name="tianchi", source="tianchi", description="The official Tianchi DICOM release.")
PHANTOM = LumbarSpineConfig(name="phantom", source="phantom", num_studies=DEFAULT_PHANTOM_STUDIES, seed=0,
                            description=f"{DEFAULT_PHANTOM_STUDIES} synthetic phantom studies, seed 0.")


def phantom_config(num_studies: int = DEFAULT_PHANTOM_STUDIES, seed: int = 0) -> LumbarSpineConfig:
  """The phantom config with `num_studies` studies from `seed` (the registered one when both are defaults)."""
  if num_studies < 1:
    raise ValueError(f"num_studies must be >= 1, got {num_studies}")
  if num_studies == DEFAULT_PHANTOM_STUDIES and seed == 0:
    return PHANTOM
  return LumbarSpineConfig(name=f"phantom_n{num_studies}_s{seed}", source="phantom", num_studies=num_studies,
                           seed=seed, description=f"{num_studies} synthetic phantom studies, seed {seed}.")


def features() -> tfds.features.FeaturesDict:
  """TFDS features from `records.RECORD_FIELDS` (+ `fold`); strings read back as bytes."""
  spec = {}
  for name, (shape, dtype) in records.RECORD_FIELDS.items():
    encoding = "zlib" if None in shape else "none"
    spec[name] = tfds.features.Tensor(shape=shape, dtype=dtype, encoding=encoding)
  spec["fold"] = tfds.features.Tensor(shape=(), dtype=np.int32)
  return tfds.features.FeaturesDict(spec)


def to_example(record: dict[str, Any], fold: int) -> dict[str, Any]:
  """A validated record -> the TFDS example (string arrays as object arrays, + fold)."""
  example = dict(record)
  example["tags"] = np.asarray(list(record["tags"]), dtype=object)
  example["fold"] = np.int32(fold)
  return example


# --------------------------------------------------------------------------------------------------- tianchi
@dataclasses.dataclass
class _TianchiStudy:
  annotation: annotations_lib.StudyAnnotation
  folder: str
  headers: list[dicom.SliceHeader]
  problems: list[StudyError]


def collect_tianchi(manual_dir: str | os.PathLike, report: SkipReport) -> list[_TianchiStudy]:
  """Parses every annotation file, scans every study folder's headers and reads every annotated study once.

  Returns the studies that read cleanly (their pixels are read again when the examples are written);
  every problem goes into `report`.
  """
  pairs = layout.release_pairs(manual_dir)
  if not pairs:
    raise FileNotFoundError(f"no *{layout.ANNOTATION_SUFFIX} in manual dir {os.fspath(manual_dir)}.\n{_MANUAL}")
  all_annotations, root_of = [], {}
  headers_by_study: dict[str, list[dicom.SliceHeader]] = {}
  problems_by_study: dict[str, list[StudyError]] = {}
  folder_of_study: dict[str, str] = {}
  for json_path, root in pairs:
    try:
      good, bad = annotations_lib.load_annotations(json_path)
    except StudyError as e:  # the whole file is unusable: report it, build the other pairs
      report.add(e, logger)
      continue
    for e in bad:
      report.add(e, logger)
    all_annotations += good
    for a in good:
      root_of[a.study_uid] = os.fspath(root)
    if not root.is_dir():
      continue
    for folder in layout.study_folders(root):
      try:
        headers, problems = layout.scan_headers(folder)
      except StudyError as e:
        report.add(e, logger)
        continue
      for uid in sorted({h.study_uid for h in headers}):
        headers_by_study.setdefault(uid, []).extend(h for h in headers if h.study_uid == uid)
        # A bad file whose studyUid is unknown may belong to any study of the folder.
        problems_by_study.setdefault(uid, []).extend(p for p in problems if p.study_uid in ("", uid))
        folder_of_study.setdefault(uid, os.fspath(folder))
  # The same studyUid in two annotation files is a duplicate too.
  all_annotations, duplicates = annotations_lib.drop_duplicates(all_annotations)
  for e in duplicates:
    report.add(e, logger)

  kept = []
  for a in all_annotations:
    folder = folder_of_study.get(a.study_uid)
    name = f"{a.study_uid} ({folder or root_of[a.study_uid]})"
    try:
      if folder is None:
        raise StudyError(name, root_of[a.study_uid], "no study folder holds a file of this studyUid",
                         errors.MISSING_FOLDER)
      study = _TianchiStudy(a, folder, headers_by_study[a.study_uid], problems_by_study[a.study_uid])
      _read(study, name)
    except StudyError as e:
      report.add(e, logger)
      continue
    for e in study.problems:  # the study read, so none of its bad files mattered
      report.note(e.for_study(name), logger)
    kept.append(study)
  return kept


def _read(study: _TianchiStudy, name: str | None = None) -> dict[str, Any]:
  return records.read_annotated_study(study.folder, study.annotation, headers=study.headers,
                                      problems=study.problems, study=name)


# --------------------------------------------------------------------------------------------------- builder
class LumbarSpine(tfds.core.GeneratorBasedBuilder):
  """Lumbar-spine MRI studies with 11 points and disease labels; splits fold0..fold3."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "First release: tianchi and phantom configs, 4 SHA-256 folds."}
  BUILDER_CONFIGS = [TIANCHI, PHANTOM]
  DEFAULT_CONFIG_NAME = "phantom"
  MANUAL_DOWNLOAD_INSTRUCTIONS = _MANUAL
  DEFAULT_FILE_FORMAT = tfds.core.FileFormat.ARRAY_RECORD

  def __init__(self, *, file_format: str | tfds.core.FileFormat | None = None, **kwargs: Any):
    # TFDS falls back to tfrecord, whose writer needs TensorFlow; array_record (random access, no TensorFlow) is
    # this data set's format, also under plain `tfds.builder(...)` / `tfds.data_source(...)`.
    super().__init__(file_format=file_format or self.DEFAULT_FILE_FORMAT, **kwargs)

  def _log_download_bytes(self) -> None:
    # TFDS's own line speaks of downloads and "Unknown size"; ours says what happens.
    print(f"building lumbar_spine/{self.builder_config.name} into {self.data_dir} (first use; later runs reuse it)",
          flush=True)

  def _log_download_done(self) -> None:
    summary = self.info.metadata.get("build_summary", {})
    print(f"built lumbar_spine/{self.builder_config.name}: {summary.get('num_examples', '?')} studies, "
          f"{summary.get('num_skipped', 0)} skipped {summary.get('skipped_by_kind', {})}", flush=True)

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self, description=_DESCRIPTION, features=features(), supervised_keys=None,
        homepage="https://tianchi.aliyun.com/dataset/79463", metadata=tfds.core.MetadataDict())

  def _split_generators(self, dl_manager: tfds.download.DownloadManager):
    report = SkipReport()
    config: LumbarSpineConfig = self.builder_config  # type: ignore[assignment]
    if config.source == "tianchi":
      studies = collect_tianchi(dl_manager.manual_dir, report)
      uids = [s.annotation.study_uid for s in studies]
      items = dict(zip(uids, studies))
    elif config.source == "phantom":
      # Phantoms are rendered once, when written; a record that breaks the contract is a bug and raises there.
      items = {}
      for index in range(config.num_studies):
        uid = phantom.phantom_study(index, config.seed).study_uid  # parameters only, no pixels
        if uid in items:
          raise ValueError(f"phantom {index} repeats the studyUid of phantom {items[uid]}: {uid}")
        items[uid] = index
    else:
      raise ValueError(f"unknown source {config.source!r} in config {config.name!r}")

    if len(items) < NUM_FOLDS:
      raise ValueError(f"lumbar_spine/{config.name}: only {len(items)} usable studies, at least {NUM_FOLDS} are "
                       f"needed to fill the folds; skipped {report.counts()}: "
                       + "; ".join(str(e) for e in report.errors[:10]))
    fold_of = folds.assign_folds(items, NUM_FOLDS)
    summary = report.as_dict()
    summary["num_examples"] = len(items)
    summary["examples_per_fold"] = [sum(1 for f in fold_of.values() if f == k) for k in range(NUM_FOLDS)]
    self.info.metadata["build_summary"] = summary
    logger.info("lumbar_spine/%s: %d examples, %d skipped %s", config.name, len(items), summary["num_skipped"],
                summary["skipped_by_kind"])
    return {f"fold{k}": self._generate_examples([(uid, items[uid]) for uid in items if fold_of[uid] == k], k)
            for k in range(NUM_FOLDS)}

  def _generate_examples(self, items: list[tuple[str, Any]], fold: int) -> Iterator[tuple[str, dict[str, Any]]]:
    config: LumbarSpineConfig = self.builder_config  # type: ignore[assignment]
    for uid, item in items:
      if config.source == "tianchi":
        record = _read(item)
      else:
        record = records.validate_record(phantom.generate_study(item, config.seed), study=f"phantom {item}")
        if record["study_uid"] != uid:
          raise ValueError(f"phantom {item}: generate_study gave studyUid {record['study_uid']}, expected {uid}")
      yield uid, to_example(record, fold)
