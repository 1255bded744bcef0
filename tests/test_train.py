"""The training loop: learning, evaluation in native pixels, schedules, results.json, NaN stop, resume after SIGKILL."""

from __future__ import annotations

import json
import math
import os
import pathlib
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import tiny_training
from ccfnet_jax import checkpoint as checkpoint_lib
from ccfnet_jax import maps as maps_lib
from ccfnet_jax import config as config_lib
from ccfnet_jax import forward, logging_utils, losses, metrics, objects, parallel, rundir, schedules, targets, train
from ccfnet_jax.train import loop, results as results_lib, setup

REPO = pathlib.Path(tiny_training.REPO)


@pytest.fixture(scope="session")
def phantom_data_dir(tmp_path_factory) -> str:
  """A 16-study phantom `lumbar_spine` dataset built once for the session (subprocesses read it, never build it)."""
  import tfds_spine  # pylint: disable=g-import-not-at-top
  path = str(tmp_path_factory.mktemp("tfds"))
  tfds_spine.prepare("phantom", path, num_studies=16, seed=0)
  return path


# ---------------------------------------------------------------------------------------------------------------
# Pure pieces.
# ---------------------------------------------------------------------------------------------------------------


def test_parse_folds():
  assert config_lib.parse_folds("all", 4) == [0, 1, 2, 3]
  assert config_lib.parse_folds("2", 4) == [2]
  assert config_lib.parse_folds(3, 4) == [3]
  assert config_lib.parse_folds("0,2", 4) == [0, 2]
  assert config_lib.parse_folds("none", 4) is None
  for bad in ("4", "-1", "x", "1,1", ""):
    with pytest.raises(ValueError, match="config.fold"):
      config_lib.parse_folds(bad, 4)


def test_warm_restart_schedule_follows_sgdr():
  peak, floor, t0 = 3e-4, 5e-5, 10
  schedule = schedules.cosine_warm_restarts(peak, floor, t0, 2, total_steps=70)  # cycles of 10, 20, 40 steps

  def expected(step):  # SGDR written out independently: find the cycle, then the cosine inside it
    start, length = 0, t0
    while step >= start + length:
      start, length = start + length, length * 2
    return floor + (peak - floor) * (1 + math.cos(math.pi * (step - start) / length)) / 2

  for step in (0, 1, 5, 9, 10, 11, 20, 29, 30, 50, 69):
    assert float(schedule(step)) == pytest.approx(expected(step), rel=1e-5), step
  assert float(schedule(10)) == pytest.approx(peak) and float(schedule(30)) == pytest.approx(peak)
  one = schedules.cosine_to_floor(peak, floor, 100)
  assert float(one(0)) == pytest.approx(peak) and float(one(100)) == pytest.approx(floor)
  assert float(one(50)) == pytest.approx((peak + floor) / 2, rel=1e-5)


def test_warmup_then_one_cosine_spans_the_run():
  peak, floor, warm, total = 1e-3, 5e-5, 50, 3000
  schedule = schedules.create_schedule("cosine", peak_lr=peak, min_lr=floor, total_steps=total, steps_per_epoch=140,
                                       warmup_steps=warm)

  def expected(step):  # a line from 0 to the peak, then the cosine over the steps that are left
    if step < warm:
      return peak * step / warm
    t = min(step - warm, total - warm) / (total - warm)
    return floor + (peak - floor) * (1 + math.cos(math.pi * t)) / 2

  for step in (0, 1, 25, 49, 50, 51, 1525, 2999, 3000, 3500):
    assert float(schedule(step)) == pytest.approx(expected(step), rel=1e-5, abs=1e-12), step
  assert float(schedule(0)) == 0.0 and float(schedule(total)) == pytest.approx(floor)


def test_steps_per_epoch_is_ten_passes():
  config = tiny_training.tiny_config(batch_size=32)
  assert setup.steps_per_epoch(config, 112) == 35  # 10 * 112 / 32
  config.num_epochs = 60
  assert setup.total_steps(config, setup.steps_per_epoch(config, 112)) == 2100
  config.num_steps = 7
  assert setup.total_steps(config, 35) == 7


