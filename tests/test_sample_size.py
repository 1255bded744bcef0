"""The training-size experiment: a grid of models x fractions x folds, resumable, with its table and plot."""

from __future__ import annotations

import json
import os

import jax
import ml_collections
import numpy as np
import pytest
from PIL import Image

from ccfnet_jax import rundir
from ccfnet_jax.train import sample_size
from test_train import phantom_data_dir  # noqa: F401  (fixture)


def _tiny_config_file(tmp_path, name: str, learning_rate: float) -> str:
  path = tmp_path / f"{name}.py"
  path.write_text("import tiny_training\n\n\ndef get_config(arg=None):\n"
                  f"  return tiny_training.tiny_config(learning_rate={learning_rate})\n")
  return str(path)


def test_the_grid_trains_every_cell_once_and_writes_the_table_and_plot(tmp_path, phantom_data_dir):  # noqa: F811
  grid = ml_collections.ConfigDict({
      "models": {"Tiny A": _tiny_config_file(tmp_path, "a", 1e-3), "Tiny B": _tiny_config_file(tmp_path, "b", 3e-3)},
      "fractions": (0.5, 1.0), "folds": (0, 1),
      "overrides": {"data_dir": phantom_data_dir, "num_steps": 2, "eval_every_steps": 2, "batch_size": 4,
                    "eval_batch_size": 4}})
  calls = []

  def train_fn(config, directory):
    calls.append((config.train_fraction, config.fold, directory))
    from ccfnet_jax import parallel, train  # pylint: disable=g-import-not-at-top
    return train.train_and_evaluate(config, directory, mesh=parallel.make_mesh(jax.devices()[:4]))

  workdir = str(tmp_path / "grid")
  rows = sample_size.run_grid(grid, workdir, train_fn=train_fn)
  assert [(r["model"], r["fraction"], r["folds"]) for r in rows] == [
      ("Tiny A", 0.5, ["0", "1"]), ("Tiny A", 1.0, ["0", "1"]), ("Tiny B", 0.5, ["0", "1"]),
      ("Tiny B", 1.0, ["0", "1"])]
  assert [c[:2] for c in calls] == [(0.5, "0,1"), (1.0, "0,1")] * 2
  for model, fraction in (("Tiny A", 0.5), ("Tiny B", 1.0)):
    run = json.loads(open(os.path.join(sample_size.run_dir(workdir, model, fraction), rundir.RESULTS_FILE)).read())
    scores = [run["folds"][k]["last"]["score"] for k in ("0", "1")]
    row = next(r for r in rows if (r["model"], r["fraction"]) == (model, fraction))
    assert row["mean"]["score"] == pytest.approx(np.mean(scores)) and row["std"]["score"] == pytest.approx(
        np.std(scores))
  table = open(os.path.join(workdir, sample_size.TABLE_FILE)).read()
  assert "| Tiny A |" in table and "50%" in table and "100%" in table
  picture = np.asarray(Image.open(os.path.join(workdir, sample_size.PLOT_FILE)).convert("RGB"))
  for colour in sample_size._COLOURS[:2]:  # one line per model, in its colour
    assert np.sum(np.all(picture == colour, axis=-1)) > 50, colour

  # Resumed: every cell is finished, so nothing trains again and the table is the same.
  again = sample_size.run_grid(grid, workdir, train_fn=train_fn)
  assert again == rows
  lines = open(os.path.join(sample_size.run_dir(workdir, "Tiny A", 0.5), "fold_0", rundir.METRICS_FILE)).read()
  assert lines.count('"split": "train"') == 2  # steps 1 and 2, logged once: no retraining
