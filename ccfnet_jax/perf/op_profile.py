"""Where a compiled step spends its time, op by op: a `jax.profiler` trace joined with the step's optimised HLO.

    rows = op_profile.profile(lambda: step(state, batch), compiled.as_text(), steps=3, trace_dir="runs/profile")

`profile` traces `steps` calls of a function (each waited for) with `jax.profiler.trace(create_perfetto_trace=True)`,
reads the Perfetto JSON it writes (no TensorBoard needed), keeps the events whose name is an instruction of the
compiled module (XLA:CPU names each thunk after its instruction; GPU kernels are named after theirs), and returns one
row per instruction, slowest first: milliseconds per step and per device, calls per step, and what the instruction
came from (the `op_name` JAX wrote into its metadata: `jvp()/...` is the forward pass, `transpose(jvp())/...` the
backward pass, anything else the loss, optimizer and augmentation around them) and its kind (the HLO opcode, for a
fusion the heaviest one inside: convolution, dot, reduce, transpose...).

Independent instructions may run at the same time (XLA:CPU's thunk executor overlaps them), so the rows can add up
to more than the step's wall time; compare rows with each other, and the total with the step time.
"""

from __future__ import annotations

import collections
import glob
import gzip
import json
import os
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax

_INSTRUCTION = re.compile(r"^\s*(?:ROOT )?%?([\w.\-]+) = (.+?) ([a-z][\w\-]*)\(")
_OP_NAME = re.compile(r'op_name="([^"]*)"')
_CALLS = re.compile(r"calls=%?([\w.\-]+)")
_HEAVY_OPCODES = ("convolution", "dot", "select-and-scatter", "reduce-window", "reduce", "scatter", "gather",
                  "transpose", "copy", "pad", "concatenate", "slice")
"""A fusion's kind is the first of these its computation holds (else "elementwise")."""


def hlo_instructions(hlo_text: str) -> dict[str, dict[str, str]]:
  """`{instruction name: {"shape", "op_name", "kind"}}` for every instruction of an HLO module's text.

  `kind` is the HLO opcode, and for a fusion the heaviest opcode inside it (`_HEAVY_OPCODES`), because XLA rewrites
  some ops (a conv's weight gradient) into fusions that keep no JAX metadata. A fusion without metadata of its own
  takes the `op_name` of the first instruction of its fused computation that has one.
  """
  instructions: dict[str, dict[str, str]] = {}
  computation_op_names: dict[str, str] = {}
  computation_opcodes: dict[str, set[str]] = collections.defaultdict(set)
  calls: dict[str, str] = {}
  current = None
  for line in hlo_text.splitlines():
    if line and not line.startswith(" ") and line.rstrip().endswith("{"):
      words = line.split()
      current = (words[1] if words[0] == "ENTRY" else words[0]).lstrip("%")
      continue
    match = _INSTRUCTION.match(line)
    if not match:
      continue
    name, shape, opcode = match.groups()
    op_name = _OP_NAME.search(line)
    instructions[name] = {"shape": shape, "op_name": op_name.group(1) if op_name else "", "kind": opcode}
    if current:
      computation_opcodes[current].add(opcode)
      if op_name and current not in computation_op_names:
        computation_op_names[current] = op_name.group(1)
    called = _CALLS.search(line)
    if called:
      calls[name] = called.group(1)
  for name, info in instructions.items():
    if name not in calls:
      continue
    if not info["op_name"]:
      info["op_name"] = computation_op_names.get(calls[name], "")
    if info["kind"] == "fusion":
      inside = computation_opcodes.get(calls[name], set())
      info["kind"] = next((op for op in _HEAVY_OPCODES if op in inside), "elementwise")
  return instructions


def pass_of(op_name: str) -> str:
  """"backward" (`transpose(jvp(...))`), "forward" (`jvp(...)`), "other" (loss, optimizer, augmentation...), or
  "unknown" where XLA kept no JAX metadata."""
  if not op_name:
    return "unknown"
  if "transpose(jvp" in op_name:
    return "backward"
  if "jvp(" in op_name:
    return "forward"
  return "other"


def aggregate(events: Sequence[Mapping[str, Any]], instructions: Mapping[str, Mapping[str, str]], *, steps: int,
              devices: int = 1) -> list[dict[str, Any]]:
  """Rows of per-instruction time from trace events (Chrome/Perfetto `ph == "X"` with `name` and `dur` in us).

  Events whose name is not an instruction of the module (Python frames, runtime bookkeeping) are left out. Times are
  per step and per device (the trace holds every device's events); rows are sorted slowest first.
  """
  if steps < 1 or devices < 1:
    raise ValueError(f"steps ({steps}) and devices ({devices}) must be >= 1")
  total_us: dict[str, float] = collections.defaultdict(float)
  counts: collections.Counter[str] = collections.Counter()
  for event in events:
    name = event.get("name")
    if event.get("ph") == "X" and name in instructions:
      total_us[name] += float(event.get("dur", 0.0))
      counts[name] += 1
  per = steps * devices
  rows = []
  for name, us in total_us.items():
    info = instructions[name]
    rows.append({"op": name, "ms": us / 1000.0 / per, "calls": counts[name] / per, "shape": info["shape"],
                 "op_name": info["op_name"], "pass": pass_of(info["op_name"]), "kind": info["kind"]})
  rows.sort(key=lambda row: -row["ms"])
  return rows


def summarize(rows: Sequence[Mapping[str, Any]], key: str) -> dict[str, float]:
  """Milliseconds per step summed by `key` ("pass" or "kind"), largest first."""
  sums: dict[str, float] = collections.defaultdict(float)
  for row in rows:
    sums[row[key]] += row["ms"]
  return dict(sorted(sums.items(), key=lambda kv: -kv[1]))


def read_trace_events(trace_dir: str) -> list[dict[str, Any]]:
  """The events of the newest `*.trace.json.gz` that `jax.profiler.trace(create_perfetto_trace=True)` wrote."""
  paths = glob.glob(os.path.join(trace_dir, "**", "*.trace.json.gz"), recursive=True)
  if not paths:
    raise FileNotFoundError(f"{trace_dir}: no *.trace.json.gz (the profiler wrote no Perfetto trace)")
  with gzip.open(max(paths, key=os.path.getmtime), "rt") as f:
    trace = json.load(f)
  return trace.get("traceEvents", []) if isinstance(trace, dict) else trace


def profile(fn: Callable[[], Any], hlo_text: str, *, steps: int, trace_dir: str,
            devices: int | None = None) -> list[dict[str, Any]]:
  """Traces `steps` calls of `fn` (after one untraced call) into `trace_dir` and returns `aggregate`'s rows.

  `hlo_text` is the compiled step's optimised HLO (`compiled.as_text()`); `devices` defaults to the local devices.
  """
  jax.block_until_ready(fn())
  with jax.profiler.trace(trace_dir, create_perfetto_trace=True):
    for _ in range(steps):
      jax.block_until_ready(fn())
  events = read_trace_events(trace_dir)
  return aggregate(events, hlo_instructions(hlo_text), steps=steps,
                   devices=devices if devices is not None else jax.local_device_count())
