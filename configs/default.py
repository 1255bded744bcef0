"""Defaults of every experiment (SPEC §9: the paper's / reference's training values) and the config-string parser.

Usage: `python run.py --config=configs/default.py[:ARG] --workdir=DIR`, where ARG is a comma list of
`fold=K` (0..3, or `all` for the four folds in turn), `steps=N` (a short schedule of N steps) and
`dataset=phantom|tianchi`, e.g. `:fold=all` or `:fold=2,steps=100`. Any field can also be set with
`--config.<field>=value` (e.g. `--config.num_steps=50 --config.manual_dir=../shared/data/tianchi`).
"""

from __future__ import annotations

import dataclasses

import ml_collections
from ml_collections import config_dict

from ccfnet_jax.data.augment import AugmentConfig

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


def augment_fields(cfg: AugmentConfig) -> ml_collections.ConfigDict:
  """An `AugmentConfig` as a ConfigDict (every field overridable as `--config.augment.<field>=...`)."""
  return ml_collections.ConfigDict(dataclasses.asdict(cfg))


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """The default experiment: CCF-Net R18-MSC at 512 px with the paper's schedule (see the module docstring)."""
  config = ml_collections.ConfigDict()

  # Data.
  config.dataset = "phantom"  # 'phantom' (synthetic, builds itself) or 'tianchi' (needs manual_dir)
  config.data_dir = ""  # TFDS data dir; '' -> <workdir>/tensorflow_datasets
  config.manual_dir = ""  # tianchi: folder with lumbar_train150/ and lumbar_train150_annotation.json
  config.phantom_studies = 200  # phantom dataset size
  config.phantom_seed = 0
  config.num_folds = 4
  config.fold = "0"  # 'K', 'all' or a comma list 'K,L'
  config.image_size = 512
  config.num_data_threads = 2  # Grain reader threads per process
  config.num_data_workers = 0  # Grain worker processes (0: read in the training process)

  # Model.
  config.model = ml_collections.ConfigDict({"name": "ccfnet", "depth": 18, "msc": True})
  # 'kaiming' (default): the backbone's convs at torchvision's scale, N(0, 2 / fan_out), the rest N(0, 0.001);
  # 'reference': every conv N(0, 0.001), as the reference draws them before it copies ImageNet weights into the
  # backbone. From scratch, 'kaiming' learns several times faster (README, "Measured results").
  config.model.backbone_init = "kaiming"
  config.model.pretrained = ""  # a torchvision ImageNet ResNet (.pth / .npz) copied into the backbone (SPEC §2)
  config.parallel_folds = False  # fold=all: True trains the folds together in one jit program (vmap)
  config.fold_batching = ""  # with parallel_folds: "vmap" or "unroll" ("": unroll on CPU, vmap on accelerators)
  config.mixed_precision = False  # True: bfloat16 compute, float32 parameters and optimizer state

  # Loss and augmentation.
  config.loss = "reference"  # 'reference' (as the reference code trains) or 'paper'
  config.augment = augment_fields(AugmentConfig.reference())
  config.flip_tta = True  # evaluation with horizontal-flip test-time augmentation (SPEC §5)
  # True: before each evaluation, BatchNorm running statistics := mean statistics of the unaugmented training images
  # ("precise BN"; the reference keeps the running averages of the augmented ones: False).
  config.recalibrate_bn = False

  # Optimisation (SPEC §9).
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

  apply_arg(config, arg)
  return config


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