def test_summarize_history_and_results_schema(tmp_path):
  history = [dict(disc_recall=50.0, vertebra_recall=60.0, disc_auc=70.0, vertebra_auc=80.0, score=41.25, epoch=1,
                  step=10),
             dict(disc_recall=90.0, vertebra_recall=80.0, disc_auc=60.0, vertebra_auc=70.0, score=55.25, epoch=2,
                  step=20),
             dict(disc_recall=85.0, vertebra_recall=85.0, disc_auc=60.0, vertebra_auc=60.0, score=51.0, epoch=3,
                  step=30)]
  summary = results_lib.summarize_history(history)
  assert summary["best"]["epoch"] == 2 and summary["best"]["score"] == 55.25
  assert summary["last"]["epoch"] == 3 and summary["last"]["disc_recall"] == 85.0

  # Four folds whose best/last scores are 10, 20, 30, 40 + k: mean 25 (+ k), std (ddof 0) sqrt(125).
  for k in range(4):
    result = {which: {m: 10.0 * (k + 1) + offset for m in metrics.METRIC_NAMES} | {"epoch": k, "step": 5 * k}
              for which, offset in (("best", 1.0), ("last", 0.0))}
    os.makedirs(tmp_path / f"fold_{k}")
    (tmp_path / f"fold_{k}" / "results.json").write_text(json.dumps(result | {"params": 123}))
    collected = results_lib.collect_results(tmp_path, 4)
    assert sorted(collected["folds"]) == [str(i) for i in range(k + 1)]
    assert ("mean" in collected) == (k == 3)
  assert set(collected) == {"folds", "mean", "std"}
  assert set(collected["folds"]["2"]) == {"best", "last"}
  assert set(collected["folds"]["2"]["best"]) == set(metrics.METRIC_NAMES) | {"epoch", "step"}
  for which, offset in (("best", 1.0), ("last", 0.0)):
    for m in metrics.METRIC_NAMES:
      assert collected["mean"][which][m] == pytest.approx(25.0 + offset)
      assert collected["std"][which][m] == pytest.approx(math.sqrt(125.0))
  table = results_lib.format_table(collected, tiny_training.tiny_config(), 4_833_581)
  assert "4-fold mean ± std" in table and "26.00 ± 11.18" in table and "| 4.83 |" in table


def test_metric_writer_progress_and_resumed_logs(tmp_path, monkeypatch):
  writer = logging_utils.MetricWriter(tmp_path, enabled=True)
  for step, loss in ((1, 0.5), (2, 0.4), (2, 0.3)):  # step 2 written twice, as after a resume
    writer.write(step, "train", {"loss": np.float32(loss), "learning_rate": jnp.asarray(1e-3)})
  writer.close()
  records = logging_utils.read_metrics(tmp_path / rundir.METRICS_FILE)
  assert [(r["step"], r["loss"]) for r in records] == [(1, 0.5), (2, pytest.approx(0.3))]
  assert any(name.startswith("events.out.tfevents") for name in os.listdir(tmp_path / "tensorboard"))
  lines = []

  class Stream:
    def write(self, text):
      lines.append(text)

    def flush(self):
      pass

  clock = iter([1000.0, 1010.0])  # 20 steps in 10 s: 2 steps/s, 16 img/s, 80 steps left -> 40 s
  monkeypatch.setattr(logging_utils.time, "perf_counter", lambda: next(clock))
  progress = logging_utils.Progress(100, 0, batch_size=8, stream=Stream(), enabled=True)
  line = progress.update(20, {"loss": 0.25})
  assert "step 20/100" in line and "2.00 steps/s" in line and "16.0 img/s" in line and "ETA 40s" in line
  assert lines and "loss 0.25" in lines[0]
  assert logging_utils.format_duration(3725) == "1h02m05s"


