"""Resume that checks what it resumes: another config is refused, a damaged newest checkpoint is replaced by the one
before, and a run killed at random moments (during steps, evaluations and checkpoint writes) ends bitwise equal to
an uninterrupted one, for folds trained in turn and stacked."""

from __future__ import annotations

import glob
import json
import os
import random
import time

import jax
import numpy as np
import pytest

import tiny_training
from ccfnet_jax import rundir, train
from test_train import _restore_params, _train_steps_logged, finish, launch, phantom_data_dir  # noqa: F401


def test_a_changed_config_is_refused_unless_allowed_and_the_first_config_is_kept(tmp_path, phantom_data_dir):  # noqa: F811
  overrides = {"data_dir": phantom_data_dir, "num_steps": 2, "eval_every_steps": 2}
  finish(launch(tmp_path, overrides))
  first = (tmp_path / rundir.CONFIG_FILE).read_text()
  # A field that does not change the model (logging) is accepted; the recorded config stays the first one.
  finish(launch(tmp_path, {**overrides, "log_every_steps": 5}))
  assert (tmp_path / rundir.CONFIG_FILE).read_text() == first
  changed = launch(tmp_path, {**overrides, "learning_rate": 5e-3, "augment.rotate_prob": 0.5})
  out, _ = changed.communicate(timeout=300)
  assert changed.returncode == 2, out[-3000:]
  error_lines = [line for line in out.splitlines() if line.startswith("error:")]
  assert len(error_lines) == 1 and "Traceback" not in out
  assert "learning_rate: 0.001 -> 0.005" in error_lines[0] and "augment.rotate_prob: 0.8 -> 0.5" in error_lines[0]
  assert (tmp_path / rundir.CONFIG_FILE).read_text() == first
  assert not (tmp_path / rundir.CONFIG_CHANGES_FILE).exists()
  out = finish(launch(tmp_path, {**overrides, "learning_rate": 5e-3}, extra_args=["--allow_config_change"]))
  assert "continuing" in out and (tmp_path / rundir.CONFIG_FILE).read_text() == first
  recorded = [json.loads(line) for line in (tmp_path / rundir.CONFIG_CHANGES_FILE).read_text().splitlines()]
  assert recorded[0]["changes"] == [["learning_rate", 0.001, 0.005]]


def _damage(step_dir: str) -> None:
  """Garbles every array file of a checkpoint's state (Orbax still lists the step as committed)."""
  files = [p for p in glob.glob(os.path.join(step_dir, "state", "**", "*"), recursive=True)
           if os.path.isfile(p) and "/d/" in p]
  assert files, os.listdir(os.path.join(step_dir, "state"))
  for path in files:
    with open(path, "wb") as f:
      f.write(b"\x00garbled\x00" * 3)


def test_a_damaged_newest_checkpoint_is_set_aside_and_the_one_before_is_used(tmp_path, phantom_data_dir,  # noqa: F811
                                                                             capsys):
  config = tiny_training.tiny_config(data_dir=phantom_data_dir, num_steps=4, eval_every_steps=2,
                                     checkpoint_every_steps=2, keep_checkpoints=3)
  train.train_and_evaluate(config, str(tmp_path / "straight"))
  workdir = tmp_path / "damaged"
  train.train_and_evaluate(config, str(workdir))
  _damage(rundir.checkpoints_dir(workdir, 0) + "/4")
  capsys.readouterr()
  # Relaunch: step 4 cannot be restored, step 2 can; training redoes steps 3-4 and ends where the straight run did.
  train.train_and_evaluate(config, str(workdir))
  out = capsys.readouterr().out
  assert "checkpoint step 4 cannot be restored" in out and "resumed from step 2" in out
  assert len(os.listdir(workdir / "fold_0" / "damaged_checkpoints")) == 1  # kept for inspection, not deleted
  a, _ = _restore_params(str(tmp_path / "straight"), 0, 4, config)
  b, _ = _restore_params(str(workdir), 0, 4, config)
  for x, y in zip(jax.tree.leaves((a.params, a.batch_stats, a.opt_state)),
                  jax.tree.leaves((b.params, b.batch_stats, b.opt_state))):
    assert np.array_equal(x, y)


@pytest.mark.slow
@pytest.mark.parametrize("stacked", [False, True], ids=["sequential", "stacked"])
def test_kills_at_random_moments_end_bitwise_equal_to_an_uninterrupted_run(tmp_path, phantom_data_dir,  # noqa: F811
                                                                          stacked):
  """SIGKILL at seeded random times, again and again, resuming each time: most of the run's time is spent in
  evaluations and checkpoint writes (every step is checkpointed, every other evaluated), so kills land there too."""
  overrides = {"data_dir": phantom_data_dir, "num_steps": 10, "eval_every_steps": 2, "checkpoint_every_steps": 1,
               "keep_checkpoints": 2}
  folds = (0, 1) if stacked else (0,)
  if stacked:
    overrides.update(fold="0,1", parallel_folds=True)
  finish(launch(tmp_path / "straight", overrides))
  rng = random.Random(1234 + stacked)
  killed, launches = 0, 0
  workdir = tmp_path / "killed"
  while True:
    launches += 1
    process = launch(workdir, overrides)
    if killed >= 6:  # enough kills: let it finish
      finish(process)
      break
    # A random moment: a few steps past where the run stands, then a random fraction of a second more, which
    # falls in the step, the evaluation or the checkpoint write that follows.
    target = _train_steps_logged(workdir) + rng.randint(1, 3)
    while process.poll() is None and _train_steps_logged(workdir) < target:
      time.sleep(0.005)
    time.sleep(rng.uniform(0.0, 0.4))
    if process.poll() is not None:
      out, _ = process.communicate()
      assert process.returncode == 0, out[-3000:]
      break
    process.kill()
    process.communicate()
    killed += 1
  assert killed >= 3, (killed, launches)
  straight = json.loads((tmp_path / "straight" / rundir.RESULTS_FILE).read_text())
  assert json.loads((workdir / rundir.RESULTS_FILE).read_text()) == straight
  config = tiny_training.tiny_config(**overrides)
  for fold in folds:
    a, extra_a = _restore_params(str(tmp_path / "straight"), fold, 10, config)
    b, extra_b = _restore_params(str(workdir), fold, 10, config)
    for x, y in zip(jax.tree.leaves((a.params, a.batch_stats, a.opt_state)),
                    jax.tree.leaves((b.params, b.batch_stats, b.opt_state))):
      assert np.array_equal(x, y)
    assert extra_a["evals"] == extra_b["evals"]
  print(f"{killed} kills survived in {launches} launches")
