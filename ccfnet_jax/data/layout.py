"""The official release on disk: which files pair up, the one order of study folders, and the header scan.

Layout (docs/method.md#data): `<manual_dir>/<name>_annotation.json` beside a `<manual_dir>/<name>/` folder of study
folders `studyN/`, each holding every series of one study mixed flat as `*.dcm` files whose names carry no meaning.

Paths are listed with `os.listdir` / `pathlib`, never `glob`, so a folder named e.g. `release[v1]` works.
"""

from __future__ import annotations

import os
import pathlib
import re
from typing import Any

from ccfnet_jax.data import dicom, errors
from ccfnet_jax.data.errors import StudyError

ANNOTATION_SUFFIX = "_annotation.json"
DICOM_SUFFIX = ".dcm"


def release_pairs(manual_dir: str | os.PathLike) -> list[tuple[pathlib.Path, pathlib.Path]]:
  """(`<name>_annotation.json`, `<name>/`) pairs in `manual_dir`, sorted by name.

  A JSON without its folder is included (its studies are then reported missing). Raises FileNotFoundError when
  `manual_dir` is not a folder.
  """
  manual = pathlib.Path(manual_dir)
  if not manual.is_dir():
    raise FileNotFoundError(f"manual dir {os.fspath(manual)}: no such directory")
  names = sorted(n for n in os.listdir(manual)
                 if n.endswith(ANNOTATION_SUFFIX) and len(n) > len(ANNOTATION_SUFFIX) and (manual / n).is_file())
  return [(manual / n, manual / n[: -len(ANNOTATION_SUFFIX)]) for n in names]


def _natural_key(name: str) -> tuple[list[Any], str]:
  # re.split with a group alternates text and digit runs, so the parts of two keys always compare like with like.
  parts = [int(p) if i % 2 else p for i, p in enumerate(re.split(r"(\d+)", name))]
  return parts, name


def _is_dicom_name(path: pathlib.Path) -> bool:
  # Hidden files (e.g. `._image1.dcm` left by macOS copies) are never DICOM.
  return path.suffix.lower() == DICOM_SUFFIX and not path.name.startswith(".")


def study_folders(root: str | os.PathLike) -> list[pathlib.Path]:
  """The study folders under `root`: its sub-folders in natural order (study2 before study10), hidden ones skipped;
  or `[root]` itself when it directly holds `.dcm` files. Raises FileNotFoundError when `root` is not a folder."""
  root = pathlib.Path(root)
  if not root.is_dir():
    raise FileNotFoundError(f"{os.fspath(root)}: no such directory")
  entries = list(root.iterdir())
  if any(_is_dicom_name(p) and p.is_file() for p in entries):
    return [root]
  folders = [p for p in entries if p.is_dir() and not p.name.startswith(".")]
  return sorted(folders, key=lambda p: _natural_key(p.name))


def dicom_files(folder: str | os.PathLike) -> list[str]:
  """The `.dcm` files (any case, not hidden) directly inside `folder`, sorted by name (the order carries no
  meaning)."""
  folder = pathlib.Path(folder)
  return sorted(str(p) for p in folder.iterdir() if _is_dicom_name(p) and p.is_file())


def scan_headers(folder: str | os.PathLike, study: str | None = None
                 ) -> tuple[list[dicom.SliceHeader], list[StudyError]]:
  """Reads the header (no pixels) of every `.dcm` file of one study folder.

  Returns:
    (headers of the files that read, one StudyError per file that did not), both in file-name order; the headers
    are never empty.
  Raises:
    StudyError: the folder is missing (missing_folder), holds no `.dcm` file (empty_folder), or no file of it reads
      (the first file's problem).
  """
  study = study or os.fspath(folder)
  if not os.path.isdir(folder):
    raise StudyError(study, os.fspath(folder), "study folder does not exist", errors.MISSING_FOLDER)
  files = dicom_files(folder)
  if not files:
    raise StudyError(study, os.fspath(folder), "study folder holds no .dcm file", errors.EMPTY_FOLDER)
  headers, problems = [], []
  for path in files:
    try:
      headers.append(dicom.read_header(path, study))
    except StudyError as e:
      problems.append(e)
  if not headers:
    raise problems[0]
  return headers, problems
