"""The experiment config: its defaults (the paper's recipe), its validation, and reading a run's `config.json`.

`configs/*.py` files start from `default_config()` and change a few fields. `validate(config)` checks every value
before any data is read and raises `ConfigError` naming the field, its value and what is allowed. A run keeps the
config it was started with (`rundir.CONFIG_FILE`); `load_run_config` reads it back for inference and fills fields
that an older version did not write with their defaults; `model_changes` lists the differences between two configs
that would change the trained model (a resumed run refuses them unless allowed).
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping
from typing import Any

import jax.numpy as jnp
import ml_collections
import tfds_spine
from flax import nnx
from ml_collections import config_dict

from ccfnet_jax import decode, losses, models, rundir
from ccfnet_jax.data.augment import AugmentConfig

SCHEDULES = ("cosine_warm_restarts", "cosine", "constant")
FOLD_BATCHING = ("", "vmap", "unroll")
BACKBONE_INITS = ("kaiming", "reference")
RESNET_DEPTHS = (18, 34, 50)
_RESNET_MODELS = ("ccfnet", "simplebaseline")

TRAINING_NEUTRAL_FIELDS = frozenset({
    "fold", "data_dir", "manual_dir", "num_data_threads", "num_data_workers", "log_every_steps", "keep_checkpoints",
    "eval_batch_size", "eval_every_steps", "checkpoint_every_steps", "parallel_folds", "fold_batching",
    "data_on_device", "phantom_dicom_studies",
})
"""Fields a resumed run may change freely: where data lives, how it is read, fed, logged, kept or batched; not what
the model learns (folds trained stacked or in turn give the same model up to float rounding)."""


class ConfigError(ValueError):
  """A config value that is not allowed; the message names the field, its value and what is allowed."""


def default_config() -> ml_collections.ConfigDict:
  """CCF-Net R18-MSC at 512 px with the paper's training values (docs/method.md#training)."""
  config = ml_collections.ConfigDict()

  # Data.
  config.dataset = "phantom"  # 'phantom' (synthetic, builds itself) or 'tianchi' (needs manual_dir)
  config.data_dir = ""  # TFDS data dir; '' -> <workdir>/tensorflow_datasets
  config.manual_dir = ""  # tianchi: folder with lumbar_train150/ and lumbar_train150_annotation.json
  config.phantom_studies = 200  # phantom dataset size
  config.phantom_seed = 0
  config.phantom_dicom_studies = 0  # > 0: after training, write that many new phantom studies as DICOM to predict on
  config.num_folds = 4
  config.fold = "0"  # 'K', 'all', a comma list 'K,L', or 'none' (train on every study, hold none out)
  config.train_fraction = 1.0  # < 1: a nested, label-stratified subset of each fold's training studies
  config.image_size = 512
  config.num_data_threads = 2  # Grain reader threads per process
  config.num_data_workers = 0  # Grain worker processes (0: read in the training process)
  # True: the resized training and evaluation data on the devices once, each step gathering its batch there
  # (the host pipeline's batches, in its order); for accelerators, where the host would set the pace.
  config.data_on_device = False

  # Model.
  config.model = ml_collections.ConfigDict({"name": "ccfnet", "depth": 18, "msc": True})
  # 'kaiming': the backbone's convs at torchvision's scale, N(0, 2 / fan_out), the rest N(0, 0.001);
  # 'reference': every conv N(0, 0.001), as the reference draws them before it copies ImageNet weights into the
  # backbone. From scratch, 'kaiming' learns several times faster (docs/method.md#initialisation).
  config.model.backbone_init = "kaiming"
  config.model.pretrained = ""  # a torchvision ImageNet ResNet (.pth / .npz) copied into the backbone
  # A run of the same model (workdir, fold dir, checkpoints dir or step dir, e.g. a phantom pretraining run): its
  # newest checkpoint's parameters and BatchNorm statistics are the starting point (after `pretrained`); '' = none.
  config.model.init_from = ""
  config.parallel_folds = False  # several folds: True trains them together in one jit program
  config.fold_batching = ""  # with parallel_folds: "vmap" or "unroll" ("": unroll on CPU, vmap on accelerators)
  config.mixed_precision = False  # True: bfloat16 compute, float32 parameters and optimizer state

  # Loss and augmentation.
  config.loss = "reference"  # 'reference' (as the reference code trains) or 'paper'
  config.loss_weights = ml_collections.ConfigDict(dict(losses.LOSS_WEIGHTS))  # weight of each loss term
  config.disease_region = "peak"  # reference loss: the BCE at the target 'peak' cell, or over the 'region' H >= 0.6
  config.augment = ml_collections.ConfigDict(dataclasses.asdict(AugmentConfig.reference()))
  config.flip_tta = True  # evaluation with horizontal-flip test-time augmentation
  # True: before each evaluation, BatchNorm running statistics := mean statistics of the unaugmented training images
  # ("precise BN"; the reference keeps the running averages of the augmented ones: False).
  config.recalibrate_bn = False
  # > 0 (e.g. 0.998): evaluation, the best checkpoint, predict and export use an exponential moving average of the
  # weights and BatchNorm statistics (`ccfnet_jax.ema`); the trained weights are kept beside it to resume. 0 = off.
  config.ema_decay = 0.0
  config.tta = ml_collections.ConfigDict({"shift_cells": 0})  # shift TTA: +-N whole cells along each axis (0: off)
  config.decode = "argmax"  # 'argmax' (11 independent maxima) or 'ordered' (top to bottom, decode.decode_ordered)
  config.decode_top_k = 8  # candidate cells per object of the ordered decode

  # Optimisation.
  config.batch_size = 32  # global, over all devices and hosts
  config.eval_batch_size = 0  # 0 -> batch_size
  config.learning_rate = 3e-4
  config.min_learning_rate = 5e-5
  config.weight_decay = 5e-4
  config.schedule = "cosine_warm_restarts"  # or 'cosine' (one cosine to min_learning_rate) or 'constant'
  config.restart_epochs = 20.0  # T0 of the warm restarts, epochs
  config.restart_mult = 2.0  # T_mult
  config.warmup_steps = 0
  config.num_epochs = 60
  config.passes_per_epoch = 10  # one epoch = this many passes over the training studies
  config.num_steps = config_dict.placeholder(int)  # overrides num_epochs * steps per epoch (short runs)

  # Evaluation, checkpoints, logging.
  config.eval_every_steps = config_dict.placeholder(int)  # None -> at the end of every epoch
  config.checkpoint_every_steps = config_dict.placeholder(int)  # None -> at every evaluation
  config.keep_checkpoints = 3  # most recent checkpoints kept (plus the best by score)
  config.log_every_steps = 50
  config.seed = 0
  return config


