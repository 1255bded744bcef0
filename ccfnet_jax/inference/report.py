"""A QC page of predictions: one self-contained HTML file with every study at a glance.

`write_report(directory, studies, failed)` writes `directory/index.html`: the run's metric at the top (when ground
truth is known), then one tile per study (the slice with the 11 predicted points, and each point's name, native
(x, y), disease probability and, with ground truth, its error in mm and hit / miss at `metrics.HIT_DISTANCE_MM`),
then the studies that failed with their reasons. Pictures are embedded as base64 PNG data URIs, so the page needs
nothing else: no network, no framework, a few lines of inline script to sort the tiles (by max or mean error, name,
probability) and to show only the studies with a miss. The page opens sorted as its address asks
(`index.html#sort=max_error`, `#sort=name`, ...).

Overlay colours: each predicted point is filled green (probability 0) to red (1), with a ring in the colour of the
true label when it is known (the drawing of `ccfnet_jax.data`); the ground truth is a cyan cross, joined to the
prediction by a yellow line when the point is a miss. Tile borders: green every valid point a hit, red at least one
miss, blue no ground truth.
"""

from __future__ import annotations

import base64
import dataclasses
import html
import io
import json
import math
import os
import warnings
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from ccfnet_jax import metrics as metrics_lib
from ccfnet_jax import objects, rundir
from ccfnet_jax.data import draw

INDEX_NAME = "index.html"
PICTURE_SIZE = 360  # longest side of an overlay picture, px
SORT_KEYS: tuple[str, ...] = ("max_error", "mean_error", "name", "max_prob")
"""What the page can sort by (also the values of `#sort=` in its address)."""

# Tile border colours by status (also what a screenshot test looks for).
HIT_COLOUR = "#00b050"
MISS_COLOUR = "#e00000"
NO_TRUTH_COLOUR = "#2060ff"
_TRUTH_RGB = (0, 220, 255)
_MISS_LINE_RGB = (255, 230, 0)


@dataclasses.dataclass(frozen=True)
class StudyResult:
  """The prediction of one study, and its ground truth when known.

  Attributes:
    name: the study as the user knows it (its folder name).
    image: the slice, `[H, W]` or `[H, W, 3]` (a 3-slice stack shows its middle slice), uint16, uint8 or float;
      None when `picture` is given.
    pred_xy: `[11, 2]` predicted (x, y), native px of `image`, in the order of `ccfnet_jax.objects`.
    prob: `[11]` predicted probability of disease.
    gt_xy: `[11, 2]` ground-truth (x, y) native px, or None.
    gt_valid: `[11]` bool, the ground-truth point exists (default: all, when `gt_xy` is given).
    gt_disease: `[11]` int label (1 diseased, 0 normal, -1 unknown), or None.
    pixel_spacing_mm: `[2]` (row, col) mm per native px; needed for the errors when `gt_xy` is given.
    picture: a ready overlay (PIL image or PNG bytes) shown instead of drawing one from `image`.
  """

  name: str
  image: np.ndarray | None
  pred_xy: np.ndarray
  prob: np.ndarray
  gt_xy: np.ndarray | None = None
  gt_valid: np.ndarray | None = None
  gt_disease: np.ndarray | None = None
  pixel_spacing_mm: np.ndarray | None = None
  picture: Image.Image | bytes | None = None

  @property
  def has_truth(self) -> bool:
    return self.gt_xy is not None


@dataclasses.dataclass(frozen=True)
class FailedStudy:
  """A study that could not be predicted (the fields of `data.errors.StudyError`)."""

  study: str
  file: str
  kind: str
  reason: str


@dataclasses.dataclass(frozen=True)
class _Checked:
  """A `StudyResult` with validated arrays and its per-point errors."""

  study: StudyResult
  pred_xy: np.ndarray
  prob: np.ndarray
  gt_xy: np.ndarray | None
  gt_valid: np.ndarray | None
  gt_disease: np.ndarray | None
  spacing: np.ndarray | None
  error_mm: np.ndarray | None  # [11], NaN where the ground truth is absent
  hit: np.ndarray | None  # [11] bool, False where the ground truth is absent