# ---------------------------------------------------------------------------------------------------------------
# Steps.
# ---------------------------------------------------------------------------------------------------------------


def test_loss_decreases_on_a_fixed_batch():
  config = tiny_training.tiny_config(learning_rate=3e-3)
  for name in ("rotate_prob", "shift_prob", "zoom_prob", "flip_prob", "intensity_prob", "bias_prob"):
    config.augment[name] = 0.0
  config.augment.point_jitter = False
  mesh = parallel.make_mesh()
  step, state, args, _ = tiny_training.jit_step(config, mesh)
  batch = tiny_training.stacked_global([tiny_training.fake_batch(8)], mesh)
  losses = []
  for _ in range(25):
    state, scalars = step(state, batch, args)
    losses.append(float(scalars["loss"][0]))
  assert all(np.isfinite(losses))
  assert np.mean(losses[-5:]) < 0.7 * np.mean(losses[:3]), losses
  assert int(state.step[0]) == 25


def test_mixed_precision_keeps_float32_parameters():
  config = tiny_training.tiny_config(mixed_precision=True)
  mesh = parallel.make_mesh()
  step, state, args, _ = tiny_training.jit_step(config, mesh)
  state, scalars = step(state, tiny_training.stacked_global([tiny_training.fake_batch(8)], mesh), args)
  assert np.isfinite(float(scalars["loss"][0]))
  assert {x.dtype for x in jax.tree.leaves((state.params, state.batch_stats, state.opt_state))
          if jnp.issubdtype(x.dtype, jnp.floating)} == {jnp.dtype(jnp.float32)}


def test_learning_rate_is_the_traced_schedule_of_each_fold():
  """The rate logged (and applied) at each step is the fold's own table entry: two stacked folds with different
  schedules train with their own rates in one compiled step."""
  config = tiny_training.tiny_config(schedule="cosine", learning_rate=1e-3, min_learning_rate=1e-4)
  mesh = parallel.make_mesh(jax.devices()[:1])
  step, state, args, _ = tiny_training.jit_step(config, mesh, folds=(0, 1))
  short = setup.learning_rates(config, 4, 1, 100)  # the second fold: a 4-step cosine, then the floor
  args = args._replace(learning_rate=parallel.replicate(np.stack([np.asarray(args.learning_rate[0]), short]), mesh))
  batch = tiny_training.stacked_global([tiny_training.fake_batch(8, seed=s) for s in (0, 1)], mesh)
  logged = []
  for _ in range(6):
    state, scalars = step(state, batch, args)
    logged.append(np.asarray(scalars["learning_rate"]))
  logged = np.stack(logged)  # [steps, folds]
  cosine = [1e-4 + (1e-3 - 1e-4) * (1 + math.cos(math.pi * t / 4)) / 2 for t in range(4)] + [1e-4, 1e-4]
  np.testing.assert_allclose(logged[:, 1], cosine, rtol=1e-5)
  assert logged[0, 0] == pytest.approx(1e-3) and logged[5, 0] > logged[5, 1]


class _ConstantMaps(nnx.Module):
  """Ignores its input and returns fixed maps: the encoded targets of fixed points (a perfect 'prediction')."""

  def __init__(self, points_xy, image_size, stride=16):
    self.stride = stride
    self.image_size = image_size
    self.points_xy = tuple(tuple(float(v) for v in p) for p in points_xy)  # static
    self.unused = nnx.Param(jnp.zeros(()))

  def __call__(self, x):
    n = objects.NUM_OBJECTS
    points = jnp.broadcast_to(jnp.asarray(self.points_xy, jnp.float32), (x.shape[0], n, 2))
    encoded = targets.encode(points, jnp.ones((x.shape[0], n), bool), (self.image_size, self.image_size),
                             self.stride).maps
    return maps_lib.Maps(*(m + 0.0 * self.unused[...] for m in encoded))


