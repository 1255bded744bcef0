"""Timing loops and the JSON lines every benchmark prints.

A figure is the median of several timed calls, each waited for (`jax.block_until_ready`), after untimed warm-up
calls; `spread` gives the median with the fastest and slowest call so the noise can be read off. `interleaved` times
several functions in alternating rounds (A, B, A, B, ...), so that a machine whose speed drifts (other jobs, clock)
slows them alike, and gives the process CPU time of each call beside its wall time.
"""

from __future__ import annotations

import json
import os
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any, TextIO

import jax


def emit(metric: str, value: float, unit: str, context: Mapping[str, Any], *, stream: TextIO | None = None,
         **extra: Any) -> dict[str, Any]:
  """Prints one JSON line `{"metric", "value", "unit", **context, **extra}` (to stdout by default) and returns it."""
  line = {"metric": metric, "value": value, "unit": unit, **context, **extra}
  print(json.dumps(line), file=stream, flush=True)
  return line


def time_calls(fn: Callable[[], Any], steps: int, warmup: int) -> list[float]:
  """Seconds of each of `steps` calls of `fn` (each waited for with `jax.block_until_ready`) after `warmup` calls.

  `fn` may return anything `jax.block_until_ready` accepts (a PyTorch tensor or None too: it passes through).
  """
  for _ in range(warmup):
    jax.block_until_ready(fn())
  seconds = []
  for _ in range(steps):
    started = time.perf_counter()
    jax.block_until_ready(fn())
    seconds.append(time.perf_counter() - started)
  return seconds


def interleaved(fns: Mapping[str, Callable[[], Any]], *, rounds: int, steps: int,
                warmup: int) -> dict[str, dict[str, list[float]]]:
  """Wall and CPU seconds of every call of each function, timed in `rounds` rounds of `steps` calls of each, in turn.

  Every function first gets `warmup` untimed calls; then each round times `steps` calls of each function in the
  mapping's order. Returns `{name: {"wall_s": [...], "cpu_s": [...]}}` (`rounds * steps` calls each). The CPU
  seconds are this process's, all threads: on a machine shared with other jobs they count the work done rather
  than the time waited for a core (idle threads that spin count as work).
  """
  if rounds < 1 or steps < 1 or warmup < 0:
    raise ValueError(f"rounds ({rounds}) and steps ({steps}) must be >= 1, warmup ({warmup}) >= 0")
  for fn in fns.values():
    time_calls(fn, 0, warmup)
  seconds: dict[str, dict[str, list[float]]] = {name: {"wall_s": [], "cpu_s": []} for name in fns}
  for _ in range(rounds):
    for name, fn in fns.items():
      for _ in range(steps):
        wall, cpu = time.perf_counter(), time.process_time()
        jax.block_until_ready(fn())
        seconds[name]["cpu_s"].append(time.process_time() - cpu)
        seconds[name]["wall_s"].append(time.perf_counter() - wall)
  return seconds


class DonatingStep:
  """Calls a compiled step that donates its first argument, keeping the returned state for the next call.

  `step()` runs `compiled(state, *args)`, stores the new state in `.state` and returns the step's other output.
  """

  def __init__(self, compiled: Callable[..., Any], state: Any, *args: Any):
    self.compiled, self.state, self.args = compiled, state, args

  def __call__(self) -> Any:
    self.state, out = self.compiled(self.state, *self.args)
    return out


def spread(seconds: Sequence[float]) -> dict[str, float]:
  """Median, min and max of a list of durations, in seconds (the JSON lines' `median_s`, `min_s`, `max_s`, `n`)."""
  return {"median_s": statistics.median(seconds), "min_s": min(seconds), "max_s": max(seconds), "n": len(seconds)}


def write_lines(path: str, lines: Sequence[Mapping[str, Any]]) -> None:
  """Writes `lines` to `path` as JSON lines (the `--output` of the benchmarks), creating its folder."""
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with open(path, "w", encoding="utf-8") as f:
    f.writelines(json.dumps(line) + "\n" for line in lines)
