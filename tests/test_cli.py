"""Commands as users meet them: a user error ends with one `error:` line and exit status 2, before any work."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

import tiny_training

REPO = tiny_training.REPO


def _command(*args: str, timeout: int = 240) -> subprocess.CompletedProcess:
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": REPO, "CCFNET_DISTRIBUTED": "0"}
  return subprocess.run([sys.executable, *args], cwd=REPO, capture_output=True, text=True, timeout=timeout, env=env)


def _one_error_line(done: subprocess.CompletedProcess) -> str:
  assert done.returncode == 2, (done.stdout + done.stderr)[-3000:]
  assert "Traceback" not in done.stderr, done.stderr[-3000:]
  lines = [line for line in done.stderr.splitlines() if line.startswith("error:")]
  assert len(lines) == 1, done.stderr[-3000:]
  return lines[0]


def test_predict_refuses_an_empty_or_missing_studies_folder(tmp_path):
  (tmp_path / "empty").mkdir()
  line = _one_error_line(_command("-m", "ccfnet_jax.predict", f"--workdir={tmp_path}", f"--studies={tmp_path}/empty",
                                  f"--output={tmp_path}/p.json"))
  assert "no study folder" in line and "empty" in line
  line = _one_error_line(_command("-m", "ccfnet_jax.predict", f"--workdir={tmp_path}", f"--studies={tmp_path}/gone",
                                  f"--output={tmp_path}/p.json"))
  assert "gone" in line and "no such directory" in line


def test_predict_and_export_refuse_an_unwritable_output_before_loading_a_model(tmp_path):
  (tmp_path / "study1").mkdir()
  (tmp_path / "study1" / "image0.dcm").write_bytes(b"x")
  blocker = tmp_path / "blocker"
  blocker.write_text("a file where a folder is needed")
  line = _one_error_line(_command("-m", "ccfnet_jax.predict", f"--workdir={tmp_path}/no_run", f"--studies={tmp_path}",
                                  f"--output={blocker}/preds.json"))
  assert "cannot write" in line and "blocker" in line
  line = _one_error_line(_command("-m", "ccfnet_jax.export", f"--workdir={tmp_path}/no_run",
                                  f"--output={blocker}/model.jaxexport"))
  assert "cannot write" in line


def test_a_path_without_a_run_is_one_clear_line(tmp_path):
  (tmp_path / "study1").mkdir()
  line = _one_error_line(_command("-m", "ccfnet_jax.predict", f"--workdir={tmp_path}", f"--studies={tmp_path}",
                                  f"--output={tmp_path}/p.json"))
  assert "no checkpoint found" in line


def test_run_refuses_a_bad_config_value_naming_it(tmp_path):
  line = _one_error_line(_command("run.py", "--config=configs/demo.py", "--config.num_steps=-3",
                                  f"--workdir={tmp_path}/run"))
  assert "config.num_steps = -3" in line
  assert not (tmp_path / "run" / "tensorflow_datasets").exists()
  line = _one_error_line(_command("run.py", "--config=configs/demo.py", "--config.schedule=linear",
                                  f"--workdir={tmp_path}/run"))
  assert "config.schedule = 'linear'" in line


@pytest.mark.parametrize("old,new", [("--out", "--output"), ("--source", "--dataset"), ("--n", "--num_pictures")])
def test_render_names_the_new_spelling_of_a_renamed_flag(tmp_path, old, new):
  done = _command("-m", "ccfnet_jax.render", f"{old}=x", f"--output={tmp_path}/r.png")
  assert done.returncode != 0 and new in (done.stderr + done.stdout)


@pytest.mark.parametrize("old,new", [("--config", "--dataset"), ("--num_studies", "--phantom_studies")])
def test_tfds_build_names_the_new_spelling_of_a_renamed_flag(tmp_path, old, new):
  done = _command("-m", "tfds_spine.build", f"{old}=phantom", f"--data_dir={tmp_path}")
  assert done.returncode != 0 and new in (done.stderr + done.stdout)
