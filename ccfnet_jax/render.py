"""Draws a grid of studies with their 11 points and labels (`data.draw`), to check a data set by eye.

  python -m ccfnet_jax.render --dataset=phantom --num_pictures=16 --output=grid.png
  python -m ccfnet_jax.render --dataset=tianchi --manual_dir=DIR --output=real.png
  python -m ccfnet_jax.render --dataset=phantom --data_dir=tfds_data --output=grid.png   (a built TFDS data set)
"""

from __future__ import annotations

import os
from collections.abc import Sequence

from absl import app, flags
from PIL import Image

import tfds_spine
from ccfnet_jax import cli
from ccfnet_jax.data import annotations, draw, layout, phantom, records
from ccfnet_jax.data.errors import StudyError

FLAGS = flags.FLAGS

# Old spellings, refused with the new name.
_RENAMED = {"out": "output", "source": "dataset", "n": "num_pictures"}


def define_flags() -> None:
  flags.DEFINE_enum("dataset", "phantom", list(tfds_spine.DATASETS), "Which data set to draw.")
  flags.DEFINE_string("manual_dir", None, "Folder with <name>_annotation.json + <name>/ (dataset tianchi).")
  flags.DEFINE_string("data_dir", None, "A built lumbar_spine TFDS data dir: draw its examples instead.")
  flags.DEFINE_integer("num_pictures", 16, "Number of studies to draw.")
  flags.DEFINE_integer("phantom_studies", tfds_spine.DEFAULT_PHANTOM_STUDIES, "Size of the phantom set.")
  flags.DEFINE_integer("seed", 0, "Phantom set seed.")
  flags.DEFINE_integer("start", 0, "First phantom index / study folder / example.")
  flags.DEFINE_integer("cols", 4, "Pictures per row.")
  flags.DEFINE_integer("size", 320, "Longest side of each picture (px).")
  flags.DEFINE_string("output", "grid.png", "Output PNG.")
  cli.define_renamed_flags(_RENAMED)


def _title(name: str, record: dict) -> str:
  h, w = record["image"].shape[:2]
  return f"{name} {h}x{w} {record['pixel_spacing_mm'][0]:.2f}mm"


def phantom_pictures(count: int, num_studies: int, seed: int, start: int, size: int) -> list[Image.Image]:
  pictures = []
  for index in range(start, min(start + count, num_studies)):
    record = phantom.generate_study(index, seed)
    pictures.append(draw.draw_record(record, title=_title(f"phantom {index}", record), size=size))
  return pictures


def tianchi_pictures(manual_dir: str, count: int, start: int, size: int) -> list[Image.Image]:
  """Reads annotated studies straight from the official layout, in the one study-folder order."""
  pairs = layout.release_pairs(manual_dir)
  if not pairs:
    raise app.UsageError(f"no *{layout.ANNOTATION_SUFFIX} in {manual_dir}")
  pictures = []
  for json_path, root in pairs:
    by_uid = {a.study_uid: a for a in annotations.load_annotations(json_path)[0]}
    for folder in (layout.study_folders(root) if root.is_dir() else [])[start:]:
      if len(pictures) >= count:
        return pictures
      try:
        headers, problems = layout.scan_headers(folder, folder.name)
        uids = sorted({h.study_uid for h in headers} & by_uid.keys())
        if not uids:
          continue
        record = records.read_annotated_study(folder, by_uid[uids[0]], headers=headers, problems=problems,
                                              study=folder.name)
      except StudyError as e:
        print(f"skipping {e}")
        continue
      pictures.append(draw.draw_record(record, title=_title(folder.name, record), size=size))
  return pictures


def tfds_pictures(dataset: str, data_dir: str, manual_dir: str | None, count: int, start: int, size: int,
                  **builder_kwargs) -> list[Image.Image]:
  split = "+".join(f"fold{k}" for k in range(tfds_spine.NUM_FOLDS))
  source = tfds_spine.load_source(dataset, split, data_dir, manual_dir, **builder_kwargs)
  pictures = []
  for i in range(start, min(start + count, len(source))):
    record = source[i]
    uid = record["study_uid"]
    uid = uid.decode() if isinstance(uid, bytes) else str(uid)
    pictures.append(draw.draw_record(record, title=f"{dataset} ...{uid[-12:]}", size=size))
  return pictures


def main(argv: Sequence[str]) -> None:
  del argv
  if FLAGS.dataset == "tianchi" and not FLAGS.manual_dir and not FLAGS.data_dir:
    raise app.UsageError("--dataset=tianchi needs --manual_dir (the folder holding lumbar_train150_annotation.json)")
  if FLAGS.data_dir:
    kwargs = {"num_studies": FLAGS.phantom_studies, "seed": FLAGS.seed} if FLAGS.dataset == "phantom" else {}
    pictures = tfds_pictures(FLAGS.dataset, FLAGS.data_dir, FLAGS.manual_dir, FLAGS.num_pictures, FLAGS.start,
                             FLAGS.size, **kwargs)
  elif FLAGS.dataset == "phantom":
    pictures = phantom_pictures(FLAGS.num_pictures, FLAGS.phantom_studies, FLAGS.seed, FLAGS.start, FLAGS.size)
  else:
    pictures = tianchi_pictures(os.path.expanduser(FLAGS.manual_dir), FLAGS.num_pictures, FLAGS.start, FLAGS.size)
  if not pictures:
    raise app.UsageError("no study could be drawn")
  draw.grid(pictures, FLAGS.cols).save(FLAGS.output)
  print(f"wrote {len(pictures)} studies to {FLAGS.output}")


if __name__ == "__main__":
  cli.run(main, define_flags)
