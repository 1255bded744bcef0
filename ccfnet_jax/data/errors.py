"""The one error type for a study that cannot be used, and the tally of skipped studies.

Reading DICOM folders and parsing annotations raise (or return) `StudyError`s that name the study, the file and the
reason; the dataset builder reports each one, skips the study and counts the skips by `kind`. A file the study does
not need (another series' structured report, a localizer, a damaged decoy) is noted, not fatal: `SkipReport.note`.
"""

from __future__ import annotations

import collections
import dataclasses
import logging


class StudyError(Exception):
  """A study that cannot be used.

  Attributes:
    study: the study's name (folder or StudyInstanceUID) as the user would look for it.
    file: the file (DICOM or annotation JSON) where the problem was found ('' when none applies).
    reason: what is wrong, in words.
    kind: a short category used to count skips, e.g. 'corrupt_dicom', 'no_sagittal_series'.
    study_uid, series_uid, instance_uid: what a bad DICOM file was, where its header tells ('' when unknown); a
      reader uses them to decide whether the file matters to the slice it needs.
  """

  def __init__(self, study: str, file: str, reason: str, kind: str, *, study_uid: str = "", series_uid: str = "",
               instance_uid: str = ""):
    super().__init__(f"study {study!r}: {reason} (file: {file or '-'}) [{kind}]")
    self.study = str(study)
    self.file = str(file)
    self.reason = reason
    self.kind = kind
    self.study_uid = study_uid
    self.series_uid = series_uid
    self.instance_uid = instance_uid

  def for_study(self, study: str) -> StudyError:
    """The same problem named for `study` (e.g. a folder's problem once its studyUid is known)."""
    return StudyError(study, self.file, self.reason, self.kind, study_uid=self.study_uid,
                      series_uid=self.series_uid, instance_uid=self.instance_uid)

  def as_dict(self) -> dict[str, str]:
    return {"study": self.study, "file": self.file, "reason": self.reason, "kind": self.kind}


# Kinds (one place for their spelling).
EMPTY_FOLDER = "empty_folder"
MISSING_FOLDER = "missing_folder"
CORRUPT_DICOM = "corrupt_dicom"
UNSUPPORTED_TRANSFER_SYNTAX = "unsupported_transfer_syntax"
NOT_AN_IMAGE = "not_an_image"
BAD_GEOMETRY = "bad_geometry"
NO_SAGITTAL = "no_sagittal_series"
MISSING_INSTANCE = "missing_instance"
SERIES_MISMATCH = "series_mismatch"
BAD_IMAGE = "bad_image"
POINTS_OUTSIDE = "points_outside_image"
UNKNOWN_IDENTIFICATION = "unknown_identification"
DUPLICATE_POINT = "duplicate_point"
DUPLICATE_STUDY = "duplicate_study"
BAD_ANNOTATION = "bad_annotation"
BAD_RECORD = "bad_record"


@dataclasses.dataclass
class SkipReport:
  """Every skipped study with its reason; `counts()` tallies them by kind."""

  errors: list[StudyError] = dataclasses.field(default_factory=list)
  ignored: list[StudyError] = dataclasses.field(default_factory=list)

  def add(self, error: StudyError, logger: logging.Logger | None = None) -> None:
    """A skipped study."""
    self.errors.append(error)
    (logger or logging.getLogger(__name__)).warning("skipping %s", error)

  def note(self, error: StudyError, logger: logging.Logger | None = None) -> None:
    """A file left out of a study that was kept."""
    self.ignored.append(error)
    (logger or logging.getLogger(__name__)).info("ignoring a file: %s", error)

  def counts(self) -> dict[str, int]:
    return dict(sorted(collections.Counter(e.kind for e in self.errors).items()))

  def as_dict(self) -> dict:
    return {"num_skipped": len(self.errors), "skipped_by_kind": self.counts(),
            "skipped": [e.as_dict() for e in self.errors], "num_ignored_files": len(self.ignored),
            "ignored_files": [e.as_dict() for e in self.ignored]}
