"""Tests of the study pictures (ccfnet_jax.data.draw) and of the command that draws a grid (ccfnet_jax.render)."""

import pathlib
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from ccfnet_jax.data import draw

REPO = pathlib.Path(__file__).resolve().parents[1]


def _flat_study(height=120, width=100, dtype=np.uint16):
  image = np.zeros((height, width, 3), dtype)
  image[..., 1] = 1000  # a uniform middle slice with one darker corner so min-max scaling has a range
  image[:4, :4, 1] = 0
  points = np.stack([np.full(11, 50.0), np.linspace(10, 110, 11)], axis=-1)
  return image, points


def _rgb(picture: Image.Image, x: float, y: float) -> np.ndarray:
  return np.asarray(picture)[int(round(y)), int(round(x))].astype(int)


def test_draw_study_keeps_the_native_size_and_shows_the_middle_slice():
  image, points = _flat_study()
  picture = draw.draw_study(image, points, valid=np.zeros(11, bool))
  assert picture.size == (100, 120) and picture.mode == "RGB"
  pixels = np.asarray(picture)
  assert np.all(pixels[60, 80] == 255)  # the middle slice's uniform value is its maximum
  assert np.all(pixels[0, 0] == 0)


def test_drawn_points_change_pixels_at_their_location_in_their_label_colour():
  image, points = _flat_study()
  labels = np.array([1, 0, -1] + [0] * 8)
  valid = np.ones(11, bool)
  valid[3] = False
  blank = draw.draw_study(image, points, valid=np.zeros(11, bool))
  picture = draw.draw_study(image, points, valid=valid, labels=labels)
  red, green, grey = (_rgb(picture, *points[i]) for i in range(3))
  assert red[0] > red[1] + 100 and red[0] > red[2] + 100
  assert green[1] > green[0] + 100 and green[1] > green[2] + 100
  assert abs(grey[0] - grey[1]) < 10 and grey[0] < 200
  assert np.array_equal(_rgb(picture, *points[3]), _rgb(blank, *points[3]))  # invalid: not drawn


def test_probabilities_colour_from_green_to_red_with_a_label_ring():
  image, points = _flat_study()
  probs = np.linspace(0.0, 1.0, 11)
  labels = np.ones(11, int)
  picture = draw.draw_study(image, points, probs=probs, labels=labels)
  low, high = _rgb(picture, *points[0]), _rgb(picture, *points[10])
  assert low[1] > low[0] + 100 and high[0] > high[1] + 100
  # The ring in the label colour (red) lies just outside the green filled point.
  x, y = int(points[0, 0]), int(points[0, 1])
  ring = np.asarray(picture)[y, x + 3:x + 7].astype(int)
  assert np.any((ring[:, 0] > 180) & (ring[:, 1] < 100)), ring


def test_draw_study_resizes_points_with_the_image():
  image, points = _flat_study(height=200, width=100)
  picture = draw.draw_study(image, points, labels=np.ones(11, int), size=100)
  assert picture.size == (50, 100)
  assert _rgb(picture, *(points[5] / 2))[0] > 180


def test_draw_study_rejects_bad_input():
  image, points = _flat_study()
  with pytest.raises(ValueError, match="image"):
    draw.draw_study(image[None], points)
  with pytest.raises(ValueError, match="labels"):
    draw.draw_study(image, points, labels=np.ones(10, int))
  with pytest.raises(ValueError, match="points_xy"):
    draw.draw_study(image, points[:, :1])


def test_grid_size():
  tiles = [Image.new("RGB", (50, 40), (k * 40, 0, 0)) for k in range(5)]
  sheet = draw.grid(tiles, cols=2, pad=3)
  assert sheet.size == (2 * 50 + 3 * 3, 3 * 40 + 4 * 3)
  assert tuple(np.asarray(sheet)[3 + 40 + 3 + 20, 3 + 50 + 3 + 25]) == (120, 0, 0)  # tile 3: row 1, col 1
  with pytest.raises(ValueError):
    draw.grid([], cols=2)


def _run(tmp_path, *args):
  out = tmp_path / "grid.png"
  result = subprocess.run([sys.executable, "-m", "ccfnet_jax.render", *args, "--cols=2", "--size=96",
                           f"--output={out}"], cwd=REPO, capture_output=True, text=True, timeout=120)
  return result, out


def _run_command(tmp_path, *args):
  result, out = _run(tmp_path, *args)
  assert result.returncode == 0, result.stderr[-2000:]
  return Image.open(out)


def test_command_draws_phantoms(tmp_path):
  sheet = _run_command(tmp_path, "--dataset=phantom", "--num_pictures=5", "--phantom_studies=3")
  assert sheet.size[0] == 2 * 96 + 3 * 4 and sheet.size[1] <= 2 * 96 + 3 * 4  # 3 pictures: the set has only 3
  pixels = np.asarray(sheet)
  assert np.any((pixels[..., 0] > 200) & (pixels[..., 1] < 80)) or np.any((pixels[..., 1] > 180) &
                                                                          (pixels[..., 0] < 80))


@pytest.mark.parametrize("old, new", [("--out=x.png", "--output"), ("--source=phantom", "--dataset"),
                                      ("--n=3", "--num_pictures")])
def test_command_refuses_old_flag_spellings_naming_the_new_one(tmp_path, old, new):
  result, out = _run(tmp_path, old)
  assert result.returncode != 0 and not out.exists()
  assert f"is now {new}" in result.stderr, result.stderr[-2000:]


def test_command_draws_real_studies(tmp_path, tianchi_dir):
  sheet = _run_command(tmp_path, "--dataset=tianchi", f"--manual_dir={tianchi_dir}", "--num_pictures=2")
  assert sheet.size[0] == 2 * 96 + 3 * 4
