"""The default experiment (the paper's training values, `ccfnet_jax.config.default_config`) and the `:arg` parser.

Usage: `python run.py --config=configs/default.py[:ARG] --workdir=DIR`, where ARG is a comma list of
`fold=K` (0..3, or `all` for the four folds in turn), `steps=N` (a short schedule of N steps) and
`dataset=phantom|tianchi`, e.g. `:fold=all` or `:fold=2,steps=100`. Any field can also be set with
`--config.<field>=value` (e.g. `--config.num_steps=50 --config.manual_dir=DIR`).
"""

from __future__ import annotations

import ml_collections

from ccfnet_jax import config as config_lib

ARG_SPEC: dict[str, tuple[object, type]] = {"fold": ("0", str), "steps": (0, int), "dataset": ("", str)}
"""Keys of the `:arg` string -> (default, type)."""


def parse_arg(arg: str | None, **spec: tuple[object, type]) -> ml_collections.ConfigDict:
  """Parses a config-file argument such as `fold=2,steps=100` (big_vision's `:arg` idiom).

  Args:
    arg: the text after ':' in `--config=file.py:ARG` (None or '' for none). A lone value without '=' is taken as
      the first key's value (`:2` means `fold=2`).
    **spec: key -> (default, type), e.g. `fold=("0", str)`.
  Returns:
    ConfigDict with one entry per key of `spec`.
  Raises:
    ValueError: for a key not in `spec`, or a value its type rejects.
  """
  spec = spec or ARG_SPEC
  values = {key: default for key, (default, _) in spec.items()}
  items = [item.strip() for item in (arg or "").split(",") if item.strip()]
  if len(items) == 1 and "=" not in items[0]:
    items = [f"{next(iter(spec))}={items[0]}"]
  for item in items:
    key, sep, value = item.partition("=")
    key = key.strip()
    if not sep or key not in spec:
      raise ValueError(f"config argument {item!r} in {arg!r}: expected key=value with key one of {sorted(spec)}")
    try:
      values[key] = spec[key][1](value.strip())
    except ValueError as e:
      raise ValueError(f"config argument {item!r}: {value!r} is not a valid {spec[key][1].__name__}") from e
  return ml_collections.ConfigDict(values)


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """The default experiment: CCF-Net R18-MSC at 512 px with the paper's schedule (`ccfnet_jax.config`)."""
  return apply_arg(config_lib.default_config(), arg)


def apply_arg(config: ml_collections.ConfigDict, arg: str | None) -> ml_collections.ConfigDict:
  """Applies a `fold=...,steps=...,dataset=...` argument string to `config` (in place) and returns it."""
  parsed = parse_arg(arg, **ARG_SPEC)
  if arg:
    config.fold = parsed.fold
    if parsed.steps:
      config.num_steps = parsed.steps
    if parsed.dataset:
      config.dataset = parsed.dataset
  return config


def model_variant(arg: str | None, *, name: str = "ccfnet", depth: int, msc: bool,
                  batch_size: int) -> ml_collections.ConfigDict:
  """The default config with another model (registry `name`, `depth`, `msc`) and batch size, then `arg` applied.

  The Table 1 configs (`r18.py`, `simplebaseline_r50_msc.py`, ...) differ from the default only in these fields.
  """
  config = get_config()
  config.model.name = name
  config.model.depth = depth
  config.model.msc = msc
  config.batch_size = batch_size
  return apply_arg(config, arg)