def test_evaluation_maps_predictions_to_native_pixels_and_millimetres():
  """A model that always predicts the same points: recall 100 % when the native ground truth is those points
  scaled by native/input size, 0 % when it is 7 mm away (hit radius 6 mm)."""
  size, native = 128, np.asarray([300, 200])  # native H, W differ: x and y scale differently
  rng = np.random.default_rng(1)
  points_input = np.stack([rng.uniform(10, 118, 11), rng.uniform(10, 118, 11)], -1).astype(np.float32)
  model = _ConstantMaps(points_input, size)
  mesh = parallel.make_mesh()
  _, eval_graphdef, state = setup.init_state(model, 0.0)
  jit_eval = loop.jit_eval_step(mesh, eval_graphdef, forward.EvalOptions(flip_tta=False))
  spacing = np.asarray([0.5, 0.8], np.float32)  # (row, col) mm
  gt_native = points_input * np.asarray([native[1] / size, native[0] / size], np.float32)  # x * W/S, y * H/S

  def record(shift_mm_x):
    n = objects.NUM_OBJECTS
    return {"image": np.zeros((native[0], native[1], 3), np.uint16), "pixel_spacing_mm": spacing,
            "points_xy": (gt_native + [shift_mm_x / spacing[1], 0]).astype(np.float32),
            "point_valid": np.ones(n, bool), "disease": (np.arange(n) % 2).astype(np.int32),
            "tags": np.asarray([""] * n), "study_uid": "s", "series_uid": "r", "instance_uid": "i"}

  state = parallel.replicate(state, mesh)
  exact = loop.evaluate(jit_eval, state, loop.eval_batches([record(0.0)] * 10, batch_size=8, image_size=size,
                                                          mesh=mesh))
  assert exact["disc_recall"] == pytest.approx(100.0) and exact["vertebra_recall"] == pytest.approx(100.0)
  off = loop.evaluate(jit_eval, state, loop.eval_batches([record(7.0)] * 3, batch_size=8, image_size=size, mesh=mesh))
  assert off["disc_recall"] == 0.0 and off["vertebra_recall"] == 0.0


# ---------------------------------------------------------------------------------------------------------------
# Whole folds (tiny model, small phantom).
# ---------------------------------------------------------------------------------------------------------------


def _restore_params(workdir, fold, step, config):
  """Parameters of checkpoint `step` of a run, restored on one device."""
  mesh = parallel.make_mesh(jax.devices()[:1])
  _, _, state = tiny_training.initial_state(config)
  with checkpoint_lib.Checkpointer(rundir.checkpoints_dir(workdir, fold)) as ckpt:
    restored, extra = ckpt.restore(step, checkpoint_lib.abstract_like(state, parallel.replicated_sharding(mesh)))
  return parallel.to_host(restored), extra


