"""benchmarks/gpu.sh, the one-call accelerator benchmark, runs end to end at toy sizes on a CPU."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

import tiny_training
from conftest import require


@pytest.mark.slow
def test_gpu_script_measures_everything_at_toy_sizes(tmp_path):
  try:
    import torch  # noqa: F401  pylint: disable=g-import-not-at-top,unused-import
    has_torch = True
  except ImportError:
    has_torch = False
  require(has_torch, "torch")
  # The suite's own 8 CPU devices (conftest's XLA_FLAGS) would not divide the toy batch: the script sees this
  # machine as a user's shell does.
  env = {key: value for key, value in os.environ.items() if key != "XLA_FLAGS"}
  env.update(PYTHON=sys.executable, JAX_PLATFORMS="cpu", CCFNET_DISTRIBUTED="0")
  done = subprocess.run(["bash", "benchmarks/gpu.sh", str(tmp_path), "--toy", "--models=r18_msc"],
                        cwd=tiny_training.REPO, env=env, capture_output=True, text=True, timeout=900)
  assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
  lines = [json.loads(line) for line in (tmp_path / "gpu.jsonl").read_text().splitlines()]
  by_metric = {}
  for line in lines:
    by_metric.setdefault(line["metric"], []).append(line)
  assert {line["dtype"] for line in by_metric["matmul_flops_per_s"]} == {"bfloat16", "float32"}
  assert {line["dtype"] for line in by_metric["jax_over_torch"]} == {"bfloat16", "float32"}
  assert all(line["value"] > 0 for line in by_metric["jax_over_torch"])
  assert by_metric["best_batch"][0]["value"] >= 2
  kinds = {line["folds"] for line in by_metric["projected_paper_schedule_hours"]}
  assert kinds == {"one after another", "2 stacked"}
  assert by_metric["folds_train_images_per_s"][0]["fold_batching"] == "vmap"
  assert {line["data_on_device"] for line in by_metric["loop_train_images_per_s"]} == {False, True}
  table = (tmp_path / "gpu.md").read_text()
  assert "| r18_msc | bfloat16 |" in table and "| r18_msc | float32 |" in table
