"""Opening the training and validation sources of one cross-validation fold, and the training fold's label counts.

The `lumbar_spine` TFDS dataset (engineer C's `tfds_spine`) has splits `fold0`..`fold{NUM_FOLDS-1}`; fold k's
validation source is split `fold{k}` and its training source the sum of the other splits. The dataset is built into
`data_dir` on first use (the `phantom` config needs no download; `tianchi` reads the official release from
`manual_dir`).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import numpy as np

from ccfnet_jax import objects

DATASETS: tuple[str, ...] = ("phantom", "tianchi")


def fold_splits(fold: int, num_folds: int) -> tuple[str, str]:
  """(train split, val split) TFDS split strings, e.g. fold 1 of 4 -> ('fold0+fold2+fold3', 'fold1')."""
  if num_folds < 2 or not 0 <= fold < num_folds:
    raise ValueError(f"fold must be in [0, num_folds) with num_folds >= 2, got fold={fold}, num_folds={num_folds}")
  return "+".join(f"fold{k}" for k in range(num_folds) if k != fold), f"fold{fold}"


def open_fold(name: str, data_dir: str | os.PathLike, manual_dir: str | os.PathLike | None = None, fold: int = 0,
              num_folds: int = 4, **builder_kwargs: Any) -> tuple[Sequence[dict], Sequence[dict]]:
  """(train_source, val_source) of `fold` for dataset `name` ('phantom' or 'tianchi'), building it on first use.

  Sources are random-access (`len`, `[i]` -> record dict of numpy arrays, strings as bytes), ready for
  `pipeline.train_dataset` / `pipeline.eval_dataset`. `builder_kwargs` go to the builder (phantom: `num_studies`,
  `seed`).
  """
  import tfds_spine  # pylint: disable=g-import-not-at-top  (TFDS is only needed when opening TFDS data)

  if name not in DATASETS:
    raise ValueError(f"unknown dataset {name!r}: expected one of {DATASETS}")
  if num_folds != tfds_spine.NUM_FOLDS:
    raise ValueError(f"lumbar_spine is built with {tfds_spine.NUM_FOLDS} folds, got num_folds={num_folds}")
  if name == "tianchi" and manual_dir is None:
    raise ValueError("the tianchi dataset needs manual_dir (the folder holding <name>_annotation.json + <name>/)")
  train_split, val_split = fold_splits(fold, num_folds)
  builder = tfds_spine.prepare(name, data_dir, manual_dir, **builder_kwargs)
  return builder.as_data_source(split=train_split), builder.as_data_source(split=val_split)


def label_counts(source: Sequence[dict]) -> dict[str, tuple[int, int]]:
  """Known disease labels of a source per group: {'vertebra': (n_neg, n_pos), 'disc': (n_neg, n_pos)}.

  Counts labels 0 and 1 (unknown -1 is ignored) over the objects of each group (`objects.VERTEBRA_INDICES`,
  `objects.DISC_INDICES`); feed them to `losses.class_balanced_pos_weight`. Reads only the `disease` field of each
  record (a TFDS source still reads the stored example, but nothing is resized).
  """
  if len(source) == 0:
    raise ValueError("label_counts: the source is empty")
  disease = np.stack([np.asarray(source[i]["disease"]) for i in range(len(source))])
  if disease.shape[1:] != (objects.NUM_OBJECTS,):
    raise ValueError(f"label_counts: 'disease' must be [{objects.NUM_OBJECTS}] per record, got {disease.shape[1:]}")
  counts = {}
  for group, indices in (("vertebra", objects.VERTEBRA_INDICES), ("disc", objects.DISC_INDICES)):
    labels = disease[:, list(indices)]
    counts[group] = (int((labels == 0).sum()), int((labels == 1).sum()))
  return counts
