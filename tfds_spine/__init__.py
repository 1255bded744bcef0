"""The `lumbar_spine` TFDS dataset (configs `tianchi`, `phantom`) and a helper that builds it on first use."""

from __future__ import annotations

import os
from typing import Any

import tensorflow_datasets as tfds

from tfds_spine.lumbar_spine import (DEFAULT_PHANTOM_STUDIES, NUM_FOLDS, PHANTOM, TIANCHI, LumbarSpine,
                                     LumbarSpineConfig, phantom_config)

__all__ = ["LumbarSpine", "LumbarSpineConfig", "PHANTOM", "TIANCHI", "NUM_FOLDS", "DEFAULT_PHANTOM_STUDIES",
           "phantom_config", "get_builder", "prepare", "load_source", "build_summary"]


def get_builder(config_name: str, data_dir: str | os.PathLike, *, num_studies: int | None = None,
                seed: int = 0) -> LumbarSpine:
  """The builder for 'tianchi' or 'phantom' (`num_studies`/`seed` pick a phantom config of another size)."""
  if config_name == "phantom":
    config: Any = phantom_config(DEFAULT_PHANTOM_STUDIES if num_studies is None else num_studies, seed)
  elif config_name == "tianchi":
    if num_studies is not None:
      raise ValueError("num_studies applies to the phantom config only")
    config = TIANCHI
  else:
    raise ValueError(f"unknown lumbar_spine config {config_name!r}: expected 'tianchi' or 'phantom'")
  return LumbarSpine(config=config, data_dir=os.fspath(data_dir), file_format="array_record")


def prepare(config_name: str, data_dir: str | os.PathLike, manual_dir: str | os.PathLike | None = None,
            **builder_kwargs) -> LumbarSpine:
  """Builds the dataset into `data_dir` unless it is already there; returns the builder."""
  builder = get_builder(config_name, data_dir, **builder_kwargs)
  download_config = tfds.download.DownloadConfig(manual_dir=os.fspath(manual_dir) if manual_dir else None)
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
