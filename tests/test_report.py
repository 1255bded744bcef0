"""The QC page of predictions: its numbers, its validation, and that a real browser renders every tile.

The browser tests use headless Chromium; they are skipped where it is not installed, except under CI=true, where its
absence fails them (CI installs it).
"""

import dataclasses
import functools
import io
import json
import pathlib
import re
import shutil
import subprocess

import numpy as np
import pytest
from PIL import Image

from conftest import require

from ccfnet_jax import objects
from ccfnet_jax.data import phantom
from ccfnet_jax.data.errors import StudyError
from ccfnet_jax.inference import report

DISCS = list(objects.DISC_INDICES)


@functools.lru_cache(maxsize=None)
def _record(index: int) -> dict:
  return phantom.generate_study(index)


def _study(index: int, name: str, *, offset_mm: float = 0.0, miss: tuple[int, ...] = (), miss_mm: float = 10.0,
           truth: bool = True) -> report.StudyResult:
  """A phantom study whose prediction is its ground truth moved right by `offset_mm` (`miss_mm` at `miss`)."""
  record = _record(index)
  spacing = record["pixel_spacing_mm"].astype(np.float64)  # (row, col)
  shift_mm = np.full(objects.NUM_OBJECTS, offset_mm)
  shift_mm[list(miss)] = miss_mm
  pred = record["points_xy"].astype(np.float64)
  pred[:, 0] += shift_mm / spacing[1]
  prob = np.linspace(0.05, 0.95, objects.NUM_OBJECTS)
  if not truth:
    return report.StudyResult(name, record["image"], pred, prob)
  return report.StudyResult(name, record["image"], pred, prob, gt_xy=record["points_xy"],
                            gt_valid=np.ones(objects.NUM_OBJECTS, bool), gt_disease=record["disease"],
                            pixel_spacing_mm=spacing)


def _summary(page: str) -> dict:
  match = re.search(r'<script type="application/json" id="summary">(.*?)</script>', page, re.S)
  assert match, "the page has no summary"
  return json.loads(match.group(1))


def test_errors_hits_and_metric_follow_the_ground_truth():
  studies = [_study(0, "a", offset_mm=3.0), _study(1, "b", offset_mm=1.0, miss=(DISCS[2], DISCS[4]))]
  page = report.render_html(studies)
  summary = _summary(page)
  a, b = summary["studies"]
  np.testing.assert_allclose(a["error_mm"], 3.0, atol=1e-3)
  assert all(a["hit"])
  expected_b = np.full(objects.NUM_OBJECTS, 1.0)
  expected_b[[DISCS[2], DISCS[4]]] = 10.0
  np.testing.assert_allclose(b["error_mm"], expected_b, atol=1e-3)
  assert [not h for h in b["hit"]] == list(expected_b > 6.0)
  # 12 discs, 2 missed; 10 vertebrae, all hit.
  assert summary["metrics"]["disc_recall"] == pytest.approx(100.0 * 10 / 12)
  assert summary["metrics"]["vertebra_recall"] == pytest.approx(100.0)
  assert 'class="tile hit"' in page and 'class="tile miss"' in page
  assert page.count('<td class="miss">miss</td>') == 2


def test_the_run_metric_given_is_shown_and_no_truth_means_no_metric():
  page = report.render_html([_study(0, "a", truth=False)], metrics={"disc_recall": 91.25, "score": 77.5})
  assert "91.25" in page and "77.50" in page
  assert _summary(page)["metrics"] == {"disc_recall": 91.25, "score": 77.5}
  page = report.render_html([_study(0, "a", truth=False)])
  assert _summary(page)["metrics"] is None
  assert 'class="tile notruth"' in page and "no ground truth" in page


def test_failed_studies_are_listed_with_their_reasons_escaped(tmp_path):
  failed = [StudyError("study7", "/data/study7/image3.dcm", "pixel data <missing> & header broken", "corrupt_dicom"),
            {"study": "study9", "file": "", "kind": "no_sagittal_series", "reason": "no T2 sagittal series"}]
  path = report.write_report(tmp_path / "qc", [_study(0, "a")], failed)
  assert pathlib.Path(path) == tmp_path / "qc" / "index.html"
  page = pathlib.Path(path).read_text(encoding="utf-8")
  assert "pixel data &lt;missing&gt; &amp; header broken" in page
  for text in ("study7", "/data/study7/image3.dcm", "corrupt_dicom", "study9", "no_sagittal_series"):
    assert text in page
  assert [row["study"] for row in _summary(page)["failed"]] == ["study7", "study9"]


def test_a_ready_png_picture_is_shown_instead_of_a_drawing():
  buffer = io.BytesIO()
  Image.new("RGB", (720, 360), (10, 20, 30)).save(buffer, format="PNG")
  study = report.StudyResult("p", None, np.zeros((11, 2)), np.zeros(11), picture=buffer.getvalue())
  page = report.render_html([study])
  assert 'width="360" height="180"' in page  # scaled to the tile, aspect kept
  with pytest.raises(ValueError, match="'q'.*PNG"):
    report.render_html([report.StudyResult("q", None, np.zeros((11, 2)), np.zeros(11), picture=b"GIF89a")])


