"""Smoke tests of the benchmark suite (ccfnet_jax.perf, behind `python -m ccfnet_jax.bench`): it runs at tiny size
and prints valid JSON lines. No timings are asserted (speed is measured by running the benchmark, never in tests)."""

from __future__ import annotations

import json
import math
import os
import pathlib
import subprocess
import sys
import textwrap

import pytest

import tiny_training
from ccfnet_jax.perf import suite, timing, train_step

REPO = pathlib.Path(__file__).resolve().parents[1]

EXPECTED = {
    "compile_s": "s", "train_images_per_s": "images/s", "train_step_ms": "ms", "flops_per_step": "FLOP",
    "achieved_flops_per_s": "FLOP/s", "infer_images_per_s": "images/s", "decode_us_per_batch": "us",
    "matmul_flops_per_s": "FLOP/s", "mfu": "fraction",
    "pipeline_images_per_s": "images/s", "peak_memory_bytes": "bytes",
}
CONTEXT = ("config", "model", "batch", "image_size", "dtype", "device", "platform", "num_devices")


def test_bench_prints_one_json_line_per_measurement(capsys):
  config = tiny_training.tiny_config()  # the tiny stand-in model at 128 px: compiles in seconds
  # Batch 8: the pipeline part shards its batches over all 8 test devices; the steps run on one device.
  returned = suite.run(config, suite.Options(batch_size=8, image_size=128, dtype="float32", steps=2, warmup=1,
                                              pipeline_studies=2, num_devices=1, config_name="tiny",
                                              matmul_size=256))
  printed = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
  assert printed == returned
  by_metric = {line["metric"]: line for line in printed}
  assert set(by_metric) == set(EXPECTED)
  for metric, unit in EXPECTED.items():
    line = by_metric[metric]
    assert line["unit"] == unit, metric
    assert isinstance(line["value"], (int, float)) and math.isfinite(line["value"]) and line["value"] > 0, metric
    assert all(key in line for key in CONTEXT), metric
    assert line["batch"] == 8 and line["image_size"] == 128 and line["dtype"] == "float32"
    assert line["num_devices"] == 1 and line["model"] == "R18-MSC"  # the label of config.model (depth 18, MSC)
  for metric in ("train_images_per_s", "infer_images_per_s", "decode_us_per_batch"):
    line = by_metric[metric]
    assert line["min_s"] <= line["median_s"] <= line["max_s"], metric
  train = by_metric["train_images_per_s"]
  assert train["n"] == 2 and train["value"] == pytest.approx(8 / train["median_s"])
  assert by_metric["train_step_ms"]["value"] == pytest.approx(1000 * train["median_s"])
  assert by_metric["achieved_flops_per_s"]["value"] == pytest.approx(
      by_metric["flops_per_step"]["value"] / train["median_s"])
  matmul = by_metric["matmul_flops_per_s"]
  assert matmul["size"] == 256 and matmul["value"] == pytest.approx(2 * 256 ** 3 / matmul["median_s"])
  assert by_metric["mfu"]["value"] == pytest.approx(
      by_metric["achieved_flops_per_s"]["value"] / matmul["value"])  # one device in this mesh


def test_bench_rejects_unknown_measurements_and_bad_sizes():
  with pytest.raises(ValueError, match="unknown measurement"):
    suite.Options(batch_size=8, image_size=128, steps=1, warmup=0, measure=["train", "speed"])
  with pytest.raises(ValueError, match="--steps"):
    suite.Options(batch_size=8, image_size=128, steps=0, warmup=0)
  with pytest.raises(ValueError, match="--fold_batching"):
    suite.Options(fold_batching="sideways")


def test_synthetic_batch_follows_the_pipeline_contract():
  batch = train_step.synthetic_batch(3, 128)
  assert batch["image"].shape == (3, 128, 128, 3) and 0 <= batch["image"].min() and batch["image"].max() <= 1
  assert batch["points_xy"].shape == (3, 11, 2) and batch["point_valid"].all()
  assert ((batch["points_xy"] > 0) & (batch["points_xy"] < 128)).all()
  assert set(batch["disease"].ravel().tolist()) <= {0, 1}


