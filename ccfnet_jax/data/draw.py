"""Pictures of studies: the image with its 11 points, names and labels (or predicted probabilities) drawn (pillow).

`draw_study` draws one study (data checks, prediction overlays); `draw_record` a data record; `grid` tiles pictures.
The command `python -m ccfnet_jax.render` draws a grid of examples.

Colours: green normal (label 0), red diseased (label 1), grey unknown (-1); with probabilities, the fill goes from green
(0) to red (1) and a ring in the label's colour shows the ground truth when labels are given too.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
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
