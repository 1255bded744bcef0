"""The house's rules (docs/architecture.md): the import graph has no cycle and follows the layer table, importing a
module defines no flag, and each command's --help lists its own flags only."""

from __future__ import annotations

import ast
import fnmatch
import json
import os
import pathlib
import re
import subprocess
import sys

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
PACKAGES = ("ccfnet_jax", "tfds_spine", "benchmarks")
TOP_LEVEL = ("run",)
COMMANDS = {
    "run": "run", "predict": "ccfnet_jax.predict", "evaluate": "ccfnet_jax.evaluate", "export": "ccfnet_jax.export",
    "bench": "ccfnet_jax.bench", "table": "ccfnet_jax.table", "render": "ccfnet_jax.render",
    "sample_size": "ccfnet_jax.sample_size",
    "tfds_spine.build": "tfds_spine.build",
}


def _layers() -> tuple[list[tuple[str, list[str]]], dict[str, set[str]]]:
  """(layer, module patterns) in order, and layer -> the layers it may import, from docs/architecture.md."""
  text = (REPO / "docs" / "architecture.md").read_text(encoding="utf-8")
  block = re.search(r"```layers\n(.*?)```", text, re.S).group(1)
  entries: list[list[str]] = []
  for line in block.splitlines():
    if not line.strip() or line.lstrip().startswith("#"):
      continue
    if re.match(r"^\w+:", line):
      name, rest = line.split(":", 1)
      entries.append([name, rest])
    else:
      entries[-1][1] += " " + line
  patterns, allowed = [], {}
  for name, rest in entries:
    modules, _, may = rest.partition("->")
    patterns.append((name, modules.split()))
    allowed[name] = set(may.split())
  return patterns, allowed


def _module_files() -> dict[str, pathlib.Path]:
  files = {}
  for package in PACKAGES:
    for path in (REPO / package).rglob("*.py") if (REPO / package).is_dir() else ():
      parts = path.relative_to(REPO).with_suffix("").parts
      name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
      files[name] = path
  for name in TOP_LEVEL:
    files[name] = REPO / f"{name}.py"
  return files


def _short(module: str) -> str:
  """The name the layer table uses: `ccfnet_jax.train.loop` -> `train.loop`."""
  return module[len("ccfnet_jax."):] if module.startswith("ccfnet_jax.") else module


def _layer_of(module: str, patterns) -> str | None:
  short = _short(module)
  for exact in (True, False):
    for layer, names in patterns:
      for pattern in names:
        if ("*" not in pattern) == exact and (short == pattern if exact else fnmatch.fnmatch(short, pattern)):
          return layer
  return None


def _imports(path: pathlib.Path, module: str, known: set[str]) -> set[str]:
  """The project modules `module` imports anywhere in its file (function-level imports included)."""
  tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
  package = module if path.name == "__init__.py" else module.rpartition(".")[0]
  found = set()

  def add(name: str) -> None:
    while name and name not in known:
      name = name.rpartition(".")[0]
    if name and name != module:
      found.add(name)

  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      for alias in node.names:
        add(alias.name)
    elif isinstance(node, ast.ImportFrom):
      base = node.module or ""
      if node.level:
        anchor = package.split(".")
        anchor = anchor[:len(anchor) - node.level + 1]
        base = ".".join(anchor + ([base] if base else []))
      for alias in node.names:
        add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base)
  return found


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
  files = _module_files()
  return {module: _imports(path, module, set(files)) for module, path in files.items()}


def test_every_module_has_a_layer(graph):
  patterns, _ = _layers()
  assert [m for m in graph if _layer_of(m, patterns) is None] == []


def test_imports_follow_the_layer_table(graph):
  patterns, allowed = _layers()
  broken = [f"{m} ({_layer_of(m, patterns)}) imports {d} ({_layer_of(d, patterns)})"
            for m, deps in sorted(graph.items()) for d in sorted(deps)
            if _layer_of(d, patterns) not in allowed.get(_layer_of(m, patterns), set())]
  assert broken == []


def test_no_import_cycles(graph):
  index, low, stack, on_stack, cycles = {}, {}, [], set(), []

  def visit(v):  # Tarjan's strongly connected components
    index[v] = low[v] = len(index)
    stack.append(v)
    on_stack.add(v)
    for w in graph.get(v, ()):
      if w not in index:
        visit(w)
        low[v] = min(low[v], low[w])
      elif w in on_stack:
        low[v] = min(low[v], index[w])
    if low[v] == index[v]:
      component = []
      while True:
        w = stack.pop()
        on_stack.discard(w)
        component.append(w)
        if w == v:
          break
      if len(component) > 1:
        cycles.append(sorted(component))

  for v in sorted(graph):
    if v not in index:
      visit(v)
  assert cycles == []


def test_the_rules_catch_a_violation():
  """The checker itself: a data module importing training, or a command, is reported."""
  patterns, allowed = _layers()
  assert _layer_of("ccfnet_jax.data.pipeline", patterns) == "data"
  assert _layer_of("tfds_spine.build", patterns) == "commands" and _layer_of("tfds_spine", patterns) == "dataset"
  assert "train" not in allowed["data"] and "commands" not in allowed["train"] and "train" not in allowed["inference"]


def _run(code: str, timeout: int = 240) -> subprocess.CompletedProcess:
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(REPO)}
  return subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=timeout,
                        env=env)


def test_importing_any_module_defines_no_flag(graph):
  """Our modules define no flag when imported (third-party libraries may define their own)."""
  modules = sorted(graph)
  code = ("import importlib, json\nfrom absl import flags\n"
          f"for name in {modules!r}:\n  importlib.import_module(name)\n"
          "ours = {m: sorted(f.name for f in fs) for m, fs in flags.FLAGS.flags_by_module_dict().items()\n"
          f"        if m.split('.')[0] in {sorted(set(PACKAGES) | set(TOP_LEVEL) | {'__main__'})!r}}}\n"
          "print(json.dumps(ours))\n")
  done = _run(code)
  assert done.returncode == 0, done.stderr[-3000:]
  assert json.loads(done.stdout.strip().splitlines()[-1]) == {}


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_help_lists_only_the_commands_own_flags(command):
  """`--help` of a command lists its own flags and no flag of another of our modules (third-party libraries such
  as absl or grain may list theirs)."""
  module = COMMANDS[command]
  code = ("import importlib, json\nfrom absl import app, flags, logging\n"
          f"m = importlib.import_module({module!r})\nbefore = set(flags.FLAGS)\nm.define_flags()\n"
          "own = sorted(set(flags.FLAGS) - before)\n"
          "by_module = {mod: sorted(f.name for f in fs) for mod, fs in flags.FLAGS.flags_by_module_dict().items()}\n"
          "flags.FLAGS.mark_as_parsed()\n"
          "print(json.dumps({'own': own, 'by_module': by_module, 'help': flags.FLAGS.get_help()}))\n")
  done = _run(code)
  assert done.returncode == 0, done.stderr[-3000:]
  out = json.loads(done.stdout.strip().splitlines()[-1])
  own = set(out["own"])
  assert own, "the command defines no flags"
  ours = {name for mod, names in out["by_module"].items()
          if mod.split(".")[0] in set(PACKAGES) | set(TOP_LEVEL) | {"__main__"} for name in names}
  assert ours == own  # nothing defined by another of our modules, on import or by the command's definitions
  listed = set(re.findall(r"^\s+--(?:\[no\])?([A-Za-z_][\w.]*)", out["help"], re.M))
  assert {name for name in own if "." not in name} <= listed