def test_train_fold_writes_results_logs_and_checkpoints(tmp_path, phantom_data_dir, capsys):
  config = tiny_training.tiny_config(data_dir=phantom_data_dir, num_steps=4, eval_every_steps=2, fold="1",
                                     keep_checkpoints=1, phantom_dicom_studies=2)
  results = train.train_and_evaluate(config, str(tmp_path))
  # The run says where things are and what to try next, on new phantom studies written as DICOM.
  out = capsys.readouterr().out
  studies = tmp_path / "phantom_dicom" / "lumbar_phantom"
  assert sorted(p.name for p in studies.iterdir()) == ["study16", "study17"]  # after the 16 training phantoms
  assert f"python -m ccfnet_jax.predict --workdir={tmp_path} --studies={studies}" in out
  assert f"checkpoints: {tmp_path}/fold_1/checkpoints" in out
  fold_dir = tmp_path / "fold_1"
  on_disk = json.loads((tmp_path / "results.json").read_text())
  assert on_disk == json.loads(json.dumps(results))
  assert set(on_disk) == {"folds"} and set(on_disk["folds"]) == {"1"}
  assert on_disk["folds"]["1"]["last"]["step"] == 4
  assert set(on_disk["folds"]["1"]["best"]) == set(metrics.METRIC_NAMES) | {"epoch", "step"}
  lines = [json.loads(line) for line in (fold_dir / "metrics.jsonl").read_text().splitlines()]
  assert [r["step"] for r in lines if r["split"] == "train"] == [1, 2, 3, 4]
  assert [r["step"] for r in lines if r["split"] == "eval"] == [2, 4]
  assert any(name.startswith("events.out.tfevents") for name in os.listdir(fold_dir / "tensorboard"))
  # keep 1 recent + the best by score (the earliest on a tie): step 4 always; step 2 too unless step 4 scored higher.
  kept = sorted(int(s) for s in os.listdir(fold_dir / "checkpoints") if s.isdigit())
  evals = {r["step"]: r["score"] for r in lines if r["split"] == "eval"}
  assert kept == ([2, 4] if evals[2] >= evals[4] else [4])
  assert on_disk["folds"]["1"]["best"]["step"] == (2 if evals[2] >= evals[4] else 4)  # the one kept
  _, extra = _restore_params(str(tmp_path), 1, 4, config)
  assert [h["step"] for h in extra["evals"]] == [2, 4] and "data_iterator" in extra
  # pos_weight from the TRAINING folds' labels (folds 0, 2, 3 here), counted independently.
  train_source = setup.open_fold(config, 1, str(tmp_path)).train_source
  disease = np.stack([np.asarray(train_source[i]["disease"]) for i in range(len(train_source))])
  expected = [losses.class_balanced_pos_weight(int(np.sum(d == 0)), int(np.sum(d == 1)))
              for d in (disease[:, list(objects.VERTEBRA_INDICES)], disease[:, list(objects.DISC_INDICES)])]
  config_line = next(r for r in lines if r["split"] == "config")
  assert [config_line["pos_weight_vertebra"], config_line["pos_weight_disc"]] == pytest.approx(expected)
  assert len(train_source) == 12  # 16 studies, 4 folds
  # A finished fold is not retrained: a second call restores the final checkpoint and reports the same results.
  again = train.train_and_evaluate(config, str(tmp_path))
  assert again == results


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, phantom_data_dir):
  config = tiny_training.tiny_config(data_dir=phantom_data_dir, num_steps=4, eval_every_steps=100,
                                     checkpoint_every_steps=2)
  train.train_and_evaluate(config, str(tmp_path))
  good, _ = _restore_params(str(tmp_path), 0, 4, config)
  # Continue the run with an absurd learning rate: parameters blow up, the loss becomes inf/NaN within 2 steps.
  config.learning_rate = 1e30
  config.num_steps = 12
  with pytest.raises(train.TrainingDivergedError, match=r"fold 0: the training loss is (nan|inf|-inf) at step"):
    train.train_and_evaluate(config, str(tmp_path), allow_config_change=True)
  with checkpoint_lib.Checkpointer(tmp_path / "fold_0" / "checkpoints") as ckpt:
    assert ckpt.latest_step() == 4
  after, _ = _restore_params(str(tmp_path), 0, 4, config)
  for a, b in zip(jax.tree.leaves(good.params), jax.tree.leaves(after.params)):
    assert np.array_equal(a, b) and np.all(np.isfinite(a))


# ---------------------------------------------------------------------------------------------------------------
# Resume after SIGKILL (subprocesses running run.py's entry with the tiny model).
# ---------------------------------------------------------------------------------------------------------------


def subprocess_env(num_devices: int) -> dict[str, str]:
  env = dict(os.environ)
  env.update(XLA_FLAGS=f"--xla_force_host_platform_device_count={num_devices}", JAX_PLATFORMS="cpu",
             JAX_COMPILATION_CACHE_DIR=str(REPO / ".cache" / "jax"), CCFNET_DISTRIBUTED="0",
             PYTHONPATH=str(REPO))
  return env


def launch(workdir, overrides: dict, num_devices: int = 2, extra_args=()) -> subprocess.Popen:
  args = [sys.executable, str(REPO / "tests" / "tiny_training.py"), *tiny_training.config_flags_of(overrides),
          f"--workdir={workdir}", *extra_args]
  return subprocess.Popen(args, cwd=REPO, env=subprocess_env(num_devices), stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True)


