"""Two processes on localhost (jax.distributed, 2 fake CPU devices each) train like one process on 4 devices."""

from __future__ import annotations

import json
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest

import tiny_training
from test_train import _restore_params, finish, launch, phantom_data_dir, subprocess_env  # noqa: F401  (fixture)


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


@pytest.mark.slow
def test_two_processes_agree_with_one(tmp_path, phantom_data_dir):  # noqa: F811
  overrides = {"data_dir": phantom_data_dir, "num_steps": 3, "eval_every_steps": 3}
  port = _free_port()
  multi = tmp_path / "two_processes"
  processes = [launch(multi, overrides, num_devices=2,
                      extra_args=(f"--coordinator_address=localhost:{port}", "--num_processes=2",
                                  f"--process_id={i}"))
               for i in range(2)]
  outputs = [finish(p) for p in processes]
  assert "4 devices on 2 process(es)" in outputs[0]

  single = tmp_path / "one_process"
  env = subprocess_env(4)
  # No emulation of the hosts' data order: the global batches do not depend on the number of processes.
  args = [sys.executable, str(tiny_training.REPO) + "/tests/tiny_training.py",
          *tiny_training.config_flags_of(overrides), f"--workdir={single}"]
  out = subprocess.run(args, cwd=tiny_training.REPO, env=env, capture_output=True, text=True, timeout=300)
  assert out.returncode == 0, (out.stdout + out.stderr)[-4000:]
  assert "4 devices on 1 process(es)" in out.stdout

  config = tiny_training.tiny_config(**overrides)
  a, _ = _restore_params(str(multi), 0, 3, config)
  b, _ = _restore_params(str(single), 0, 3, config)
  for x, y in zip(jax.tree.leaves((a.params, a.batch_stats)), jax.tree.leaves((b.params, b.batch_stats))):
    np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-6)
  results_multi = json.loads((multi / "results.json").read_text())["folds"]["0"]["last"]
  results_single = json.loads((single / "results.json").read_text())["folds"]["0"]["last"]
  for key, value in results_single.items():
    assert results_multi[key] == pytest.approx(value, abs=1e-3), key
