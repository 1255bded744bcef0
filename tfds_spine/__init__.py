"""The `lumbar_spine` TFDS dataset (configs `tianchi`, `phantom`), helpers that build it on first use, and the
training / validation sources of one cross-validation fold (docs/method.md#folds).

Fold k's validation source is split `fold{k}` and its training source the sum of the other splits.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from typing import Any

import tensorflow_datasets as tfds

from tfds_spine.lumbar_spine import (DEFAULT_PHANTOM_STUDIES, NUM_FOLDS, PHANTOM, TIANCHI, LumbarSpine,
                                     LumbarSpineConfig, phantom_config)

__all__ = ["LumbarSpine", "LumbarSpineConfig", "PHANTOM", "TIANCHI", "NUM_FOLDS", "DEFAULT_PHANTOM_STUDIES", "DATASETS",
           "phantom_config", "get_builder", "prepare", "load_source", "build_summary", "fold_splits", "open_fold"]

DATASETS: tuple[str, ...] = ("phantom", "tianchi")
"""The names of the data sets (the lumbar_spine configs a user picks)."""


def get_builder(config_name: str, data_dir: str | os.PathLike, *, num_studies: int | None = None,
                seed: int = 0) -> LumbarSpine:
  """The builder for 'tianchi' or 'phantom' (`num_studies`/`seed` pick a phantom config of another size)."""
  if config_name not in DATASETS:
    raise ValueError(f"unknown lumbar_spine config {config_name!r}: expected one of {DATASETS}")
  if config_name == "phantom":
    config: Any = phantom_config(DEFAULT_PHANTOM_STUDIES if num_studies is None else num_studies, seed)
  else:
    if num_studies is not None:
      raise ValueError("num_studies applies to the phantom config only")
    config = TIANCHI
  return LumbarSpine(config=config, data_dir=os.fspath(data_dir))


def prepare(config_name: str, data_dir: str | os.PathLike, manual_dir: str | os.PathLike | None = None,
            **builder_kwargs) -> LumbarSpine:
  """Builds the dataset into `data_dir` unless it is already there; returns the builder."""
  builder = get_builder(config_name, data_dir, **builder_kwargs)
  download_config = tfds.download.DownloadConfig(manual_dir=os.fspath(manual_dir) if manual_dir else None)
  # TFDS's progress bars help at a terminal and are noise in logs (a process-wide TFDS setting).
  tfds.display_progress_bar(sys.stderr.isatty())
  builder.download_and_prepare(download_config=download_config)
  return builder


def load_source(config_name: str, split: str, data_dir: str | os.PathLike,
                manual_dir: str | os.PathLike | None = None, **builder_kwargs):
  """A random-access source (`len`, `[i]` -> dict of numpy arrays; strings as bytes) over e.g. 'fold0+fold1+fold2'.

  Builds the dataset on first use. `builder_kwargs`: `num_studies`, `seed` (phantom only).
  """
  return prepare(config_name, data_dir, manual_dir, **builder_kwargs).as_data_source(split=split)


def build_summary(builder: LumbarSpine) -> dict:
  """What the build did: num_examples, examples_per_fold, num_skipped, skipped_by_kind, skipped (study/file/reason)."""
  return dict(builder.info.metadata.get("build_summary", {}))


def fold_splits(fold: int | None, num_folds: int = NUM_FOLDS) -> tuple[str, str | None]:
  """(train split, val split) TFDS split strings, e.g. fold 1 of 4 -> ('fold0+fold2+fold3', 'fold1'); fold None ->
  (every split, None): training on every study, holding none out."""
  if fold is None:
    return "+".join(f"fold{k}" for k in range(num_folds)), None
  if num_folds < 2 or not 0 <= fold < num_folds:
    raise ValueError(f"fold must be in [0, num_folds) with num_folds >= 2, got fold={fold}, num_folds={num_folds}")
  return "+".join(f"fold{k}" for k in range(num_folds) if k != fold), f"fold{fold}"


def open_fold(name: str, data_dir: str | os.PathLike, manual_dir: str | os.PathLike | None = None,
              fold: int | None = 0, num_folds: int = NUM_FOLDS, **builder_kwargs: Any
              ) -> tuple[Sequence[dict], Sequence[dict] | None]:
  """(train_source, val_source) of `fold` for data set `name` ('phantom' or 'tianchi'), building it on first use;
  fold None: (every study, None).

  Sources are random-access (`len`, `[i]` -> record dict of numpy arrays, strings as bytes), ready for
  `pipeline.train_dataset` / `pipeline.eval_dataset`. `builder_kwargs` go to the builder (phantom: `num_studies`,
  `seed`).
  """
  if name not in DATASETS:
    raise ValueError(f"unknown dataset {name!r}: expected one of {DATASETS}")
  if num_folds != NUM_FOLDS:
    raise ValueError(f"lumbar_spine is built with {NUM_FOLDS} folds, got num_folds={num_folds}")
  if name == "tianchi" and manual_dir is None:
    raise ValueError("the tianchi dataset needs manual_dir (the folder holding <name>_annotation.json + <name>/)")
  train_split, val_split = fold_splits(fold, num_folds)
  builder = prepare(name, data_dir, manual_dir, **builder_kwargs)
  val_source = None if val_split is None else builder.as_data_source(split=val_split)
  return builder.as_data_source(split=train_split), val_source
