"""Run logging: TensorBoard event files (tensorboardX, no TensorFlow), a JSON-lines metrics file, console progress.

Only process 0 writes files; every process may print progress (process 0 by default).
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
import warnings
from collections.abc import Mapping
from typing import Any, TextIO

import jax
import numpy as np

from ccfnet_jax import rundir


def _plain(value: Any) -> Any:
  """numpy / jax scalars -> Python floats/ints; other values unchanged."""
  if isinstance(value, (np.generic, np.ndarray, jax.Array)):
    array = np.asarray(value)
    return array.item() if array.ndim == 0 else array.tolist()
  return value


class MetricWriter:
  """Writes scalars to `<logdir>/tensorboard/` event files and one JSON object per line to `<logdir>/metrics.jsonl`.

  Each line: `{"step": int, "split": "train" | "eval", "time": unix seconds, <name>: value, ...}`. A resumed run
  appends; lines for steps after the checkpoint it resumed from may then appear twice (the later ones are current).
  A line cut short by a kill is closed with a newline before appending, so it never corrupts the next one.
  """

  def __init__(self, logdir: str | os.PathLike, *, enabled: bool | None = None):
    self.enabled = jax.process_index() == 0 if enabled is None else enabled
    self.logdir = os.fspath(logdir)
    self._tb = None
    self._jsonl: TextIO | None = None
    if self.enabled:
      from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top
      os.makedirs(self.logdir, exist_ok=True)
      self._tb = SummaryWriter(logdir=os.path.join(self.logdir, rundir.TENSORBOARD_DIR))
      path = os.path.join(self.logdir, rundir.METRICS_FILE)
      self._jsonl = rundir.open_append(path)
      if self._jsonl.tell() and not _ends_with_newline(path):
        self._jsonl.write("\n")

  def write(self, step: int, split: str, scalars: Mapping[str, Any]) -> None:
    """Logs `scalars` (name -> number) at `step` under `split` ('train' or 'eval')."""
    if not self.enabled:
      return
    values = {name: _plain(v) for name, v in scalars.items()}
    for name, value in values.items():
      if isinstance(value, (int, float)) and not isinstance(value, bool):
        self._tb.add_scalar(f"{split}/{name}", value, global_step=step)
    record = {"step": int(step), "split": split, "time": round(time.time(), 3), **values}
    self._jsonl.write(json.dumps(record, allow_nan=True) + "\n")
    self._jsonl.flush()

  def flush(self) -> None:
    if self.enabled:
      self._tb.flush()
      self._jsonl.flush()

  def close(self) -> None:
    if self.enabled:
      self._tb.close()
      self._jsonl.close()
      self.enabled = False


def _ends_with_newline(path: str) -> bool:
  with open(path, "rb") as f:
    f.seek(-1, os.SEEK_END)
    return f.read(1) == b"\n"


def read_metrics(path: str | os.PathLike) -> list[dict[str, Any]]:
  """The records of a `metrics.jsonl` file (a resumed run's later duplicates of a step override earlier ones).

  A line that a kill cut short (not JSON) is skipped with a warning; it held nothing the run did not log again.
  """
  latest: dict[tuple[int, str], dict[str, Any]] = {}
  with open(path, encoding="utf-8") as f:
    for line_number, line in enumerate(f, 1):
      if not line.strip():
        continue
      try:
        record = json.loads(line)
      except json.JSONDecodeError:
        warnings.warn(f"{path}:{line_number}: skipped a line cut short (not JSON)")
        continue
      latest[(int(record["step"]), str(record["split"]))] = record
  return [latest[key] for key in sorted(latest)]


def format_duration(seconds: float) -> str:
  """'1h02m03s', '4m05s' or '6s'."""
  if not math.isfinite(seconds):
    return "?"
  seconds = int(round(seconds))
  hours, rest = divmod(seconds, 3600)
  minutes, secs = divmod(rest, 60)
  if hours:
    return f"{hours}h{minutes:02d}m{secs:02d}s"
  return f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"


class Progress:
  """Console progress lines with steps/s (and images/s) over the last interval and the ETA of the run.

  Call `update(step, scalars)` at logging steps (after the host sync that fetched the scalars).
  """

  def __init__(self, total_steps: int, start_step: int, *, batch_size: int = 0, prefix: str = "",
               stream: TextIO | None = None, enabled: bool | None = None):
    self.total_steps = int(total_steps)
    self.batch_size = int(batch_size)
    self.prefix = prefix
    self.stream = sys.stdout if stream is None else stream
    self.enabled = jax.process_index() == 0 if enabled is None else enabled
    self._last_step = int(start_step)
    self._last_time = time.perf_counter()
    self.steps_per_second = float("nan")

  def reset_clock(self, step: int) -> None:
    """Restarts the rate measurement at `step` (e.g. after an evaluation pause or the first compile)."""
    self._last_step = int(step)
    self._last_time = time.perf_counter()

  def update(self, step: int, scalars: Mapping[str, Any] | None = None) -> str:
    """Prints and returns one progress line for `step` (steps done so far)."""
    now = time.perf_counter()
    done = step - self._last_step
    if done > 0 and now > self._last_time:
      self.steps_per_second = done / (now - self._last_time)
    self._last_step, self._last_time = step, now
    eta = (self.total_steps - step) / self.steps_per_second if self.steps_per_second > 0 else float("nan")
    parts = [f"{self.prefix}step {step}/{self.total_steps}"]
    for name, value in (scalars or {}).items():
      value = _plain(value)
      parts.append(f"{name} {value:.4g}" if isinstance(value, float) else f"{name} {value}")
    if math.isfinite(self.steps_per_second):
      parts.append(f"{self.steps_per_second:.2f} steps/s")
      if self.batch_size:
        parts.append(f"{self.steps_per_second * self.batch_size:.1f} img/s")
    parts.append(f"ETA {format_duration(eta)}")
    line = " | ".join(parts)
    if self.enabled:
      print(line, file=self.stream, flush=True)
    return line