def _array(study: str, what: str, value: Any, shape: tuple[int, ...], dtype: Any) -> np.ndarray:
  array = np.asarray(value, dtype)
  if array.shape != shape:
    raise ValueError(f"report: study {study!r}: {what} must have shape {shape}, got {np.shape(value)}")
  return array


def _check(study: StudyResult) -> _Checked:
  """Validates one study's arrays (clear errors naming the study) and computes its errors."""
  k = objects.NUM_OBJECTS
  name = study.name
  pred_xy = _array(name, "pred_xy", study.pred_xy, (k, 2), np.float64)
  prob = _array(name, "prob", study.prob, (k,), np.float64)
  if not (np.all(np.isfinite(pred_xy)) and np.all(np.isfinite(prob))):
    raise ValueError(f"report: study {name!r}: pred_xy and prob must be finite")
  if study.image is None and study.picture is None:
    raise ValueError(f"report: study {name!r}: give the image or a ready picture")
  if study.image is not None and np.ndim(study.image) not in (2, 3):
    raise ValueError(f"report: study {name!r}: image must be [H, W] or [H, W, 3], got shape {np.shape(study.image)}")
  if not study.has_truth:
    return _Checked(study, pred_xy, prob, None, None, None, None, None, None)
  gt_xy = _array(name, "gt_xy", study.gt_xy, (k, 2), np.float64)
  gt_valid = (np.ones(k, bool) if study.gt_valid is None
              else _array(name, "gt_valid", study.gt_valid, (k,), bool))
  gt_disease = (None if study.gt_disease is None
                else _array(name, "gt_disease", study.gt_disease, (k,), np.int64))
  if study.pixel_spacing_mm is None:
    raise ValueError(f"report: study {name!r}: pixel_spacing_mm is needed with ground truth (errors are in mm)")
  spacing = _array(name, "pixel_spacing_mm", study.pixel_spacing_mm, (2,), np.float64)
  if not (np.all(np.isfinite(spacing)) and np.all(spacing > 0)):
    raise ValueError(f"report: study {name!r}: pixel_spacing_mm must be finite and positive, got {spacing}")
  if not np.all(np.isfinite(gt_xy[gt_valid])):
    raise ValueError(f"report: study {name!r}: gt_xy must be finite at the valid points")
  with np.errstate(invalid="ignore"):  # absent points may hold NaN coordinates
    error = metrics_lib.distances_mm(pred_xy[None], gt_xy[None], spacing[None])[0]
  error = np.where(gt_valid, error, np.nan)
  hit = gt_valid & (np.nan_to_num(error, nan=np.inf) <= metrics_lib.HIT_DISTANCE_MM)
  return _Checked(study, pred_xy, prob, gt_xy, gt_valid, gt_disease, spacing, error, hit)


def _failed_rows(failed: Iterable[Any]) -> list[FailedStudy]:
  """`FailedStudy`s from StudyErrors, a SkipReport (its `.errors`), mappings or `FailedStudy`s."""
  failed = getattr(failed, "errors", failed)
  rows = []
  for item in failed:
    if isinstance(item, Mapping):
      get = item.get
    else:
      get = lambda key, default="", item=item: getattr(item, key, default)  # noqa: E731
    rows.append(FailedStudy(str(get("study", "")), str(get("file", "")), str(get("kind", "")),
                            str(get("reason", ""))))
  return rows


