"""A training run's directory: the names of what it holds, and writes that never leave a half-written file.

    <workdir>/config.json                 the config the run was started with (kept; see `ccfnet_jax.config`)
    <workdir>/config_changes.jsonl        launches that were allowed to change it, one JSON object each
    <workdir>/results.json                every fold's best / last metrics; mean and std when all folds ran
    <workdir>/fold_K/results.json         one fold's best / last metrics
    <workdir>/fold_K/checkpoints/<step>/  Orbax checkpoints (`ccfnet_jax.checkpoint`)
    <workdir>/fold_K/metrics.jsonl        train and eval scalars, one JSON object per line
    <workdir>/fold_K/tensorboard/         the same as TensorBoard event files

Writes go to a fresh temporary file in the target's own folder, then `os.replace` it onto the target: a reader sees
the old file or the new one, and a symlink planted at the target (or at a predictable temporary name) in a shared
folder is replaced, never followed.
"""

from __future__ import annotations

import json
import os
import pathlib
import re
import tempfile
from typing import Any

CONFIG_FILE = "config.json"
CONFIG_CHANGES_FILE = "config_changes.jsonl"
RESULTS_FILE = "results.json"
CHECKPOINTS_DIR = "checkpoints"
METRICS_FILE = "metrics.jsonl"
TENSORBOARD_DIR = "tensorboard"
FINAL_FOLD = "none"
"""`config.fold` of a run that trains on every study and holds none out (directory `fold_none`)."""

_FOLD_DIR = re.compile(r"fold_(\d+|none)")


class RunDirError(ValueError):
  """A file of a run directory cannot be read or written; the message names it."""


def fold_name(fold: int | str) -> str:
  """`fold_3` for fold 3, `fold_none` for the run on every study."""
  return f"fold_{fold}"


def fold_dir(workdir: str | os.PathLike, fold: int | str) -> str:
  return os.path.join(os.fspath(workdir), fold_name(fold))


def checkpoints_dir(workdir: str | os.PathLike, fold: int | str) -> str:
  return os.path.join(fold_dir(workdir, fold), CHECKPOINTS_DIR)


def parse_fold_dir(name: str) -> int | str | None:
  """`fold_3` -> 3, `fold_none` -> 'none', anything else -> None."""
  match = _FOLD_DIR.fullmatch(name)
  if not match:
    return None
  return FINAL_FOLD if match.group(1) == FINAL_FOLD else int(match.group(1))


def trained_folds(workdir: str | os.PathLike) -> dict[int | str, pathlib.Path]:
  """The fold directories of `workdir` that hold a checkpoints folder, numbered folds first, in order."""
  found: dict[int | str, pathlib.Path] = {}
  root = pathlib.Path(workdir)
  for child in root.iterdir() if root.is_dir() else ():
    fold = parse_fold_dir(child.name)
    if fold is not None and (child / CHECKPOINTS_DIR).is_dir():
      found[fold] = child
  return dict(sorted(found.items(), key=lambda item: (isinstance(item[0], str), str(item[0]).zfill(6))))


def write_bytes(path: str | os.PathLike, data: bytes) -> None:
  """Replaces `path` with `data` atomically (creating its folder)."""
  path = os.fspath(path)
  folder = os.path.dirname(os.path.abspath(path))
  try:
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=folder)
  except OSError as e:
    raise RunDirError(f"cannot write {path}: {e.strerror or e}") from e
  try:
    with os.fdopen(fd, "wb") as f:
      f.write(data)
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)
  except OSError as e:
    if os.path.lexists(tmp):
      os.unlink(tmp)
    raise RunDirError(f"cannot write {path}: {e.strerror or e}") from e


def write_text(path: str | os.PathLike, text: str) -> None:
  """Replaces `path` with `text` (UTF-8) atomically."""
  write_bytes(path, text.encode("utf-8"))


def check_writable(path: str | os.PathLike) -> None:
  """Raises RunDirError unless a file could be written at `path` (its folder exists or can be made, and takes a
  new file): for commands that would otherwise compute everything and then fail to write it."""
  path = os.fspath(path)
  if os.path.isdir(path):
    raise RunDirError(f"cannot write {path}: it is a directory")
  write_bytes(os.path.join(os.path.dirname(os.path.abspath(path)), f".{os.path.basename(path)}.probe"), b"")
  os.unlink(os.path.join(os.path.dirname(os.path.abspath(path)), f".{os.path.basename(path)}.probe"))


def write_json(path: str | os.PathLike, value: Any, indent: int | None = 2) -> None:
  """Replaces `path` with `value` as JSON atomically (see the module docstring)."""
  write_text(path, json.dumps(value, indent=indent))


def read_json(path: str | os.PathLike) -> Any:
  """The JSON value in `path`. Raises RunDirError naming the file and what is wrong."""
  path = os.fspath(path)
  try:
    with open(path, encoding="utf-8") as f:
      return json.load(f)
  except FileNotFoundError:
    raise RunDirError(f"{path}: no such file") from None
  except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
    raise RunDirError(f"cannot read {path}: {e}") from e


def open_append(path: str | os.PathLike):
  """`path` opened for appending text, refusing to follow a symlink planted there."""
  path = os.fspath(path)
  flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0)
  try:
    fd = os.open(path, flags, 0o644)
  except OSError as e:
    raise RunDirError(f"cannot append to {path}: {e.strerror or e}"
                      + (" (it is a symlink)" if os.path.islink(path) else "")) from e
  return os.fdopen(fd, "a", encoding="utf-8")


def append_json_line(path: str | os.PathLike, value: Any) -> None:
  with open_append(path) as f:
    f.write(json.dumps(value) + "\n")
