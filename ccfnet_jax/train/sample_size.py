"""The training-size experiment (the paper's Fig. 4): models x training fractions x folds, a table and a plot.

Each (model, fraction) is one ordinary run directory, `<workdir>/<model slug>/fraction_<f>/`, trained by
`train_and_evaluate` with `config.train_fraction = f` on the grid's folds, so a stopped grid resumes where it
stopped and finished runs are only read back. The summary gives, per model and fraction, the mean and standard
deviation (ddof 0) over folds of the score and of its four factors.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import ml_collections
import numpy as np

from ccfnet_jax import config as config_lib
from ccfnet_jax import metrics, rundir
from ccfnet_jax.train import loop

SUMMARY_FILE = "sample_size.json"
TABLE_FILE = "sample_size.md"
PLOT_FILE = "sample_size.png"


def slug(label: str) -> str:
  return re.sub(r"[^a-z0-9]+", "_", label.lower()).strip("_")


def run_dir(workdir: str, label: str, fraction: float) -> str:
  return os.path.join(workdir, slug(label), f"fraction_{fraction:g}")


def experiment_config(grid: ml_collections.ConfigDict, label: str, fraction: float) -> ml_collections.ConfigDict:
  """The run config of one cell: the model's config file, the grid's overrides, the fraction and the folds."""
  config = config_lib.load_config_file(grid.models[label])
  with config.unlocked():
    for key, value in dict(grid.get("overrides", {})).items():
      target = config
      *path, last = key.split(".")
      for part in path:
        target = target[part]
      target[last] = value
    config.train_fraction = float(fraction)
    config.fold = ",".join(str(k) for k in grid.folds)
  return config


@dataclasses.dataclass
class Cell:
  """One (model, fraction): each fold's metrics of the chosen evaluation ('last' or 'best')."""
  model: str
  fraction: float
  folds: dict[str, dict[str, float]]

  def summary(self) -> dict[str, Any]:
    values = list(self.folds.values())
    mean, std = metrics.summarize_folds(values) if values else ({}, {})
    return {"model": self.model, "fraction": self.fraction, "folds": sorted(self.folds, key=int), "mean": mean,
            "std": std}


def run_grid(grid: ml_collections.ConfigDict, workdir: str, *, which: str = "last",
             train_fn: Callable[[ml_collections.ConfigDict, str], Mapping[str, Any]] | None = None,
             report: Callable[[str], None] = print) -> list[dict[str, Any]]:
  """Trains (or reads back) every cell of the grid; writes and returns the summary rows."""
  train_fn = loop.train_and_evaluate if train_fn is None else train_fn
  if which not in ("last", "best"):
    raise config_lib.ConfigError(f"which = {which!r}: expected 'last' or 'best'")
  rows = []
  for label in grid.models:
    for fraction in grid.fractions:
      config = experiment_config(grid, label, fraction)
      directory = run_dir(workdir, label, fraction)
      report(f"== {label}, training fraction {fraction:g}: {directory}")
      results = train_fn(config, directory)
      cell = Cell(label, float(fraction), {k: {m: fold[which][m] for m in metrics.METRIC_NAMES}
                                           for k, fold in results["folds"].items()})
      rows.append(cell.summary())
  rundir.write_json(os.path.join(workdir, SUMMARY_FILE), {"which": which, "rows": rows})
  rundir.write_text(os.path.join(workdir, TABLE_FILE), format_table(rows, which))
  plot(rows, os.path.join(workdir, PLOT_FILE), which=which)
  return rows