def _run_metrics(checked: Sequence[_Checked]) -> tuple[dict[str, float] | None, list[str]]:
  """`metrics.evaluate` over the studies with ground truth (None when none has any), and its warnings."""
  with_truth = [c for c in checked if c.gt_xy is not None]
  if not with_truth:
    return None, []
  k = objects.NUM_OBJECTS
  disease = np.stack([c.gt_disease if c.gt_disease is not None else np.full(k, objects.UNKNOWN)
                      for c in with_truth])
  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always", metrics_lib.MetricWarning)
    values = metrics_lib.evaluate(np.stack([c.pred_xy for c in with_truth]), np.stack([c.prob for c in with_truth]),
                                  np.stack([c.gt_xy for c in with_truth]), np.stack([c.gt_valid for c in with_truth]),
                                  disease, np.stack([c.spacing for c in with_truth]))
  notes = [str(w.message) for w in caught if issubclass(w.category, metrics_lib.MetricWarning)]
  return values, notes


def overlay(checked: _Checked, size: int = PICTURE_SIZE) -> Image.Image:
  """The study's slice with the predicted points, and the ground truth (cross; a line to each miss)."""
  study = checked.study
  image = np.asarray(study.image)
  picture = draw.draw_study(image, checked.pred_xy, labels=checked.gt_disease, probs=checked.prob, size=size)
  if checked.gt_xy is None:
    return picture
  scale = np.array([picture.width / image.shape[1], picture.height / image.shape[0]])
  pen = ImageDraw.Draw(picture)
  arm = max(3.0, max(picture.size) / 80)
  for i in np.flatnonzero(checked.gt_valid):
    gx, gy = checked.gt_xy[i] * scale
    if not checked.hit[i]:
      px, py = checked.pred_xy[i] * scale
      pen.line([(px, py), (gx, gy)], fill=_MISS_LINE_RGB, width=2)
    pen.line([(gx - arm, gy), (gx + arm, gy)], fill=_TRUTH_RGB, width=2)
    pen.line([(gx, gy - arm), (gx, gy + arm)], fill=_TRUTH_RGB, width=2)
  return picture


def _png(study: str, picture: Image.Image | bytes) -> tuple[bytes, tuple[int, int]]:
  """PNG bytes of a picture and its (width, height)."""
  if isinstance(picture, (bytes, bytearray)):
    data = bytes(picture)
    if not data.startswith(b"\x89PNG\r\n\x1a\n"):
      raise ValueError(f"report: study {study!r}: a picture given as bytes must be a PNG file")
    with Image.open(io.BytesIO(data)) as opened:
      return data, opened.size
  buffer = io.BytesIO()
  picture.convert("RGB").save(buffer, format="PNG", optimize=True)
  return buffer.getvalue(), picture.size


def _number(value: float, digits: int = 1) -> str:
  return "&ndash;" if value is None or not math.isfinite(value) else f"{value:.{digits}f}"


def _sort_value(value: float) -> str:
  """A data attribute for sorting: '' (sorted last) for an unknown value."""
  return "" if value is None or not math.isfinite(value) else repr(float(value))


