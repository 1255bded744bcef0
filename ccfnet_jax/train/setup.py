"""What a fold's training starts from: its data, its label counts and pos_weight, its schedule, its model and state."""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import tfds_spine
from flax import nnx

from ccfnet_jax import config as config_lib
from ccfnet_jax import checkpoint, convert, losses, rundir, schedules
from ccfnet_jax.data import records, subsets
from ccfnet_jax.models import layers, resnet
from ccfnet_jax.train import steps


@dataclasses.dataclass
class FoldData:
  """One fold's sources and the numbers derived from them.

  fold: the held-out fold, or 'none' for the run on every study. number: the fold's index for its random streams
  (`num_folds` for the run on every study). train_source / val_source: random-access record sources (`tfds_spine`;
  val_source None when no study is held out). label_counts: {'vertebra': (n_neg, n_pos), 'disc': (...)} of the
  training labels -> pos_weight (vertebra, disc).
  """

  fold: int | str
  number: int
  train_source: Sequence[Any]
  val_source: Sequence[Any] | None
  label_counts: dict[str, tuple[int, int]]
  pos_weight: tuple[float, float]


def data_dir_of(config: ml_collections.ConfigDict, workdir: str) -> str:
  """`config.data_dir`, or `<workdir>/tensorflow_datasets` when empty."""
  return os.path.abspath(os.path.expanduser(config.data_dir or os.path.join(workdir, "tensorflow_datasets")))


def open_fold(config: ml_collections.ConfigDict, fold: int | None, workdir: str) -> FoldData:
  """Fold `fold`'s sources and label statistics (fold None: every study, none held out); process 0 builds the data
  set on first use while the others wait. With `config.train_fraction` < 1 the training source is the fold's nested
  subset (`data.subsets`)."""
  kwargs: dict[str, Any] = {}
  manual_dir = None
  if config.dataset == "phantom":
    kwargs = {"num_studies": int(config.phantom_studies), "seed": int(config.phantom_seed)}
  else:
    manual_dir = os.path.abspath(os.path.expanduser(config.manual_dir))
  data_dir = data_dir_of(config, workdir)

  def open_():
    return tfds_spine.open_fold(config.dataset, data_dir, manual_dir, fold=fold, num_folds=config.num_folds,
                                **kwargs)

  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    if jax.process_index() == 0:
      open_()
    multihost_utils.sync_global_devices("ccfnet_dataset_built")
  train_source, val_source = open_()
  disease = records.disease_labels(train_source)
  fraction = float(config.get("train_fraction", 1.0))
  if fraction < 1.0:
    uids = [_text(train_source[i]["study_uid"]) for i in range(len(train_source))]
    order = subsets.nested_order(uids, disease, salt=f"seed{config.seed}")
    keep = sorted(order[:subsets.subset_size(fraction, len(order))])
    train_source, disease = subsets.Subset(train_source, keep), disease[keep]
  counts = losses.label_counts(disease)
  pos_weight = losses.pos_weight_from_counts(counts)
  return FoldData(fold=rundir.FINAL_FOLD if fold is None else fold,
                  number=fold_number(config, fold), train_source=train_source,
                  val_source=val_source, label_counts=counts, pos_weight=pos_weight)


def _text(value: Any) -> str:
  return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def steps_per_epoch(config: ml_collections.ConfigDict, num_train_examples: int) -> int:
  """One epoch = `config.passes_per_epoch` passes over the training studies, in steps of `config.batch_size`."""
  return max(1, math.ceil(config.passes_per_epoch * num_train_examples / config.batch_size))


def total_steps(config: ml_collections.ConfigDict, epoch_steps: int) -> int:
  """`config.num_steps` when set, else `config.num_epochs` epochs."""
  return int(config.num_steps) if config.num_steps else int(config.num_epochs) * epoch_steps


def learning_rates(config: ml_collections.ConfigDict, num_steps: int, epoch_steps: int, length: int) -> np.ndarray:
  """float32 `[length]`: the schedule of `config` (docs/method.md#training) at steps 0..length-1."""
  schedule = schedules.create_schedule(
      config.schedule, peak_lr=config.learning_rate, min_lr=config.min_learning_rate, total_steps=num_steps,
      steps_per_epoch=epoch_steps, first_cycle_epochs=config.restart_epochs, cycle_mult=config.restart_mult,
      warmup_steps=config.warmup_steps)
  return np.asarray(jax.vmap(schedule)(jnp.arange(length, dtype=jnp.int32)), np.float32)


