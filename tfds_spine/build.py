"""Builds `lumbar_spine/<config>` into a data dir.

  python -m tfds_spine.build --config=phantom --data_dir=~/tensorflow_datasets [--num_studies=200]
  python -m tfds_spine.build --config=tianchi --data_dir=DIR --manual_dir=../shared/data/tianchi
"""

from __future__ import annotations

import json
import logging
import time

from absl import app, flags

import tfds_spine

_CONFIG = flags.DEFINE_enum("config", "phantom", ["phantom", "tianchi"], "Which lumbar_spine config to build.")
_DATA_DIR = flags.DEFINE_string("data_dir", None, "TFDS data dir to build into.", required=True)
_MANUAL_DIR = flags.DEFINE_string("manual_dir", None, "Folder with <name>_annotation.json + <name>/ (tianchi).")
_NUM_STUDIES = flags.DEFINE_integer("num_studies", None, "Number of phantom studies (default 200).")
_SEED = flags.DEFINE_integer("seed", 0, "Phantom seed.")


def main(argv: list[str]) -> None:
  del argv
  logging.getLogger().setLevel(logging.INFO)
  kwargs = {"num_studies": _NUM_STUDIES.value, "seed": _SEED.value} if _CONFIG.value == "phantom" else {}
  start = time.perf_counter()
  builder = tfds_spine.prepare(_CONFIG.value, _DATA_DIR.value, _MANUAL_DIR.value, **kwargs)
  seconds = time.perf_counter() - start
  summary = tfds_spine.build_summary(builder)
  print(f"{builder.info.full_name} in {builder.data_dir} ({seconds:.1f} s)")
  print(json.dumps({k: v for k, v in summary.items() if k != "skipped"}, indent=1))
  for skipped in summary.get("skipped", []):
    print(f"skipped {skipped['study']}: {skipped['reason']} (file {skipped['file']}) [{skipped['kind']}]")


if __name__ == "__main__":
  app.run(main)