def test_flops_count_the_whole_step_on_a_data_parallel_mesh():
  # XLA's cost analysis sees one device's share of an SPMD step; the line must give the whole step's FLOPs.
  config = tiny_training.tiny_config()
  one, four = (train_step.build_steps(config, batch_size=8, image_size=128, augment=False, num_devices=n).flops
               for n in (1, 4))
  assert four == pytest.approx(one, rel=0.05)


def test_profile_lines_name_the_slowest_ops(tmp_path):
  config = tiny_training.tiny_config()
  lines = suite.run(config, suite.Options(batch_size=8, image_size=128, dtype="float32", steps=1, warmup=0,
                                           measure=["train"], num_devices=2, profile_dir=str(tmp_path / "trace"),
                                           profile_top=5))
  ops = [line for line in lines if line["metric"] == "op_ms"]
  assert 1 <= len(ops) <= 5 and [o["value"] for o in ops] == sorted((o["value"] for o in ops), reverse=True)
  assert {"op", "kind", "pass", "shape", "share"} <= set(ops[0])
  summary = {line["metric"]: line for line in lines if line["metric"].startswith("op_ms_by_")}
  assert set(summary) == {"op_ms_by_pass", "op_ms_by_kind"}
  assert sum(summary["op_ms_by_kind"]["by"].values()) == pytest.approx(summary["op_ms_by_kind"]["value"])
  assert "convolution" in summary["op_ms_by_kind"]["by"] and "forward" in summary["op_ms_by_pass"]["by"]


def test_bench_command_defines_its_flags_only_when_run_and_writes_output(tmp_path):
  # The command on the tiny model (registered first), in a fresh process: its CPU split is its own choice.
  script = textwrap.dedent(f"""
      import sys
      sys.path.insert(0, {str(REPO / "tests")!r})
      import tiny_training
      from absl import flags
      from ccfnet_jax import bench, cli
      assert "batch" not in flags.FLAGS and "config" not in flags.FLAGS, "importing the command defined flags"
      tiny_training.register()
      cli.run(bench.main, bench.define_flags)
  """)
  output = tmp_path / "lines" / "bench.jsonl"
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  env.update(JAX_COMPILATION_CACHE_DIR=str(REPO / ".cache" / "jax"), JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0.5")
  result = subprocess.run(
      [sys.executable, "-c", script, "--config=configs/default.py", f"--config.model.name={tiny_training.TINY}",
       "--batch=4", "--image_size=128", "--steps=1", "--warmup=0", "--measure=compile,train,memory",
       "--cpu_devices=2", f"--output={output}"],
      cwd=REPO, env=env, capture_output=True, text=True, timeout=600, check=False)
  assert result.returncode == 0, result.stderr[-3000:]
  written = [json.loads(line) for line in output.read_text().splitlines()]
  printed = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
  assert written == printed
  assert {line["metric"] for line in written} == {"compile_s", "train_images_per_s", "train_step_ms",
                                                  "flops_per_step", "achieved_flops_per_s", "peak_memory_bytes"}
  assert all(line["num_devices"] == 2 and line["config"] == "default.py" and line["batch"] == 4 for line in written)


def test_interleaved_alternates_rounds_after_warming_each_up():
  calls = []
  fns = {"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}
  seconds = timing.interleaved(fns, rounds=2, steps=2, warmup=1)
  assert calls == ["a", "b"] + ["a", "a", "b", "b"] * 2
  assert {name: {k: len(v) for k, v in s.items()} for name, s in seconds.items()} == {
      "a": {"wall_s": 4, "cpu_s": 4}, "b": {"wall_s": 4, "cpu_s": 4}}
  assert all(t >= 0 for s in seconds.values() for ts in s.values() for t in ts)
  with pytest.raises(ValueError, match="rounds"):
    timing.interleaved(fns, rounds=0, steps=1, warmup=0)
