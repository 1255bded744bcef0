"""Pictures of studies: the image with its 11 points, names and labels (or predicted probabilities) drawn (pillow).

`draw_study` draws one study (used for data checks here and for prediction overlays by the inference commands);
`grid` tiles pictures. The command renders a grid of examples:

  python -m ccfnet_jax.data.render --source=phantom --n=16 --out=grid.png
  python -m ccfnet_jax.data.render --source=tianchi --manual_dir=../shared/data/tianchi --n=16 --out=real.png
  python -m ccfnet_jax.data.render --source=phantom --data_dir=tfds_data --n=16 --out=grid.png   (built TFDS data)

Colours: green normal (label 0), red diseased (label 1), grey unknown (-1); with probabilities, the fill goes from green
(0) to red (1) and a ring in the label's colour shows the ground truth when labels are given too.
"""

from __future__ import annotations

import glob
import os
from collections.abc import Sequence

import numpy as np
from absl import app, flags
from PIL import Image, ImageDraw, ImageFont

from ccfnet_jax import objects

NORMAL_RGB = (40, 210, 60)
DISEASED_RGB = (235, 40, 40)
UNKNOWN_RGB = (150, 150, 150)
UNLABELLED_RGB = (250, 210, 40)


def to_grey8(image: np.ndarray) -> np.ndarray:
  """`[H, W]` or `[H, W, C]` image (any numeric dtype) -> uint8 `[H, W]`, min-max scaled.

  For a 3-slice stack `[H, W, 3]` the middle channel (the annotated slice) is shown.
  """
  image = np.asarray(image)
  if image.ndim == 3:
    image = image[..., image.shape[-1] // 2]
  if image.ndim != 2:
    raise ValueError(f"draw_study: image must be [H, W] or [H, W, C], got shape {image.shape}")
  image = image.astype(np.float64)
  low, high = float(image.min()), float(image.max())
  if high <= low:
    return np.zeros(image.shape, np.uint8)
  return np.rint((image - low) * (255.0 / (high - low))).astype(np.uint8)


def _font(size: int) -> ImageFont.ImageFont:
  try:
    return ImageFont.load_default(size=size)
  except TypeError:  # pillow built without FreeType: fixed-size bitmap font
    return ImageFont.load_default()


def _mix(a: tuple[int, int, int], b: tuple[int, int, int], t: float) -> tuple[int, int, int]:
  t = min(max(float(t), 0.0), 1.0)
  return tuple(int(round(x + (y - x) * t)) for x, y in zip(a, b))


def _label_rgb(label: int) -> tuple[int, int, int]:
  return {0: NORMAL_RGB, 1: DISEASED_RGB}.get(int(label), UNKNOWN_RGB)


def draw_study(image: np.ndarray, points_xy: np.ndarray, *, valid: np.ndarray | None = None,
               labels: np.ndarray | None = None, probs: np.ndarray | None = None,
               names: Sequence[str] = objects.NAMES, title: str | None = None, size: int | None = None
               ) -> Image.Image:
  """Draws the points of one study on its image.

  Args:
    image: `[H, W]` or `[H, W, C]` (uint16, uint8 or float; a 3-slice stack shows its middle slice).
    points_xy: `[N, 2]` (x, y) in pixels of `image`.
    valid: `[N]` bool; invalid points are not drawn (default: all valid).
    labels: `[N]` int disease labels (1 diseased, 0 normal, -1 unknown), shown as colour (unknown also as 'name?'),
      or as a ring around the point when `probs` are given too.
    probs: `[N]` float predicted probability of disease, shown as colour (green 0 .. red 1) and as text.
    names: `[N]` object names written beside the points (default the 11 objects).
    title: text at the top left.
    size: longest side of the output in px (the image is resized, points scaled); default the native size.

  Returns:
    RGB `PIL.Image` of size (W, H) (or scaled so that max(W, H) == size).
  """
  grey = to_grey8(image)
  points = np.asarray(points_xy, np.float64)
  n = len(points)
  if points.shape != (n, 2):
    raise ValueError(f"draw_study: points_xy must be [N, 2], got shape {points.shape}")
  valid = np.ones(n, bool) if valid is None else np.asarray(valid, bool)
  for what, value in (("valid", valid), ("labels", labels), ("probs", probs), ("names", names)):
    if value is not None and len(value) != n:
      raise ValueError(f"draw_study: {what} has {len(value)} entries for {n} points")
  picture = Image.fromarray(grey).convert("RGB")
  if size is not None:
    scale = size / max(picture.size)
    picture = picture.resize((max(1, round(picture.width * scale)), max(1, round(picture.height * scale))),
                             Image.Resampling.BILINEAR)
    points = points * np.array([picture.width / grey.shape[1], picture.height / grey.shape[0]])
  draw = ImageDraw.Draw(picture)
  longest = max(picture.size)
  radius = max(2.5, longest / 110)
  font = _font(max(10, round(longest / 30)))
  for i in range(n):
    if not valid[i]:
      continue
    x, y = float(points[i, 0]), float(points[i, 1])
    if probs is not None:
      fill = _mix(NORMAL_RGB, DISEASED_RGB, float(probs[i]))
      text = f"{names[i]} {float(probs[i]):.2f}"
    elif labels is not None:
      fill = _label_rgb(labels[i])
      text = f"{names[i]}?" if int(labels[i]) < 0 else str(names[i])
    else:
      fill, text = UNLABELLED_RGB, str(names[i])
    if probs is not None and labels is not None:
      ring = radius + max(2.0, radius / 2)
      draw.ellipse([x - ring, y - ring, x + ring, y + ring], outline=_label_rgb(labels[i]), width=2)
    draw.ellipse([x - radius, y - radius, x + radius, y + radius], fill=fill, outline=(0, 0, 0))
    # Vertebrae are labelled on the left (anterior), discs on the right, so the names do not overlap.
    is_disc = objects.is_disc_name(str(names[i]))
    anchor = "lm" if is_disc else "rm"
    tx = x + 2 * radius if is_disc else x - 2 * radius
    draw.text((tx, y), text, fill=fill, font=font, anchor=anchor, stroke_width=1, stroke_fill=(0, 0, 0))
  if title:
    draw.text((4, 3), title, fill=(255, 255, 255), font=font, stroke_width=1, stroke_fill=(0, 0, 0))
  return picture


def grid(images: Sequence[Image.Image], cols: int, *, pad: int = 4, background: tuple[int, int, int] = (0, 0, 0)
         ) -> Image.Image:
  """Tiles pictures row by row, `cols` per row, each centred in a cell of the largest width and height."""
  if not images:
    raise ValueError("grid: no images")
  if cols < 1:
    raise ValueError(f"grid: cols must be >= 1, got {cols}")
  cell_w = max(im.width for im in images)
  cell_h = max(im.height for im in images)
  rows = -(-len(images) // cols)
  cols = min(cols, len(images))
  sheet = Image.new("RGB", (cols * cell_w + (cols + 1) * pad, rows * cell_h + (rows + 1) * pad), background)
  for k, im in enumerate(images):
    r, c = divmod(k, cols)
    x = pad + c * (cell_w + pad) + (cell_w - im.width) // 2
    y = pad + r * (cell_h + pad) + (cell_h - im.height) // 2
    sheet.paste(im.convert("RGB"), (x, y))
  return sheet


def draw_record(record: dict, *, title: str | None = None, size: int | None = None) -> Image.Image:
  """`draw_study` of a data record (`image`, `points_xy`, `point_valid`, `disease`)."""
  return draw_study(record["image"], record["points_xy"], valid=record["point_valid"], labels=record["disease"],
                    title=title, size=size)


# ------------------------------------------------------------------------------------------------------------------
# Command
# ------------------------------------------------------------------------------------------------------------------


def _phantom_pictures(n: int, seed: int, start: int, size: int) -> list[Image.Image]:
  from ccfnet_jax.data import phantom  # pylint: disable=g-import-not-at-top
  pictures = []
  for index in range(start, start + n):
    record = phantom.generate_study(index, seed)
    h, w = record["image"].shape[:2]
    pictures.append(draw_record(record, title=f"phantom {index} {h}x{w} {record['pixel_spacing_mm'][0]:.2f}mm",
                                size=size))
  return pictures


def _tianchi_pictures(manual_dir: str, n: int, start: int, size: int) -> list[Image.Image]:
  """Reads annotated studies straight from the official layout (`<name>_annotation.json` + `<name>/studyN/`)."""
  from ccfnet_jax.data import annotations, layout, records  # pylint: disable=g-import-not-at-top
  from ccfnet_jax.data.errors import StudyError  # pylint: disable=g-import-not-at-top
  pictures = []
  json_paths = sorted(glob.glob(os.path.join(manual_dir, "*_annotation.json")))
  if not json_paths:
    raise FileNotFoundError(f"no *_annotation.json in {manual_dir}")
  for json_path in json_paths:
    by_uid = {a.study_uid: a for a in annotations.load_annotations(json_path)[0]}
    root = json_path[: -len("_annotation.json")]
    folders = sorted(glob.glob(os.path.join(root, "study*")), key=lambda p: (len(p), p))
    for folder in folders[start:]:
      if len(pictures) >= n:
        return pictures
      try:
        headers, problems = layout.scan_headers(folder)
        uids = {h.study_uid for h in headers} & by_uid.keys()
        if not uids:
          continue
        record = records.read_annotated_study(folder, by_uid[uids.pop()], headers=headers, problems=problems)
      except StudyError as e:
        print(f"skipping {folder}: {e}")
        continue
      h, w = record["image"].shape[:2]
      title = f"{os.path.basename(folder)} {h}x{w} {record['pixel_spacing_mm'][0]:.2f}mm"
      pictures.append(draw_record(record, title=title, size=size))
  return pictures


def _tfds_pictures(config: str, data_dir: str, manual_dir: str | None, n: int, start: int, size: int
                   ) -> list[Image.Image]:
  import tfds_spine  # pylint: disable=g-import-not-at-top
  source = tfds_spine.load_source(config, "+".join(f"fold{k}" for k in range(tfds_spine.NUM_FOLDS)), data_dir,
                                  manual_dir)
  pictures = []
  for i in range(start, min(start + n, len(source))):
    record = source[i]
    uid = record["study_uid"]
    uid = uid.decode() if isinstance(uid, bytes) else str(uid)
    pictures.append(draw_record(record, title=f"{config} ...{uid[-12:]}", size=size))
  return pictures


FLAGS = flags.FLAGS
flags.DEFINE_enum("source", "phantom", ["phantom", "tianchi"], "Which data to draw.")
flags.DEFINE_string("manual_dir", None, "Folder with <name>_annotation.json + <name>/ (tianchi source).")
flags.DEFINE_string("data_dir", None, "A built lumbar_spine TFDS data dir: read the examples from there instead.")
flags.DEFINE_integer("n", 16, "Number of studies.")
flags.DEFINE_integer("cols", 4, "Pictures per row.")
flags.DEFINE_integer("start", 0, "First phantom index / study folder / example.")
flags.DEFINE_integer("seed", 0, "Phantom set seed.")
flags.DEFINE_integer("size", 320, "Longest side of each picture (px).")
flags.DEFINE_string("out", "grid.png", "Output PNG.")


def main(argv: Sequence[str]) -> None:
  del argv
  if FLAGS.data_dir:
    pictures = _tfds_pictures(FLAGS.source, FLAGS.data_dir, FLAGS.manual_dir, FLAGS.n, FLAGS.start, FLAGS.size)
  elif FLAGS.source == "phantom":
    pictures = _phantom_pictures(FLAGS.n, FLAGS.seed, FLAGS.start, FLAGS.size)
  else:
    if not FLAGS.manual_dir:
      raise app.UsageError("--source=tianchi needs --manual_dir (the folder holding lumbar_train150_annotation.json)")
    pictures = _tianchi_pictures(FLAGS.manual_dir, FLAGS.n, FLAGS.start, FLAGS.size)
  if not pictures:
    raise app.UsageError("no study could be drawn")
  grid(pictures, FLAGS.cols).save(FLAGS.out)
  print(f"wrote {len(pictures)} studies to {FLAGS.out}")


if __name__ == "__main__":
  app.run(main)