def _tile(checked: _Checked, index: int) -> str:
  study = checked.study
  e = html.escape
  png, (width, height) = _png(study.name, study.picture if study.picture is not None else overlay(checked))
  if max(width, height) > PICTURE_SIZE:  # shown scaled down to the tile
    scale = PICTURE_SIZE / max(width, height)
    width, height = max(1, round(width * scale)), max(1, round(height * scale))
  max_prob = float(np.max(checked.prob))
  if checked.error_mm is None:
    status, max_error, mean_error, n_valid, n_hit = "notruth", math.nan, math.nan, 0, 0
    summary = "no ground truth"
  else:
    n_valid, n_hit = int(np.sum(checked.gt_valid)), int(np.sum(checked.hit))
    errors = checked.error_mm[checked.gt_valid]
    max_error = float(np.max(errors)) if errors.size else math.nan
    mean_error = float(np.mean(errors)) if errors.size else math.nan
    status = "hit" if n_hit == n_valid else "miss"
    summary = (f"{n_hit}/{n_valid} hits &middot; max {_number(max_error)} mm &middot; "
               f"mean {_number(mean_error)} mm")
  rows = []
  for i, point_name in enumerate(objects.NAMES):
    x, y = checked.pred_xy[i]
    cells = [f"<td>{e(point_name)}</td>", f"<td>{x:.1f}</td>", f"<td>{y:.1f}</td>",
             f"<td>{checked.prob[i]:.2f}</td>"]
    if checked.error_mm is not None:
      if checked.gt_valid[i]:
        label = "" if checked.gt_disease is None else {1: "1", 0: "0"}.get(int(checked.gt_disease[i]), "?")
        verdict = "hit" if checked.hit[i] else "miss"
        cells += [f"<td>{label}</td>", f"<td>{_number(float(checked.error_mm[i]))}</td>",
                  f'<td class="{verdict}">{verdict}</td>']
      else:
        cells += ["<td></td>", "<td>&ndash;</td>", '<td class="absent">absent</td>']
    rows.append(f'<tr data-point="{e(point_name)}">{"".join(cells)}</tr>')
  truth_head = "<th>label</th><th>error mm</th><th></th>" if checked.error_mm is not None else ""
  return (
      f'<div class="tile {status}" data-index="{index}" data-name="{e(study.name, quote=True)}" '
      f'data-max_error="{_sort_value(max_error)}" data-mean_error="{_sort_value(mean_error)}" '
      f'data-max_prob="{_sort_value(max_prob)}" data-hits="{n_hit}" data-valid="{n_valid}">\n'
      f'<div class="head"><b>{e(study.name)}</b><br><span>{summary}</span></div>\n'
      f'<img alt="{e(study.name, quote=True)}" width="{width}" height="{height}" '
      f'src="data:image/png;base64,{base64.b64encode(png).decode("ascii")}">\n'
      f'<table class="points"><tr><th>point</th><th>x</th><th>y</th><th>prob</th>{truth_head}</tr>\n'
      + "\n".join(rows) + "</table>\n</div>")


def _metrics_block(values: Mapping[str, float] | None, notes: Sequence[str], num_truth: int, computed: bool) -> str:
  if not values:
    return '<p class="note">No ground truth: no metric.</p>'
  e = html.escape
  names = [n for n in metrics_lib.METRIC_NAMES if n in values] + sorted(set(values) - set(metrics_lib.METRIC_NAMES))
  head = "".join(f"<th>{e(n)}</th>" for n in names)
  cells = "".join(f"<td>{_number(float(values[n]), 2)}</td>" for n in names)
  where = (f"over the {num_truth} studies with ground truth on this page" if computed else "of the run")
  lines = [f'<table class="metrics"><tr>{head}</tr><tr>{cells}</tr></table>',
           f'<p class="note">Metric {e(where)}; a point is a hit within {metrics_lib.HIT_DISTANCE_MM:g} mm; '
           "recalls and AUCs in %.</p>"]
  lines += [f'<p class="note">{e(n)}</p>' for n in notes]
  return "\n".join(lines)


def _failed_block(rows: Sequence[FailedStudy]) -> str:
  if not rows:
    return '<h2>Failed studies</h2><p class="note">None.</p>'
  e = html.escape
  body = "\n".join(f'<tr class="failed"><td>{e(r.study)}</td><td>{e(r.file)}</td><td>{e(r.kind)}</td>'
                   f"<td>{e(r.reason)}</td></tr>" for r in rows)
  return (f'<h2>Failed studies ({len(rows)})</h2>\n<table class="failed-list"><tr><th>study</th><th>file</th>'
          f"<th>kind</th><th>reason</th></tr>\n{body}</table>")


