"""Training every Table 1 row's config for two steps through `run.py`, on a tiny phantom set at 128 px.

One `run.py` process per row (what a user runs, flags included), all rows of a test file reading one phantom dataset
built once and sharing the test suite's persistent compilation cache. Nearly all of the cost is each model's
initialisation and the compilation of its train and eval steps, so a row costs about the same at any image size or
step count. The rows are split over two test files so that two test workers can run them side by side.
"""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import pytest

from ccfnet_jax.models import complexity
from test_train import REPO, subprocess_env

PHANTOM_STUDIES = 8  # 6 train / 2 val studies in fold 0: one batch of 2 per step

ALL_ROWS = os.environ.get("CCFNET_TEST_ALL_ROWS", "") == "1" or os.environ.get("CI", "").lower() == "true"
"""HRNet-W32 runs in CI (`.ci/run` sets CI=true) and with CCFNET_TEST_ALL_ROWS=1, not in a plain local `make test`:
tracing and compiling its train step costs more than half of what the ten other rows cost together (its
construction, shapes and parameter count are checked everywhere: tests/test_baselines.py)."""


RESNET_METHODS = ("CCF-Net", "SimpleBaseline")
"""The rows of tests/test_table_rows_resnet.py; tests/test_table_rows_hrnet_scn.py has every other row."""


def params(resnet: bool) -> list:
  """pytest params of the rows of `RESNET_METHODS` (or of all the others), named like 'CCF-Net-R18-MSC'.

  HRNet-W32 comes first: the longest row of the suite, so it does not run alone at the end on one worker.
  """
  rows = sorted((r for r in complexity.ROWS if (r.method in RESNET_METHODS) == resnet),
                key=lambda r: r.method != "HRNet")
  return [pytest.param(r, id=f"{r.method}-{r.backbone}", marks=_marks(r)) for r in rows]


def _marks(row: complexity.Row) -> list:
  if row.method == "HRNet":
    return [pytest.mark.skipif(not ALL_ROWS, reason="HRNet-W32 trains through run.py in CI or with CCFNET_TEST_ALL_ROWS=1")]
  return []


def build_data(tmp_path_factory) -> str:
  """A phantom `lumbar_spine` dataset for the rows of one file (the run.py processes only read it)."""
  import tfds_spine  # pylint: disable=g-import-not-at-top
  path = str(tmp_path_factory.mktemp("tfds_rows"))
  tfds_spine.prepare("phantom", path, num_studies=PHANTOM_STUDIES, seed=0)
  return path


def check_row_trains(row: complexity.Row, data_dir: str, tmp_path: pathlib.Path) -> None:
  """Runs the row's config for two steps and checks its model and its results file."""
  workdir = tmp_path / "run"
  args = [sys.executable, str(REPO / "run.py"), f"--config={REPO / row.config}", "--config.num_steps=2",
          "--config.image_size=128", "--config.batch_size=2", f"--config.phantom_studies={PHANTOM_STUDIES}",
          f"--config.data_dir={data_dir}", "--config.flip_tta=False", "--config.num_data_threads=1",
          f"--workdir={workdir}"]
  done = subprocess.run(args, cwd=REPO, env=subprocess_env(2), capture_output=True, text=True, timeout=900,
                        check=False)
  assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
  config = json.loads((workdir / "config.json").read_text())
  assert {k: config["model"][k] for k in ("name", "depth", "msc")} == row.model
  last = json.loads((workdir / "results.json").read_text())["folds"]["0"]["last"]
  assert last["step"] == 2
  assert 0 <= last["score"] <= 100
