"""Builds `lumbar_spine/<dataset>` into a data dir and prints what was built and skipped.

  python -m tfds_spine.build --dataset=phantom --data_dir=~/tensorflow_datasets [--phantom_studies=200]
  python -m tfds_spine.build --dataset=tianchi --data_dir=DIR --manual_dir=DIR
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Sequence

from absl import app, flags

from ccfnet_jax import cli

import tfds_spine

FLAGS = flags.FLAGS

# Old spellings, refused with the new name (`--config` elsewhere means a config file).
_RENAMED = {"config": "dataset", "num_studies": "phantom_studies"}


def define_flags() -> None:
  flags.DEFINE_enum("dataset", "phantom", list(tfds_spine.DATASETS), "Which lumbar_spine data set to build.")
  flags.DEFINE_string("data_dir", None, "TFDS data dir to build into.", required=True)
  flags.DEFINE_string("manual_dir", None, "Folder with <name>_annotation.json + <name>/ (dataset tianchi).")
  flags.DEFINE_integer("phantom_studies", None, f"Number of phantom studies (default "
                       f"{tfds_spine.DEFAULT_PHANTOM_STUDIES}).")
  flags.DEFINE_integer("seed", 0, "Phantom seed.")
  cli.define_renamed_flags(_RENAMED)


def main(argv: Sequence[str]) -> None:
  del argv
  logging.getLogger().setLevel(logging.INFO)
  if FLAGS.dataset == "phantom":
    kwargs = {"num_studies": FLAGS.phantom_studies, "seed": FLAGS.seed}
  elif FLAGS.phantom_studies is not None:
    raise app.UsageError("--phantom_studies applies to --dataset=phantom only")
  else:
    kwargs = {}
  manual_dir = os.path.expanduser(FLAGS.manual_dir) if FLAGS.manual_dir else None
  start = time.perf_counter()
  builder = tfds_spine.prepare(FLAGS.dataset, os.path.expanduser(FLAGS.data_dir), manual_dir, **kwargs)
  seconds = time.perf_counter() - start
  summary = tfds_spine.build_summary(builder)
  print(f"{builder.info.full_name} in {builder.data_dir} ({seconds:.1f} s)")
  print(json.dumps({k: v for k, v in summary.items() if k not in ("skipped", "ignored_files")}, indent=1))
  for skipped in summary.get("skipped", []):
    print(f"skipped {skipped['study']}: {skipped['reason']} (file {skipped['file']}) [{skipped['kind']}]")


if __name__ == "__main__":
  cli.run(main, define_flags)