_STYLE = f"""
body {{ font: 13px/1.35 system-ui, sans-serif; margin: 12px; background: #f4f4f4; color: #111; }}
h1 {{ font-size: 20px; margin: 0 0 6px; }} h2 {{ font-size: 16px; margin: 18px 0 6px; }}
.note {{ color: #555; margin: 3px 0; }}
table {{ border-collapse: collapse; }} td, th {{ padding: 1px 5px; text-align: right; }}
table.metrics td, table.metrics th {{ border: 1px solid #bbb; padding: 3px 8px; background: #fff; }}
table.metrics td {{ font-size: 16px; font-weight: bold; }}
.controls {{ margin: 10px 0; }}
#tiles {{ display: flex; flex-wrap: wrap; gap: 10px; }}
.tile {{ background: #fff; border: 6px solid; padding: 6px; width: {PICTURE_SIZE}px; }}
.tile.hit {{ border-color: {HIT_COLOUR}; }} .tile.miss {{ border-color: {MISS_COLOUR}; }}
.tile.notruth {{ border-color: {NO_TRUTH_COLOUR}; }}
.tile .head {{ margin-bottom: 4px; word-break: break-all; }}
.tile img {{ display: block; margin: 0 auto; background: #000; }}
table.points {{ width: 100%; margin-top: 4px; font-size: 12px; }}
table.points td:first-child, table.points th:first-child {{ text-align: left; }}
td.hit {{ color: #087a30; }} td.miss {{ color: {MISS_COLOUR}; font-weight: bold; }} td.absent {{ color: #888; }}
table.failed-list td, table.failed-list th {{ border: 1px solid #bbb; text-align: left; background: #fff; }}
body.misses-only .tile:not(.miss) {{ display: none; }}
"""

# Sorts the tiles by a data attribute (unknown values last), records which images decoded (data-decoded on each
# tile, data-decoded-count on the body: what a browser test reads), and honours `#sort=KEY` in the address.
_SCRIPT = """
(function () {
  var box = document.getElementById('tiles');
  var select = document.getElementById('sort');
  var descending = {max_error: true, mean_error: true, max_prob: true, name: false};
  function sortBy(key) {
    var tiles = Array.prototype.slice.call(box.children);
    tiles.sort(function (a, b) {
      if (key === 'name') return a.dataset.name.localeCompare(b.dataset.name, undefined, {numeric: true});
      var x = a.dataset[key], y = b.dataset[key];
      if (x === '' || y === '') return (x === '') - (y === '') || a.dataset.index - b.dataset.index;
      return (descending[key] ? y - x : x - y) || a.dataset.index - b.dataset.index;
    });
    tiles.forEach(function (t) { box.appendChild(t); });
    select.value = key;
    document.body.dataset.sortedBy = key;
  }
  select.addEventListener('change', function () { sortBy(select.value); });
  document.getElementById('misses').addEventListener('change', function (ev) {
    document.body.classList.toggle('misses-only', ev.target.checked);
  });
  var match = /sort=([a-z_]+)/.exec(location.hash);
  sortBy(match && descending.hasOwnProperty(match[1]) ? match[1] : select.value);
  window.addEventListener('load', function () {
    var n = 0;
    Array.prototype.forEach.call(box.querySelectorAll('.tile'), function (t) {
      var img = t.querySelector('img');
      var ok = img.complete && img.naturalWidth > 0;
      t.dataset.decoded = ok ? img.naturalWidth + 'x' + img.naturalHeight : 'no';
      n += ok ? 1 : 0;
    });
    document.body.dataset.decodedCount = n;
  });
})();
"""