@pytest.mark.parametrize("change, message", [
    (dict(pred_xy=np.zeros((10, 2))), r"'bad'.*pred_xy must have shape \(11, 2\)"),
    (dict(prob=np.full(11, np.nan)), r"'bad'.*finite"),
    (dict(pixel_spacing_mm=None), r"'bad'.*pixel_spacing_mm is needed"),
    (dict(pixel_spacing_mm=np.array([0.0, 0.7])), r"'bad'.*positive"),
    (dict(image=None), r"'bad'.*image or a ready picture"),
])
def test_bad_input_names_the_study(change, message):
  bad = dataclasses.replace(_study(0, "bad"), **change)
  with pytest.raises(ValueError, match=message):
    report.render_html([_study(1, "good"), bad])


def test_repeated_study_names_are_refused():
  with pytest.raises(ValueError, match="unique.*'a'"):
    report.render_html([_study(0, "a"), _study(1, "a")])


# ------------------------------------------------------------------------------------------------------------------
# In a real browser
# ------------------------------------------------------------------------------------------------------------------


def _chromium() -> str:
  found = shutil.which("chromium") or shutil.which("chromium-browser")
  require(bool(found), "chromium (CI installs Debian's chromium in .ci/run)")
  return found


def _run_chromium(tmp_path: pathlib.Path, *args: str) -> subprocess.CompletedProcess:
  profile = tmp_path / f"profile{len(list(tmp_path.glob('profile*')))}"
  profile.mkdir()
  command = [_chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             f"--user-data-dir={profile}", "--hide-scrollbars", "--force-device-scale-factor=1",
             "--force-color-profile=srgb", *args]
  result = subprocess.run(command, capture_output=True, text=True, timeout=120, check=False)
  assert result.returncode == 0, f"chromium failed ({result.returncode}): {result.stderr[-2000:]}"
  return result


def _frame_box(pixels: np.ndarray, hex_colour: str) -> tuple[int, int, int, int]:
  """(x0, y0, x1, y1) of the pixels of exactly this colour (a tile's border)."""
  rgb = np.array([int(hex_colour[i:i + 2], 16) for i in (1, 3, 5)], np.uint8)
  ys, xs = np.nonzero(np.all(pixels == rgb, axis=-1))
  assert ys.size, f"no pixel of the border colour {hex_colour} in the screenshot"
  return int(xs.min()), int(ys.min()), int(xs.max()), int(ys.max())


@pytest.fixture(scope="module")
def browser_report(tmp_path_factory):
  directory = tmp_path_factory.mktemp("qc")
  studies = [_study(0, "study0", offset_mm=2.0), _study(1, "study1", offset_mm=1.0, miss=(DISCS[1],), miss_mm=15.0),
             _study(2, "study2", truth=False)]
  failed = [StudyError("study3", "study3/image0.dcm", "not a DICOM file", "corrupt_dicom")]
  return pathlib.Path(report.write_report(directory, studies, failed, title="QC test"))


def test_every_tile_renders_in_a_browser_and_sorts(browser_report, tmp_path):
  url = browser_report.as_uri()
  dom = _run_chromium(tmp_path, "--virtual-time-budget=5000", "--dump-dom", url + "#sort=mean_error").stdout
  body = re.search(r"<body[^>]*>", dom).group(0)
  assert 'data-sorted-by="mean_error"' in body, "the page's script did not run"
  assert 'data-decoded-count="3"' in body, body
  tiles = re.findall(r'<div class="tile (\w+)"[^>]*data-name="(\w+)"[^>]*data-decoded="(\d+)x(\d+)"', dom)
  # Worst mean error first, the study without ground truth last.
  assert [(status, name) for status, name, _, _ in tiles] == [("miss", "study1"), ("hit", "study0"),
                                                              ("notruth", "study2")]
  assert all(max(int(w), int(h)) == report.PICTURE_SIZE for _, _, w, h in tiles)
  assert "corrupt_dicom" in dom and "not a DICOM file" in dom

  shot = tmp_path / "shot.png"
  _run_chromium(tmp_path, "--virtual-time-budget=5000", f"--screenshot={shot}", "--window-size=1300,900",
                url + "#sort=name")
  pixels = np.asarray(Image.open(shot).convert("RGB"))
  boxes = {colour: _frame_box(pixels, colour)
           for colour in (report.HIT_COLOUR, report.MISS_COLOUR, report.NO_TRUTH_COLOUR)}
  for colour, (x0, y0, x1, y1) in boxes.items():
    assert x1 - x0 >= report.PICTURE_SIZE and y1 - y0 >= report.PICTURE_SIZE, (colour, boxes)
    inside = pixels[y0 + 10:y1 - 10, x0 + 10:x1 - 10]
    grey = inside[(inside[..., 0] == inside[..., 1]) & (inside[..., 1] == inside[..., 2])][:, 0]
    # A slice spreads over many grey levels with many pixels each (text has a few pixels per level).
    assert np.sum(np.bincount(grey, minlength=256) >= 200) >= 30, f"the tile framed {colour} shows no slice"
  # Sorted by name: study0 (all hits), study1 (a miss), study2 (no truth), left to right.
  assert boxes[report.HIT_COLOUR][0] < boxes[report.MISS_COLOUR][0] < boxes[report.NO_TRUTH_COLOUR][0]
