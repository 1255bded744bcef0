"""Run-directory writes: atomic, never following a symlink planted in a shared folder, and clear when impossible."""

from __future__ import annotations

import json
import os

import pytest

from ccfnet_jax import logging_utils, rundir


def test_write_json_replaces_a_planted_symlink_instead_of_writing_through_it(tmp_path):
  victim = tmp_path / "victim.txt"
  victim.write_text("precious")
  for name in ("results.json", "results.json.tmp", "config.json"):
    os.symlink(victim, tmp_path / name)
  rundir.write_json(tmp_path / "results.json", {"a": 1})
  rundir.write_text(tmp_path / "config.json", "{}")
  assert victim.read_text() == "precious"
  assert not os.path.islink(tmp_path / "results.json") and json.loads((tmp_path / "results.json").read_text()) == {
      "a": 1}
  assert os.path.islink(tmp_path / "results.json.tmp")  # a predictable temporary name is not used
  assert [p for p in os.listdir(tmp_path) if p.endswith(".tmp") and p != "results.json.tmp"] == []


def test_appending_refuses_a_symlink(tmp_path):
  victim = tmp_path / "victim.txt"
  victim.write_text("precious")
  os.symlink(victim, tmp_path / rundir.METRICS_FILE)
  with pytest.raises(rundir.RunDirError, match="symlink"):
    logging_utils.MetricWriter(tmp_path, enabled=True)
  assert victim.read_text() == "precious"


def test_a_line_cut_by_a_kill_does_not_corrupt_the_next(tmp_path):
  path = tmp_path / rundir.METRICS_FILE
  path.write_text('{"step": 1, "split": "train", "loss": 0.5}\n{"step": 2, "spl')  # killed mid-line
  writer = logging_utils.MetricWriter(tmp_path, enabled=True)
  writer.write(2, "train", {"loss": 0.25})
  writer.close()
  with pytest.warns(UserWarning, match="cut short"):
    records = logging_utils.read_metrics(path)
  assert [(r["step"], r["loss"]) for r in records] == [(1, 0.5), (2, 0.25)]


def test_unwritable_places_are_reported_before_any_work(tmp_path):
  with pytest.raises(rundir.RunDirError, match="is a directory"):
    rundir.check_writable(tmp_path)
  locked = tmp_path / "locked"
  locked.mkdir()
  locked.chmod(0o500)
  try:
    if os.access(locked, os.W_OK):  # root ignores permissions: a file in its place blocks the folder instead
      locked.chmod(0o700)
      locked.rmdir()
      locked.write_text("a file where a folder is needed")
    with pytest.raises(rundir.RunDirError, match="cannot write"):
      rundir.check_writable(locked / "preds.json")
  finally:
    if locked.is_dir():
      locked.chmod(0o700)
  with pytest.raises(rundir.RunDirError, match="no such file"):
    rundir.read_json(tmp_path / "absent.json")