def render_html(studies: Sequence[StudyResult], failed: Iterable[Any] = (), *,
                metrics: Mapping[str, float] | None = None, title: str = "CCF-Net predictions") -> str:
  """The page of `write_report` as a string (see the module docstring)."""
  names = [s.name for s in studies]
  if len(set(names)) != len(names):
    duplicates = sorted({n for n in names if names.count(n) > 1})
    raise ValueError(f"report: study names must be unique, repeated: {duplicates}")
  checked = [_check(s) for s in studies]
  failed_rows = _failed_rows(failed)
  computed = metrics is None
  notes: list[str] = []
  if computed:
    metrics, notes = _run_metrics(checked)
  num_truth = sum(c.gt_xy is not None for c in checked)
  num_miss = sum(c.hit is not None and not np.all(c.hit[c.gt_valid]) for c in checked)
  default_sort = "max_error" if num_truth else "name"
  options = {"max_error": "max error (worst first)", "mean_error": "mean error (worst first)", "name": "name",
             "max_prob": "max probability (highest first)"}
  select = "".join(f'<option value="{key}"{" selected" if key == default_sort else ""}>{options[key]}</option>'
                   for key in SORT_KEYS)
  e = html.escape
  counts = (f"{len(studies)} studies predicted, {len(failed_rows)} failed; {num_truth} with ground truth, "
            f"{num_miss} with a miss.")
  tiles = "\n".join(_tile(c, i) for i, c in enumerate(checked))
  return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<title>{e(title)}</title>
<style>{_STYLE}</style></head>
<body data-num-tiles="{len(checked)}" data-num-failed="{len(failed_rows)}">
<h1>{e(title)}</h1>
<p class="note">{e(counts)}</p>
{_metrics_block(metrics, notes, num_truth, computed)}
<div class="controls">Sort by <select id="sort">{select}</select>
<label><input type="checkbox" id="misses"> only studies with a miss</label></div>
<p class="note">Points: filled green (probability 0) to red (1), ringed in the colour of the true label (green normal,
red diseased); cyan cross: ground truth; yellow line: a miss. Coordinates in native pixels of the slice.</p>
<div id="tiles">
{tiles}
</div>
{_failed_block(failed_rows)}
<script>{_SCRIPT}</script>
<script type="application/json" id="summary">{_json_for_script(_summary(checked, failed_rows, metrics))}</script>
</body></html>
"""


def _summary(checked: Sequence[_Checked], failed_rows: Sequence[FailedStudy],
             metrics: Mapping[str, float] | None) -> dict[str, Any]:
  """The page's numbers in machine-readable form (in the page, for scripts and tests)."""
  def finite(values):
    return [None if not math.isfinite(v) else round(float(v), 4) for v in values]

  studies = []
  for c in checked:
    entry = {"name": c.study.name, "pred_xy": finite(c.pred_xy.reshape(-1)), "prob": finite(c.prob)}
    if c.error_mm is not None:
      entry["error_mm"] = finite(c.error_mm)
      entry["hit"] = [bool(h) for h in c.hit]
    studies.append(entry)
  return {"metrics": None if metrics is None else {k: float(v) for k, v in metrics.items()},
          "studies": studies, "failed": [dataclasses.asdict(r) for r in failed_rows]}


def _json_for_script(value: Any) -> str:
  return json.dumps(value).replace("<", "\\u003c")  # no '</script>' inside the element


def write_report(directory: str | os.PathLike, studies: Sequence[StudyResult], failed: Iterable[Any] = (), *,
                 metrics: Mapping[str, float] | None = None, title: str = "CCF-Net predictions") -> str:
  """Writes the QC page of a prediction run; returns the path of `directory/index.html`.

  Args:
    directory: created if missing; `index.html` in it is replaced.
    studies: the predicted studies, one tile each, in this order until the page is sorted.
    failed: the studies that could not be predicted: `data.errors.StudyError`s (or a `SkipReport`), mappings or
      `FailedStudy`s with study, file, kind, reason.
    metrics: the run's metric (e.g. `metrics.evaluate`'s dict) shown at the top; None computes it over the studies
      given with ground truth (none without).
    title: the page's heading.
  Raises:
    ValueError: a study's arrays have the wrong shape or are not finite, ground truth lacks the pixel spacing, or
      two studies share a name (the message names the study).
  """
  page = render_html(studies, failed, metrics=metrics, title=title)
  path = os.path.join(os.fspath(directory), INDEX_NAME)
  rundir.write_text(path, page)
  return path