def build_model(config: ml_collections.ConfigDict, key: Any) -> Any:
  """The architecture of `config.model` (registry `models.MODELS`), bf16 compute when `config.mixed_precision`.

  Its weights are the constructors' initialisation; training may re-draw them (`config.model.backbone_init`).
  """
  return models.create_model(config.model.name, depth=config.model.depth, msc=config.model.msc,
                             rngs=nnx.Rngs(key), dtype=jnp.bfloat16 if config.mixed_precision else jnp.float32)


def load_config_file(spec: str) -> ml_collections.ConfigDict:
  """The config of a config file, `path/to/file.py[:arg]` (its `get_config(arg)`), as `--config=` reads it.

  Raises ConfigError when the file is missing or has no `get_config`.
  """
  import importlib.util  # pylint: disable=g-import-not-at-top

  path, _, arg = spec.partition(":")
  if not os.path.isfile(path):
    raise ConfigError(f"config file {path}: no such file")
  module_spec = importlib.util.spec_from_file_location(f"_config_{abs(hash(path))}", path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  if not hasattr(module, "get_config"):
    raise ConfigError(f"config file {path} defines no get_config(arg)")
  return module.get_config(arg or None)


def describe_model(config: ml_collections.ConfigDict) -> str:
  """e.g. 'ccfnet depth=18 msc=True' (the config fields that decide the parameter shapes)."""
  return f"{config.model.name} depth={config.model.depth} msc={config.model.msc}"


# ---------------------------------------------------------------------------------------------------------------
# Validation.
# ---------------------------------------------------------------------------------------------------------------


def _fail(field: str, value: Any, allowed: str) -> ConfigError:
  return ConfigError(f"config.{field} = {value!r}: {allowed}")


def parse_folds(fold: str | int, num_folds: int) -> list[int] | None:
  """`config.fold` -> fold indices: 'all' -> [0, ..., num_folds - 1]; '2' -> [2]; '0,2' -> [0, 2]; 'none' -> None
  (the run on every study)."""
  text = str(fold).strip().lower()
  if text == rundir.FINAL_FOLD:
    return None
  if text == "all":
    return list(range(num_folds))
  try:
    folds = [int(part) for part in text.split(",") if part.strip()]
  except ValueError:
    raise _fail("fold", fold, "expected 'all', 'none', an integer or a comma list of integers") from None
  if not folds or any(not 0 <= k < num_folds for k in folds) or len(set(folds)) != len(folds):
    raise _fail("fold", fold, f"folds must be distinct integers in [0, {num_folds})")
  return folds


def augment_config(config: ml_collections.ConfigDict) -> AugmentConfig | None:
  """`config.augment` -> AugmentConfig (None when every transform is off). Raises ConfigError naming the field."""
  fields = {f.name for f in dataclasses.fields(AugmentConfig)}
  given = dict(config.augment)
  unknown = sorted(set(given) - fields)
  if unknown:
    raise _fail("augment", unknown, f"unknown fields; known: {sorted(fields)}")
  values = {k: tuple(v) if isinstance(v, (list, tuple)) else v for k, v in given.items()}
  try:
    cfg = AugmentConfig(**values)
  except (TypeError, ValueError) as e:
    raise ConfigError(f"config.augment: {e}") from None
  return cfg if (cfg.geometric or cfg.photometric) else None


def _positive(config: ml_collections.ConfigDict, *names: str, allow_none: bool = False) -> None:
  for name in names:
    value = config[name]
    if value is None and allow_none:
      continue
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
      raise _fail(name, value, "must be a positive number" + (" (or None)" if allow_none else ""))


def _non_negative(config: ml_collections.ConfigDict, *names: str) -> None:
  for name in names:
    value = config[name]
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
      raise _fail(name, value, "must be >= 0")


def validate(config: ml_collections.ConfigDict) -> None:
  """Checks every field of `config` that training reads; raises ConfigError at the first bad one.

  Runs before any data set is opened, so a typo costs seconds, not a data-set build.
  """
  if config.dataset not in tfds_spine.DATASETS:
    raise _fail("dataset", config.dataset, f"expected one of {tfds_spine.DATASETS}")
  if config.dataset == "tianchi":
    if not config.manual_dir:
      raise _fail("manual_dir", config.manual_dir, "the tianchi dataset needs the folder holding "
                  "lumbar_train150/ and lumbar_train150_annotation.json")
    if not os.path.isdir(os.path.expanduser(config.manual_dir)):
      raise _fail("manual_dir", config.manual_dir, "no such directory")
  elif config.phantom_studies < config.num_folds:
    raise _fail("phantom_studies", config.phantom_studies, f"must be at least num_folds ({config.num_folds})")
  if config.num_folds != 4:
    raise _fail("num_folds", config.num_folds, "the lumbar_spine data set is built with 4 folds")
  parse_folds(config.fold, config.num_folds)
  fraction = config.get("train_fraction", 1.0)
  if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0.0 < fraction <= 1.0:
    raise _fail("train_fraction", fraction, "must be in (0, 1]")

  model = config.model
  if model.name not in models.MODELS:
    raise _fail("model.name", model.name, f"expected one of {sorted(models.MODELS)}")
  if model.name in _RESNET_MODELS and model.depth not in RESNET_DEPTHS:
    raise _fail("model.depth", model.depth, f"{model.name} is built on ResNet{RESNET_DEPTHS}")
  if model.get("backbone_init", "kaiming") not in BACKBONE_INITS:
    raise _fail("model.backbone_init", model.backbone_init, f"expected one of {BACKBONE_INITS}")
  pretrained = model.get("pretrained", "")
  if pretrained and not os.path.isfile(os.path.expanduser(pretrained)):
    raise _fail("model.pretrained", pretrained, "no such file")
  _positive(config, "image_size")
  multiple = 128 if model.msc else 32
  if config.image_size % multiple:
    raise _fail("image_size", config.image_size, f"must be a multiple of {multiple} for this model (its maps' "
                "sides must divide evenly" + (" by the MSC module's 8x8 pooling)" if model.msc else ")"))

  if config.loss not in losses.LOSSES:
    raise _fail("loss", config.loss, f"expected one of {sorted(losses.LOSSES)}")
  augment_config(config)
  _validate_recipe(config)

  _positive(config, "batch_size", "learning_rate", "passes_per_epoch", "log_every_steps", "keep_checkpoints")
  _positive(config, "num_steps", "eval_every_steps", "checkpoint_every_steps", allow_none=True)
  if config.num_steps is None:
    _positive(config, "num_epochs")
  _non_negative(config, "eval_batch_size", "phantom_dicom_studies", "weight_decay", "min_learning_rate", "warmup_steps", "num_data_threads",
                "num_data_workers")
  if config.schedule not in SCHEDULES:
    raise _fail("schedule", config.schedule, f"expected one of {SCHEDULES}")
  if config.schedule != "constant" and config.min_learning_rate > config.learning_rate:
    raise _fail("min_learning_rate", config.min_learning_rate,
                f"must not exceed learning_rate ({config.learning_rate})")
  if config.schedule == "cosine_warm_restarts":
    _positive(config, "restart_epochs")
    if config.restart_mult < 1:
      raise _fail("restart_mult", config.restart_mult, "must be >= 1")
  if config.num_steps is not None and config.warmup_steps >= config.num_steps:
    raise _fail("warmup_steps", config.warmup_steps, f"must be less than num_steps ({config.num_steps})")
  if config.fold_batching not in FOLD_BATCHING:
    raise _fail("fold_batching", config.fold_batching, f"expected one of {FOLD_BATCHING}")


def _validate_recipe(config: ml_collections.ConfigDict) -> None:
  """The recipe options (docs/recipe.md): loss weights, disease region, EMA, shift TTA, decoder, warm start."""
  try:
    losses.check_weights(config.loss_weights)
  except ValueError as e:
    raise _fail("loss_weights", config.loss_weights.to_dict(), str(e)) from None
  if config.disease_region not in losses.DISEASE_REGIONS:
    raise _fail("disease_region", config.disease_region, f"expected one of {losses.DISEASE_REGIONS}")
  decay = config.ema_decay
  if isinstance(decay, bool) or not isinstance(decay, (int, float)) or not 0.0 <= decay < 1.0:
    raise _fail("ema_decay", decay, "must be in [0, 1) (0: no moving average)")
  shift = config.tta.shift_cells
  if isinstance(shift, bool) or not isinstance(shift, int) or shift < 0:
    raise _fail("tta.shift_cells", shift, "must be an integer >= 0")
  if config.decode not in decode.DECODERS:
    raise _fail("decode", config.decode, f"expected one of {decode.DECODERS}")
  top_k = config.decode_top_k
  if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1:
    raise _fail("decode_top_k", top_k, "must be a positive integer")
  init_from = config.model.init_from
  if init_from and not os.path.isdir(os.path.expanduser(init_from)):
    raise _fail("model.init_from", init_from, "no such directory (expected a training run or one of its "
                "checkpoints)")


def check_against_model(config: ml_collections.ConfigDict, stride: int) -> None:
  """The checks that need the model's output stride: the maps of an `image_size` input are `image_size / stride`
  cells a side, so a shift TTA view must still overlap the image and the ordered decode can have at most that
  many squared candidates. Called once the model is built, before any step runs.

  Raises:
    ConfigError: naming the field, its value and the bound.
  """
  side = int(config.image_size) // int(stride)
  shift = int(config.tta.shift_cells)
  if shift >= side:
    raise _fail("tta.shift_cells", shift, f"must be less than the maps' side ({side} cells = image_size "
                f"{config.image_size} / stride {stride}): a view moved that far no longer overlaps the image")
  if config.decode == "ordered" and config.decode_top_k > side * side:
    raise _fail("decode_top_k", config.decode_top_k, f"must be at most the maps' {side} x {side} = {side * side} "
                f"cells (image_size {config.image_size} / stride {stride})")


# ---------------------------------------------------------------------------------------------------------------
# A run's config on disk.
# ---------------------------------------------------------------------------------------------------------------


def to_json(config: ml_collections.ConfigDict) -> str:
  return config.to_json_best_effort(indent=2)


def _fill_defaults(values: dict[str, Any], defaults: Mapping[str, Any], prefix: str = "") -> list[str]:
  """Adds the fields of `defaults` missing from `values` (in place); returns their dotted names."""
  added = []
  for key, default in defaults.items():
    if key not in values:
      values[key] = default.to_dict() if isinstance(default, ml_collections.ConfigDict) else default
      added.append(prefix + key)
    elif isinstance(default, ml_collections.ConfigDict) and isinstance(values[key], dict):
      added += _fill_defaults(values[key], default, f"{prefix}{key}.")
  return added


def load_run_config(path: str | os.PathLike) -> tuple[ml_collections.ConfigDict, list[str]]:
  """The config a run wrote (`config.json`), with fields an older version lacked set to their defaults.

  Returns:
    (config, the dotted names of the fields that were filled in).
  Raises:
    ConfigError: the file cannot be read, is not a JSON object, or lacks the model fields.
  """
  path = os.fspath(path)
  try:
    values = rundir.read_json(path)
  except rundir.RunDirError as e:
    raise ConfigError(f"cannot read the training config: {e}") from None
  if not isinstance(values, dict):
    raise ConfigError(f"training config {path} holds a {type(values).__name__}, expected an object")
  for key in ("model", "image_size"):
    if key not in values:
      raise ConfigError(f"training config {path} lacks the field {key!r}")
  added = _fill_defaults(values, default_config())
  return ml_collections.ConfigDict(values), added


def _flatten(values: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
  flat = {}
  for key, value in values.items():
    if isinstance(value, Mapping):
      flat.update(_flatten(value, f"{prefix}{key}."))
    else:
      flat[prefix + key] = list(value) if isinstance(value, tuple) else value
  return flat


def model_changes(saved: ml_collections.ConfigDict | Mapping[str, Any],
                  current: ml_collections.ConfigDict) -> list[tuple[str, Any, Any]]:
  """(field, saved value, current value) for every field that differs and would change the trained model."""
  def plain(c):
    return json.loads(to_json(c)) if isinstance(c, ml_collections.ConfigDict) else dict(c)

  old, new = _flatten(plain(saved)), _flatten(plain(current))
  return [(name, old.get(name), new.get(name)) for name in sorted(set(old) | set(new))
          if name.split(".")[0] not in TRAINING_NEUTRAL_FIELDS and old.get(name) != new.get(name)]