def format_table(rows: Sequence[Mapping[str, Any]], which: str = "last") -> str:
  """Markdown: one row per model, one column per fraction, score mean +- std over folds (in %)."""
  fractions = sorted({r["fraction"] for r in rows})
  models = list(dict.fromkeys(r["model"] for r in rows))
  lines = [f"Score (%) by training fraction, mean ± std over folds ({which} evaluation)", "",
           "| model | " + " | ".join(f"{f:.0%}" for f in fractions) + " |",
           "|---|" + "---|" * len(fractions)]
  for model in models:
    cells = []
    for f in fractions:
      row = next((r for r in rows if r["model"] == model and r["fraction"] == f), None)
      cells.append(f"{row['mean']['score']:.2f} ± {row['std']['score']:.2f} ({len(row['folds'])} folds)"
                   if row and row["mean"] else "")
    lines.append(f"| {model} | " + " | ".join(cells) + " |")
  return "\n".join(lines) + "\n"


_COLOURS = ((31, 119, 180), (214, 39, 40), (44, 160, 44), (148, 103, 189), (255, 127, 14), (23, 190, 207))


def plot(rows: Sequence[Mapping[str, Any]], path: str, *, which: str = "last", size: tuple[int, int] = (720, 480)
         ) -> str:
  """A PNG in the shape of Fig. 4: score against training fraction, one line per model, +- std bars."""
  from PIL import Image, ImageDraw  # pylint: disable=g-import-not-at-top

  width, height = size
  left, right, top, bottom = 70, 190, 40, 60
  image = Image.new("RGB", size, "white")
  draw = ImageDraw.Draw(image)
  scored = [r for r in rows if r["mean"]]
  values = [r["mean"]["score"] + s * r["std"]["score"] for r in scored for s in (-1, 1)] or [0.0, 1.0]
  low, high = math.floor(min(values) / 5) * 5, math.ceil(max(values) / 5) * 5
  high = max(high, low + 5)

  def xy(fraction, score):
    x = left + (fraction - 0.0) / 1.0 * (width - left - right)
    y = top + (high - score) / (high - low) * (height - top - bottom)
    return x, y

  draw.rectangle([left, top, width - right, height - bottom], outline="black")
  for tick in np.linspace(0, 1, 5):
    x, _ = xy(tick, low)
    draw.line([x, height - bottom, x, height - bottom + 5], fill="black")
    draw.text((x - 12, height - bottom + 8), f"{tick:.0%}", fill="black")
  for tick in range(int(low), int(high) + 1, 5):
    _, y = xy(0, tick)
    draw.line([left - 5, y, left, y], fill="black")
    draw.text((left - 35, y - 6), str(tick), fill="black")
  draw.text((left + 120, height - 25), "fraction of the training studies", fill="black")
  draw.text((8, 12), f"score (%), mean ± std over folds ({which} evaluation)", fill="black")
  for k, model in enumerate(dict.fromkeys(r["model"] for r in scored)):
    colour = _COLOURS[k % len(_COLOURS)]
    points = sorted((r["fraction"], r["mean"]["score"], r["std"]["score"]) for r in scored if r["model"] == model)
    centres = [xy(f, m) for f, m, _ in points]
    if len(centres) > 1:
      draw.line(centres, fill=colour, width=2)
    for (f, m, s), (x, y) in zip(points, centres):
      _, y_low = xy(f, m - s)
      _, y_high = xy(f, m + s)
      draw.line([x, y_low, x, y_high], fill=colour, width=1)
      draw.line([x - 4, y_low, x + 4, y_low], fill=colour)
      draw.line([x - 4, y_high, x + 4, y_high], fill=colour)
      draw.ellipse([x - 3, y - 3, x + 3, y + 3], fill=colour)
    legend_y = top + 18 * k
    draw.line([width - right + 12, legend_y + 6, width - right + 32, legend_y + 6], fill=colour, width=3)
    draw.text((width - right + 38, legend_y), model, fill="black")
  rundir.write_bytes(path, _png_bytes(image))
  return path


def _png_bytes(image) -> bytes:
  import io  # pylint: disable=g-import-not-at-top
  buffer = io.BytesIO()
  image.save(buffer, format="PNG")
  return buffer.getvalue()