def create_model(config: ml_collections.ConfigDict, key: jax.Array) -> nnx.Module:
  """The model of `config.model` at its initialisation, bf16 compute when `config.mixed_precision`."""
  model = config_lib.build_model(config, key)
  if config.model.get("backbone_init", "kaiming") == "kaiming":
    # Every ResNet of the model (SCN has two); a model without one (HRNet) is redrawn whole. The first keeps
    # fold_in(key, 1) itself so single-backbone models draw the weights they always have (runs stay reproducible).
    backbones = [m for _, m in nnx.iter_graph(model) if isinstance(m, resnet.ResNet)] or [model]
    for i, backbone in enumerate(backbones):
      layers.reinitialize_convs(backbone, jax.random.fold_in(key, 1) if i == 0 else
                                jax.random.fold_in(jax.random.fold_in(key, 1), i))
  return model


def initial_model(config: ml_collections.ConfigDict, key: jax.Array, report=print) -> nnx.Module:
  """`create_model`, then `config.model.pretrained` (a torchvision ImageNet ResNet file) copied into the backbone,
  then `config.model.init_from` (another run of the same model): its newest checkpoint's parameters and BatchNorm
  statistics (the trained ones, not their moving averages) replace the model's; the optimizer starts afresh.

  Raises:
    convert.StateDictError: naming the file and every key or shape that does not fit the backbone.
    checkpoint.CheckpointError: `init_from` holds no checkpoint.
  """
  model = create_model(config, key)
  path = config.model.get("pretrained", "")
  if path:
    loaded = convert.load_torch_state_dict(model, os.path.expanduser(path), source="torchvision")
    report(f"backbone initialised from {path} ({len(loaded.loaded)} tensors; "
           f"{len(loaded.kept)} head variables keep their init)")
  init_from = config.model.get("init_from", "")
  if init_from:
    ref = checkpoint.find_checkpoint(os.path.expanduser(init_from), which="last")
    target = checkpoint.weights_target(nnx.state(model, nnx.Param), nnx.state(model, nnx.BatchStat),
                                       averaged=False)
    restored = checkpoint.restore_weights(ref.state_dir, target, where=ref.step_dir,
                                          model=config_lib.describe_model(config))
    nnx.update(model, restored["params"], restored["batch_stats"])
    report(f"model initialised from {ref.step_dir} (parameters and BatchNorm statistics)")
  return model


def fold_number(config: ml_collections.ConfigDict, fold: int | None) -> int:
  """The index of a fold's random streams: the fold itself, or `num_folds` for the run on every study (None)."""
  return int(config.num_folds) if fold is None else int(fold)


def fold_key(config: ml_collections.ConfigDict, fold: int) -> jax.Array:
  """The root key of a fold's randomness: its model initialisation derives from it."""
  return jax.random.fold_in(jax.random.key(config.seed), fold)


def init_state(model: nnx.Module, weight_decay: float, ema_decay: float = 0.0
               ) -> tuple[nnx.GraphDef, nnx.GraphDef, steps.TrainState]:
  """Splits a model into (train-mode graphdef, eval-mode graphdef, initial TrainState). Leaves `model` in eval mode.

  With `ema_decay` > 0 the state's moving averages start as a copy of the weights and BatchNorm statistics.

  Raises:
    ValueError: when the model holds variables other than `nnx.Param` and `nnx.BatchStat` (they would not be
      trained or checkpointed).
  """
  model.train()
  train_graphdef, params, batch_stats, rest = nnx.split(model, nnx.Param, nnx.BatchStat, ...)
  if jax.tree.leaves(rest):
    raise ValueError(f"model has state other than Param / BatchStat, not handled by training: {rest}")
  model.eval()
  eval_graphdef = nnx.graphdef(model)
  opt_state = steps.adamw(lambda count: 0.0, weight_decay).init(params)
  averages = None
  if ema_decay > 0:
    averages = jax.tree.map(lambda x: jnp.array(x, copy=True), {"params": params, "batch_stats": batch_stats})
  state = steps.TrainState(step=jnp.zeros((), jnp.int32), params=params, batch_stats=batch_stats,
                           opt_state=opt_state, ema=averages)
  return train_graphdef, eval_graphdef, state


def step_settings(config: ml_collections.ConfigDict, stride: int) -> steps.StepSettings:
  return steps.StepSettings(image_size=int(config.image_size), stride=int(stride), loss=config.loss,
                            augment=config_lib.augment_config(config), seed=int(config.seed),
                            weight_decay=float(config.weight_decay),
                            loss_weights=tuple(losses.check_weights(config.loss_weights).items()),
                            disease_region=str(config.disease_region), ema_decay=float(config.ema_decay))