def finish(process: subprocess.Popen, timeout: float = 300) -> str:
  out, _ = process.communicate(timeout=timeout)
  assert process.returncode == 0, out[-4000:]
  return out


def _train_steps_logged(workdir) -> int:
  path = os.path.join(workdir, "fold_0", "metrics.jsonl")
  if not os.path.exists(path):
    return 0
  with open(path, encoding="utf-8") as f:
    steps = [json.loads(line)["step"] for line in f if '"split": "train"' in line]
  return max(steps, default=0)


def _committed_checkpoints(workdir, folds=(0,)) -> list[int]:
  """The checkpoint steps every fold of `folds` has committed."""
  committed = []
  for fold in folds:
    path = os.path.join(workdir, f"fold_{fold}", "checkpoints")
    committed.append({int(name) for name in os.listdir(path) if name.isdigit()} if os.path.isdir(path) else set())
  return sorted(set.intersection(*committed))


@pytest.mark.slow
@pytest.mark.parametrize("stacked", [False, True], ids=["sequential", "stacked"])
def test_resume_after_sigkill_ends_bitwise_equal_to_an_uninterrupted_run(tmp_path, phantom_data_dir, stacked):
  overrides = {"data_dir": phantom_data_dir, "num_steps": 12, "eval_every_steps": 6, "checkpoint_every_steps": 3}
  if stacked:
    overrides.update(fold="0,1", parallel_folds=True)
  folds = (0, 1) if stacked else (0,)
  config = tiny_training.tiny_config(**overrides)
  straight = tmp_path / "straight"
  interrupted = tmp_path / "interrupted"
  first = launch(straight, overrides)
  finish(first)

  victim = launch(interrupted, overrides)
  deadline = time.time() + 240
  # Kill between checkpoints: once a checkpoint is committed (its directory renamed from the temporary name) and
  # the run has taken further steps.
  while not (_committed_checkpoints(interrupted, folds) and
             _train_steps_logged(interrupted) > max(_committed_checkpoints(interrupted, folds))):
    assert victim.poll() is None, victim.communicate()[0][-4000:]
    assert time.time() < deadline, "the run to be killed made no progress"
    time.sleep(0.02)
  victim.send_signal(signal.SIGKILL)
  victim.communicate()
  resume_step = max(_committed_checkpoints(interrupted, folds))
  assert resume_step < 12 and _train_steps_logged(interrupted) > resume_step
  out = finish(launch(interrupted, overrides))
  assert f"resumed from step {resume_step}" in out

  for fold in folds:
    a, extra_a = _restore_params(str(straight), fold, 12, config)
    b, extra_b = _restore_params(str(interrupted), fold, 12, config)
    for x, y in zip(jax.tree.leaves((a.params, a.batch_stats, a.opt_state)),
                    jax.tree.leaves((b.params, b.batch_stats, b.opt_state))):
      assert np.array_equal(x, y)
    assert extra_a["evals"] == extra_b["evals"]
  results_a = json.loads((straight / "results.json").read_text())
  results_b = json.loads((interrupted / "results.json").read_text())
  assert results_a == results_b


@pytest.mark.slow
def test_checkpoint_from_8_devices_resumes_on_2(tmp_path, phantom_data_dir):
  """A run checkpointed on 8 devices continues on 2 (another process with another device count)."""
  overrides = {"data_dir": phantom_data_dir, "num_steps": 3, "eval_every_steps": 3}
  finish(launch(tmp_path, overrides, num_devices=8))
  overrides["num_steps"] = 5
  out = finish(launch(tmp_path, overrides, num_devices=2, extra_args=["--allow_config_change"]))
  assert "resumed from step 3" in out and "2 devices on 1 process" in out
  restored, _ = _restore_params(str(tmp_path), 0, 5, tiny_training.tiny_config(**overrides))
  assert int(restored.step) == 5
