"""Training and evaluation of CCF-Net with k-fold cross-validation (SPEC §7, §9).

`train_and_evaluate(config, workdir)` trains the folds named by `config.fold` one after another with
`train_fold(config, fold, workdir)` and writes `workdir/results.json`. Layout of a run:

    workdir/results.json                 folds -> best / last metrics; mean and std over folds when all ran
    workdir/fold_K/results.json          this fold's best / last metrics
    workdir/fold_K/checkpoints/          Orbax: the last few checkpoints and the best by validation score
    workdir/fold_K/metrics.jsonl         train and eval scalars, one JSON object per line
    workdir/fold_K/tensorboard/          the same as TensorBoard event files

Sections of a fold: mesh -> data -> model, optimizer, state -> shardings and jitted steps -> resume -> loop
(train step; every `log_every_steps` one host sync for logging and the NaN check; evaluation every epoch;
checkpoints). The train step is pure (`nnx.split` state in, state out, donated); augmentation runs inside it on
device with a key derived from (seed, fold, step), so a resumed run repeats an uninterrupted one exactly.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging
from flax import nnx, struct

from ccfnet_jax import checkpoint as checkpoint_lib
from ccfnet_jax import convert, coords, decode, losses, metrics, models, parallel, schedules, targets
from ccfnet_jax import logging_utils
from ccfnet_jax.data import augment as augment_lib
from ccfnet_jax.data import pipeline, records
from ccfnet_jax.maps import Maps
from ccfnet_jax.models import layers

RESULTS_FILE = "results.json"
LOSSES: dict[str, Callable[..., Any]] = {"reference": losses.reference_loss, "paper": losses.paper_loss}
EVAL_KEYS = ("image", "points_xy_native", "native_hw", "pixel_spacing_mm", "point_valid", "disease", "example_valid")


class TrainingDivergedError(RuntimeError):
  """The training loss became NaN or infinite; the run stopped without saving the diverged state."""


@struct.dataclass
class TrainState:
  """Everything a training run carries from step to step (a pytree; replicated on the mesh).

  step: int32 scalar, optimizer steps taken. params / batch_stats: the model's `nnx.Param` / `nnx.BatchStat`
  variables (float32). opt_state: the optax state (float32).
  """

  step: jax.Array
  params: nnx.State
  batch_stats: nnx.State
  opt_state: optax.OptState


@dataclasses.dataclass(frozen=True)
class StepSettings:
  """Static settings of the train and eval steps (hashable; part of the jitted function's identity)."""

  image_size: int
  stride: int
  loss: str
  pos_weight: tuple[float, float]
  augment: augment_lib.AugmentConfig | None
  flip_tta: bool
  seed: int
  fold: int


# ---------------------------------------------------------------------------------------------------------------
# Config helpers.
# ---------------------------------------------------------------------------------------------------------------


def parse_folds(fold: str | int, num_folds: int) -> list[int]:
  """`config.fold` -> fold indices: 'all' -> [0, ..., num_folds - 1]; '2' -> [2]; '0,2' -> [0, 2]."""
  text = str(fold).strip().lower()
  if text == "all":
    return list(range(num_folds))
  try:
    folds = [int(part) for part in text.split(",") if part.strip()]
  except ValueError:
    raise ValueError(f"config.fold = {fold!r}: expected 'all', an integer or a comma list of integers") from None
  if not folds or any(not 0 <= k < num_folds for k in folds) or len(set(folds)) != len(folds):
    raise ValueError(f"config.fold = {fold!r}: folds must be distinct integers in [0, {num_folds})")
  return folds


def augment_config(config: ml_collections.ConfigDict) -> augment_lib.AugmentConfig | None:
  """`config.augment` -> AugmentConfig (None when every transform is off). Unknown fields raise ValueError."""
  fields = {f.name for f in dataclasses.fields(augment_lib.AugmentConfig)}
  given = dict(config.augment)
  unknown = sorted(set(given) - fields)
  if unknown:
    raise ValueError(f"config.augment has unknown fields {unknown}; known: {sorted(fields)}")
  values = {k: tuple(v) if isinstance(v, (list, tuple)) else v for k, v in given.items()}
  cfg = augment_lib.AugmentConfig(**values)
  return cfg if (cfg.geometric or cfg.photometric) else None


def global_eval_batch_size(config: ml_collections.ConfigDict) -> int:
  """The global evaluation batch: `config.eval_batch_size`, or the training batch where it is 0."""
  return config.eval_batch_size or config.batch_size


def steps_per_epoch(config: ml_collections.ConfigDict, num_train_examples: int) -> int:
  """One epoch = `config.passes_per_epoch` passes over the training studies, in steps of `config.batch_size`."""
  return max(1, math.ceil(config.passes_per_epoch * num_train_examples / config.batch_size))


def total_steps(config: ml_collections.ConfigDict, num_train_examples: int) -> int:
  """`config.num_steps` when set, else `config.num_epochs` epochs."""
  if config.num_steps:
    return int(config.num_steps)
  return int(config.num_epochs) * steps_per_epoch(config, num_train_examples)


def create_schedule(config: ml_collections.ConfigDict, num_steps: int, epoch_steps: int) -> optax.Schedule:
  """The learning-rate schedule of `config` (SPEC §9 by default)."""
  return schedules.create_schedule(config.schedule, peak_lr=config.learning_rate, min_lr=config.min_learning_rate,
                                   total_steps=num_steps, steps_per_epoch=epoch_steps,
                                   first_cycle_epochs=config.restart_epochs, cycle_mult=config.restart_mult,
                                   warmup_steps=config.warmup_steps)


def create_optimizer(config: ml_collections.ConfigDict, schedule: optax.Schedule) -> optax.GradientTransformation:
  """AdamW (torch defaults: betas 0.9 / 0.999, eps 1e-8; decay on every parameter) with `schedule`."""
  return optax.adamw(schedule, b1=0.9, b2=0.999, eps=1e-8, weight_decay=config.weight_decay)


def create_model(config: ml_collections.ConfigDict, key: jax.Array) -> nnx.Module:
  """The model of `config.model` (`models.create_model`), bf16 compute when `config.mixed_precision`."""
  dtype = jnp.bfloat16 if config.mixed_precision else jnp.float32
  model = models.create_model(config.model.name, depth=config.model.depth, msc=config.model.msc,
                              rngs=nnx.Rngs(key), dtype=dtype)
  backbone_init = config.model.get("backbone_init", "reference")
  if backbone_init == "kaiming":
    layers.reinitialize_convs(getattr(model, "backbone", model), jax.random.fold_in(key, 1))
  elif backbone_init != "reference":
    raise ValueError(f"config.model.backbone_init must be 'reference' or 'kaiming', got {backbone_init!r}")
  return model


def initial_model(config: ml_collections.ConfigDict, key: jax.Array) -> nnx.Module:
  """`create_model`, then `config.model.pretrained` (a torchvision ImageNet ResNet file) copied into the backbone.

  Raises:
    convert.StateDictError: naming the file and every key or shape that does not fit the backbone.
  """
  model = create_model(config, key)
  path = config.model.get("pretrained", "")
  if path:
    report = convert.load_torch_state_dict(model, os.path.expanduser(path), source="torchvision")
    _report(f"backbone initialised from {path} ({len(report.loaded)} tensors; "
            f"{len(report.kept)} head variables keep their init)")
  return model


def init_state(model: nnx.Module, tx: optax.GradientTransformation) -> tuple[nnx.GraphDef, nnx.GraphDef, TrainState]:
  """Splits a model into (train-mode graphdef, eval-mode graphdef, initial TrainState). Leaves `model` in eval mode.

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
  state = TrainState(step=jnp.zeros((), jnp.int32), params=params, batch_stats=batch_stats, opt_state=tx.init(params))
  return train_graphdef, eval_graphdef, state


def count_params(params: nnx.State) -> int:
  """Number of trainable parameters (BatchNorm running statistics excluded, as PyTorch's `parameters()`)."""
  return int(sum(np.prod(x.shape) for x in jax.tree.leaves(params)))


# ---------------------------------------------------------------------------------------------------------------
# The steps (pure functions; jitted with shardings by `jit_steps`).
# ---------------------------------------------------------------------------------------------------------------


def step_key(settings: StepSettings, step: jax.Array) -> jax.Array:
  """The augmentation key of `step`: derived from (seed, fold, step) only, so resuming repeats it exactly."""
  fold_key = jax.random.fold_in(jax.random.key(settings.seed), settings.fold)
  return jax.random.fold_in(jax.random.fold_in(fold_key, 1), step)


def train_step(state: TrainState, batch: Mapping[str, jax.Array], *, graphdef: nnx.GraphDef,
               tx: optax.GradientTransformation, schedule: optax.Schedule,
               settings: StepSettings) -> tuple[TrainState, dict[str, jax.Array]]:
  """One optimizer step on a global batch.

  Args:
    state: the TrainState (replicated).
    batch: `image [B, S, S, 3]` in [0, 1], `points_xy [B, 11, 2]` input px, `point_valid [B, 11]`,
      `disease [B, 11]`, `pixel_spacing_mm [B, 2]`, `native_hw [B, 2]` (sharded on "data").
    graphdef: the model's train-mode graphdef (BatchNorm with batch statistics over the global batch).
    tx, schedule: the optimizer and its learning-rate schedule (for logging the rate).
    settings: static step settings.
  Returns:
    (new state, scalars: loss, the loss parts, learning_rate, grad_norm).
  """
  batch = dict(batch)
  if settings.augment is not None:
    batch = augment_lib.augment_batch(step_key(settings, state.step), batch, settings.augment)
  image_hw = (settings.image_size, settings.image_size)
  target = targets.encode(batch["points_xy"], batch["point_valid"], image_hw, settings.stride,
                          disease=batch["disease"])
  loss_fn = LOSSES[settings.loss]

  def objective(params):
    # copy=True: fresh Variables at this trace level (BatchNorm updates its statistics in place).
    model = nnx.merge(graphdef, params, state.batch_stats, copy=True)
    maps = model(batch["image"])
    maps = Maps(*(m.astype(jnp.float32) for m in maps))
    total, parts = loss_fn(maps, target, batch["disease"], settings.pos_weight)
    return total, (parts, nnx.state(model, nnx.BatchStat))

  (loss, (parts, batch_stats)), grads = jax.value_and_grad(objective, has_aux=True)(state.params)
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  new_state = state.replace(step=state.step + 1, params=params, batch_stats=batch_stats, opt_state=opt_state)
  scalars = {"loss": loss, **parts, "learning_rate": schedule(state.step), "grad_norm": optax.global_norm(grads)}
  return new_state, scalars


def eval_step(state: TrainState, batch: Mapping[str, jax.Array], *, graphdef: nnx.GraphDef,
              settings: StepSettings) -> dict[str, jax.Array]:
  """Predictions on a global batch (eval mode, flip TTA), in native pixels, with the ground truth beside them.

  Returns:
    `pred_xy [B, 11, 2]` native px, `pred_prob [B, 11]`, and the batch's `points_xy_native`, `point_valid`,
    `disease`, `pixel_spacing_mm`, `example_valid`.
  """
  model = nnx.merge(graphdef, state.params, state.batch_stats)
  image = batch["image"]
  if settings.flip_tta:
    both = model(jnp.concatenate([image, image[:, :, ::-1, :]], axis=0))
    n = image.shape[0]
    maps = decode.merge_flip(Maps(*(m[:n] for m in both)), Maps(*(m[n:] for m in both)))
  else:
    maps = model(image)
  maps = Maps(*(m.astype(jnp.float32) for m in maps))
  decoded = decode.decode(maps, settings.stride)
  input_hw = jnp.asarray([settings.image_size, settings.image_size], jnp.float32)
  pred_xy = coords.scale_points(decoded.xy, input_hw, batch["native_hw"])
  out = {"pred_xy": pred_xy, "pred_prob": decoded.prob}
  out.update({k: batch[k] for k in ("points_xy_native", "point_valid", "disease", "pixel_spacing_mm",
                                    "example_valid")})
  return out


def jit_steps(mesh: jax.sharding.Mesh, *, train_graphdef: nnx.GraphDef, eval_graphdef: nnx.GraphDef,
              tx: optax.GradientTransformation, schedule: optax.Schedule, settings: StepSettings
              ) -> tuple[Callable[..., Any], Callable[..., Any]]:
  """(train step, eval step) jitted on `mesh`: state replicated (and donated), batch sharded on "data"."""
  replicated = parallel.replicated_sharding(mesh)
  data = parallel.data_sharding(mesh)
  train = jax.jit(
      lambda state, batch: train_step(state, batch, graphdef=train_graphdef, tx=tx, schedule=schedule,
                                      settings=settings),
      in_shardings=(replicated, data), out_shardings=(replicated, replicated), donate_argnums=0)
  evaluate_fn = jax.jit(lambda state, batch: eval_step(state, batch, graphdef=eval_graphdef, settings=settings),
                        in_shardings=(replicated, data), out_shardings=replicated)
  return train, evaluate_fn


# ---------------------------------------------------------------------------------------------------------------
# BatchNorm recalibration.
# ---------------------------------------------------------------------------------------------------------------


def batch_statistics(params: nnx.State, batch_stats: nnx.State, image: jax.Array, *,
                     graphdef: nnx.GraphDef) -> nnx.State:
  """The BatchNorm statistics (mean, biased var) of one batch: the train-mode forward pass with momentum 0."""
  model = nnx.merge(graphdef, params, batch_stats, copy=True)
  for _, module in nnx.iter_graph(model):
    if isinstance(module, nnx.BatchNorm):
      module.momentum = 0.0  # the running statistics become this batch's
  model(image)
  return nnx.state(model, nnx.BatchStat)


@functools.lru_cache(maxsize=8)
def _jit_batch_statistics(graphdef: nnx.GraphDef, mesh: jax.sharding.Mesh) -> Callable[..., nnx.State]:
  """`batch_statistics` jitted on `mesh`, built once per (model, mesh): a fold recalibrates at every evaluation."""
  return jax.jit(functools.partial(batch_statistics, graphdef=graphdef),
                 in_shardings=(parallel.replicated_sharding(mesh), parallel.replicated_sharding(mesh),
                               parallel.data_sharding(mesh)),
                 out_shardings=parallel.replicated_sharding(mesh))


def recalibrate_batch_stats(state: TrainState, batches: Any, *, graphdef: nnx.GraphDef,
                            mesh: jax.sharding.Mesh) -> TrainState:
  """`state` with its BatchNorm running statistics replaced by the mean of per-batch statistics over `batches`.

  Training normalises augmented images with their batch statistics, and the running averages follow those images;
  evaluation sees unaugmented ones. Averaging the statistics of unaugmented training images ("precise BN") matches
  the statistics to what evaluation sees. The parameters are untouched, and training itself never reads the running
  statistics, so only the evaluations (and what the checkpoints hold for inference) change.

  Args:
    state: the replicated TrainState.
    batches: host batches with at least `image` (`pipeline.calibration_dataset`: full batches, no padding).
    graphdef: the model's train-mode graphdef.
    mesh: the data-parallel mesh.
  Returns:
    The new state; `state` itself when `batches` is empty.
  """
  stats_fn = _jit_batch_statistics(graphdef, mesh)
  total, count = None, 0
  for host_batch in batches:
    image = pipeline.to_global({"image": host_batch["image"]}, mesh)["image"]
    stats = stats_fn(state.params, state.batch_stats, image)
    total = stats if total is None else jax.tree.map(jnp.add, total, stats)
    count += 1
  if total is None:
    return state
  return state.replace(batch_stats=jax.tree.map(lambda x: x / count, total))


# ---------------------------------------------------------------------------------------------------------------
# Evaluation on the validation fold.
# ---------------------------------------------------------------------------------------------------------------


def evaluate(jitted_eval_step: Callable[..., Any], state: TrainState, val_source: Sequence[Any], *,
             batch_size: int, image_size: int, mesh: jax.sharding.Mesh,
             options: pipeline.PipelineOptions = pipeline.PipelineOptions()) -> dict[str, float]:
  """The paper's metrics (`metrics.evaluate`, in %) of `state` on every study of `val_source`."""
  outputs = []
  for host_batch in pipeline.eval_dataset(val_source, batch_size=batch_size, image_size=image_size,
                                          options=options):
    outputs.append(jitted_eval_step(state, pipeline.to_global({k: host_batch[k] for k in EVAL_KEYS}, mesh)))
  outputs = jax.device_get(outputs)  # the one host sync of an evaluation
  cat = {k: np.concatenate([np.asarray(o[k]) for o in outputs]) for k in outputs[0]}
  keep = cat["example_valid"].astype(bool)
  return metrics.evaluate(cat["pred_xy"][keep], cat["pred_prob"][keep], cat["points_xy_native"][keep],
                          cat["point_valid"][keep], cat["disease"][keep], cat["pixel_spacing_mm"][keep])


# ---------------------------------------------------------------------------------------------------------------
# One fold.
# ---------------------------------------------------------------------------------------------------------------


def data_dir_of(config: ml_collections.ConfigDict, workdir: str) -> str:
  """`config.data_dir`, or `<workdir>/tensorflow_datasets` when empty."""
  return os.path.abspath(os.path.expanduser(config.data_dir or os.path.join(workdir, "tensorflow_datasets")))


def open_sources(config: ml_collections.ConfigDict, fold: int, workdir: str) -> tuple[Sequence[Any], Sequence[Any]]:
  """(train_source, val_source) of `fold`; process 0 builds the dataset on first use while the others wait."""
  import tfds_spine  # pylint: disable=g-import-not-at-top  (TFDS is only needed when opening TFDS data)
  if config.dataset not in tfds_spine.DATASETS:
    raise ValueError(f"config.dataset = {config.dataset!r}: expected one of {tfds_spine.DATASETS}")
  kwargs: dict[str, Any] = {}
  manual_dir = None
  if config.dataset == "phantom":
    kwargs = {"num_studies": int(config.phantom_studies), "seed": int(config.phantom_seed)}
  else:
    if not config.manual_dir:
      raise ValueError("config.dataset = 'tianchi' needs config.manual_dir: the folder holding "
                       "lumbar_train150/ and lumbar_train150_annotation.json (e.g. ../shared/data/tianchi)")
    manual_dir = os.path.abspath(os.path.expanduser(config.manual_dir))
    if not os.path.isdir(manual_dir):
      raise FileNotFoundError(f"config.manual_dir = {config.manual_dir!r}: no such directory")
  data_dir = data_dir_of(config, workdir)

  def open_():
    return tfds_spine.open_fold(config.dataset, data_dir, manual_dir, fold=fold, num_folds=config.num_folds, **kwargs)

  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    if jax.process_index() == 0:
      open_()
    multihost_utils.sync_global_devices("ccfnet_dataset_built")
  return open_()


def flush_window(window: list[tuple[int, dict[str, jax.Array]]], *, fold: int, checkpoints: checkpoint_lib.Checkpointer
                  ) -> dict[str, float]:
  """Fetches the scalars of the steps since the last flush (one host sync), checks them, returns their means.

  Raises:
    TrainingDivergedError: when any step's loss is NaN or infinite.
  """
  fetched = jax.device_get([scalars for _, scalars in window])
  for (step, _), scalars in zip(window, fetched):
    loss = float(scalars["loss"])
    if not math.isfinite(loss):
      last_good = checkpoints.latest_step()
      raise TrainingDivergedError(
          f"fold {fold}: the training loss is {loss} at step {step}: stopped. Nothing after step "
          f"{last_good if last_good is not None else 0} was saved; the last good checkpoint is "
          f"{'step ' + str(last_good) if last_good is not None else 'none'} in {checkpoints.directory}. "
          "Lower config.learning_rate or try config.mixed_precision=False.")
  return {name: float(np.mean([float(s[name]) for s in fetched])) for name in fetched[0]}


def _report(message: str) -> None:
  """A line for the console (process 0) and the log."""
  logging.info("%s", message)
  if jax.process_index() == 0:
    print(message, flush=True)


def epoch_of(step: int, epoch_steps: int) -> float | int:
  return step // epoch_steps if step % epoch_steps == 0 else round(step / epoch_steps, 3)


def summarize_history(history: Sequence[Mapping[str, Any]]) -> dict[str, dict[str, Any]]:
  """{'best': the evaluation with the highest score (earliest on ties), 'last': the final one}; each holds the
  metrics plus 'epoch' and 'step'."""
  if not history:
    raise ValueError("no evaluation was run")
  best = max(history, key=lambda h: checkpoint_lib.best_rank(h["score"], h["step"]))
  keys = list(metrics.METRIC_NAMES) + ["epoch", "step"]
  return {"best": {k: best[k] for k in keys}, "last": {k: history[-1][k] for k in keys}}


def train_fold(config: ml_collections.ConfigDict, fold: int, workdir: str | os.PathLike,
               *, mesh: jax.sharding.Mesh | None = None) -> dict[str, Any]:
  """Trains on every fold but `fold`, evaluates on `fold` every epoch; resumes from `workdir/fold_K/checkpoints`.

  Returns:
    {'best': {metrics..., 'epoch', 'step'}, 'last': {...}, 'params': parameter count} (also written to
    `workdir/fold_K/results.json`).
  Raises:
    TrainingDivergedError: NaN or infinite loss (the last good checkpoint stays as it was).
  """
  workdir = os.path.abspath(os.fspath(workdir))
  fold_dir = os.path.join(workdir, f"fold_{fold}")
  mesh = parallel.make_mesh() if mesh is None else mesh
  eval_batch_size = global_eval_batch_size(config)
  parallel.check_global_batch_size(config.batch_size, mesh)
  parallel.check_global_batch_size(eval_batch_size, mesh, "eval_batch_size")
  if config.loss not in LOSSES:
    raise ValueError(f"config.loss = {config.loss!r}: expected one of {sorted(LOSSES)}")

  # Data.
  train_source, val_source = open_sources(config, fold, workdir)
  counts = losses.label_counts(records.disease_labels(train_source))
  pos_weight = (losses.class_balanced_pos_weight(*counts["vertebra"]),
                losses.class_balanced_pos_weight(*counts["disc"]))
  epoch_steps = steps_per_epoch(config, len(train_source))
  num_steps = total_steps(config, len(train_source))
  eval_every = int(config.eval_every_steps or epoch_steps)
  checkpoint_every = int(config.checkpoint_every_steps or eval_every)
  for name, value in (("log_every_steps", config.log_every_steps), ("eval_every_steps", eval_every),
                      ("checkpoint_every_steps", checkpoint_every), ("num_steps", num_steps)):
    if value <= 0:
      raise ValueError(f"config.{name} must be a positive number of steps, got {value}")
  options = pipeline.PipelineOptions(num_threads=config.num_data_threads, worker_count=config.num_data_workers)
  train_iter = iter(pipeline.train_dataset(train_source, batch_size=config.batch_size, image_size=config.image_size,
                                           seed=config.seed * 1000 + fold, options=options))
  _report(f"fold {fold}: {len(train_source)} train / {len(val_source)} val studies; label counts {counts} -> "
          f"pos_weight (vertebra, disc) ({pos_weight[0]:.4f}, {pos_weight[1]:.4f}); {num_steps} steps, "
          f"{epoch_steps} per epoch; {jax.device_count()} devices on {jax.process_count()} process(es)")

  # Model, optimizer, state.
  fold_key = jax.random.fold_in(jax.random.key(config.seed), fold)
  model = initial_model(config, jax.random.fold_in(fold_key, 0))
  schedule = create_schedule(config, num_steps, epoch_steps)
  tx = create_optimizer(config, schedule)
  train_graphdef, eval_graphdef, state = init_state(model, tx)
  num_params = count_params(state.params)
  settings = StepSettings(image_size=int(config.image_size), stride=int(model.stride), loss=config.loss,
                          pos_weight=pos_weight, augment=augment_config(config), flip_tta=bool(config.flip_tta),
                          seed=int(config.seed), fold=int(fold))
  state = parallel.replicate(state, mesh)
  jit_train, jit_eval = jit_steps(mesh, train_graphdef=train_graphdef, eval_graphdef=eval_graphdef, tx=tx,
                                  schedule=schedule, settings=settings)

  # Resume.
  checkpoints = checkpoint_lib.Checkpointer(os.path.join(fold_dir, "checkpoints"), keep=config.keep_checkpoints)
  history: list[dict[str, Any]] = []
  latest = checkpoints.latest_step()
  if latest is not None:
    state, extra = checkpoints.restore(latest, checkpoint_lib.abstract_like(state, parallel.replicated_sharding(mesh)))
    train_iter.set_state(extra["data_iterator"])
    history = list(extra.get("evals", []))
    _report(f"fold {fold}: resumed from step {latest} ({checkpoints.directory})")
  step = int(jax.device_get(state.step))

  writer = logging_utils.MetricWriter(fold_dir)
  progress = logging_utils.Progress(num_steps, step, batch_size=config.batch_size, prefix=f"fold {fold} | ")
  window: list[tuple[int, dict[str, jax.Array]]] = []
  try:
    if step == 0:
      writer.write(0, "config", {"params": num_params, "pos_weight_vertebra": pos_weight[0],
                                 "pos_weight_disc": pos_weight[1], "steps": num_steps, "steps_per_epoch": epoch_steps})
    while step < num_steps:
      batch = pipeline.to_global(next(train_iter), mesh)
      state, scalars = jit_train(state, batch)
      step += 1
      window.append((step, scalars))
      is_eval = step % eval_every == 0 or step == num_steps
      is_checkpoint = is_eval or step % checkpoint_every == 0
      if step % config.log_every_steps == 0 or is_checkpoint:
        means = flush_window(window, fold=fold, checkpoints=checkpoints)
        window = []
        writer.write(step, "train", means)
        progress.update(step, {"loss": means["loss"], "lr": means["learning_rate"]})
      eval_metrics = None
      if is_eval:
        started = time.perf_counter()
        if config.get("recalibrate_bn", False):
          state = recalibrate_batch_stats(state, pipeline.calibration_dataset(
              train_source, batch_size=config.batch_size, image_size=config.image_size, options=options),
                                          graphdef=train_graphdef, mesh=mesh)
        eval_metrics = evaluate(jit_eval, state, val_source, batch_size=eval_batch_size,
                                image_size=config.image_size, mesh=mesh, options=options)
        history.append({**eval_metrics, "epoch": epoch_of(step, epoch_steps), "step": step})
        writer.write(step, "eval", eval_metrics)
        _report(f"fold {fold} | step {step} | epoch {history[-1]['epoch']} | eval "
                + " ".join(f"{k} {v:.2f}" for k, v in eval_metrics.items())
                + f" ({time.perf_counter() - started:.1f}s)")
        progress.reset_clock(step)
      if is_checkpoint:
        # The iterator state (batches read so far) is the same on every process; process 0's copy is saved.
        extra = {"data_iterator": train_iter.get_state(), "evals": history, "fold": fold}
        checkpoints.save(step, state, extra, metrics=eval_metrics)
    checkpoints.wait()
  finally:
    checkpoints.close()
    writer.close()

  result = {**summarize_history(history), "params": num_params}
  if jax.process_index() == 0:
    write_json(os.path.join(fold_dir, RESULTS_FILE), result)
  return result


# ---------------------------------------------------------------------------------------------------------------
# All folds.
# ---------------------------------------------------------------------------------------------------------------


def write_json(path: str | os.PathLike, value: Any, indent: int | None = 2) -> None:
  """Writes JSON atomically (a temporary file renamed), creating the folder."""
  path = os.fspath(path)
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  tmp = path + ".tmp"
  with open(tmp, "w", encoding="utf-8") as f:
    json.dump(value, f, indent=indent)
  os.replace(tmp, path)


def collect_results(workdir: str | os.PathLike, num_folds: int) -> dict[str, Any]:
  """`workdir/results.json`'s content from every `fold_K/results.json` present.

  Returns:
    {'folds': {'K': {'best': {...metrics, 'epoch', 'step'}, 'last': {...}}}, and, when all `num_folds` folds are
    present, 'mean' and 'std' (ddof 0) = {'best': {metric: value}, 'last': {metric: value}} over the folds}.
  """
  folds: dict[str, Any] = {}
  for k in range(num_folds):
    path = os.path.join(os.fspath(workdir), f"fold_{k}", RESULTS_FILE)
    if os.path.isfile(path):
      with open(path, encoding="utf-8") as f:
        fold_result = json.load(f)
      folds[str(k)] = {"best": fold_result["best"], "last": fold_result["last"]}
  results: dict[str, Any] = {"folds": folds}
  if len(folds) == num_folds:
    results["mean"], results["std"] = {}, {}
    for which in ("best", "last"):
      mean, std = metrics.summarize_folds([{m: folds[k][which][m] for m in metrics.METRIC_NAMES} for k in folds])
      results["mean"][which], results["std"][which] = mean, std
  return results


def model_label(config: ml_collections.ConfigDict) -> str:
  """'R18-MSC', 'R50', ... as in the paper's Table 1."""
  return f"R{config.model.depth}" + ("-MSC" if config.model.msc else "")


def format_table(results: Mapping[str, Any], config: ml_collections.ConfigDict, num_params: int | None = None) -> str:
  """A Markdown table like a row of the paper's Table 1 (metrics in %, mean +- std over folds when all ran)."""
  columns = ("disc_recall", "vertebra_recall", "disc_auc", "vertebra_auc", "score")
  header = ("| method | backbone | params M | folds | epoch | disc recall | vertebra recall | disc AUC | "
            "vertebra AUC | score |")
  lines = [header, "|" + "---|" * 10]
  params = f"{num_params / 1e6:.2f}" if num_params else "?"
  name = "CCF-Net" if config.model.name == "ccfnet" else config.model.name
  folds = results["folds"]
  for which in ("best", "last"):
    if "mean" in results:
      cells = [f"{results['mean'][which][c]:.2f} ± {results['std'][which][c]:.2f}" for c in columns]
      fold_text = f"{len(folds)}-fold mean ± std"
      epoch = "/".join(str(folds[k][which]["epoch"]) for k in sorted(folds))
      lines.append(f"| {name} | {model_label(config)} | {params} | {fold_text} | {which}: {epoch} | "
                   + " | ".join(cells) + " |")
    for k in sorted(folds, key=int):
      row = folds[k][which]
      cells = [f"{row[c]:.2f}" for c in columns]
      lines.append(f"| {name} | {model_label(config)} | {params} | fold {k} | {which}: {row['epoch']} | "
                   + " | ".join(cells) + " |")
  return "\n".join(lines)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str | os.PathLike) -> dict[str, Any]:
  """Trains and evaluates the folds of `config.fold` in turn; writes and returns `workdir/results.json`'s content.

  Folds whose run finished earlier in the same workdir are restored from their final checkpoint (no retraining).
  """
  workdir = os.path.abspath(os.fspath(workdir))
  os.makedirs(workdir, exist_ok=True)
  folds = parse_folds(config.fold, config.num_folds)
  if jax.process_index() == 0:
    with open(os.path.join(workdir, "config.json"), "w", encoding="utf-8") as f:
      f.write(config.to_json_best_effort(indent=2))
  if config.get("parallel_folds", False) and len(folds) > 1:
    if config.get("recalibrate_bn", False):
      raise ValueError("config.recalibrate_bn is not supported with config.parallel_folds; train the folds in turn")
    from ccfnet_jax import parallel_folds  # pylint: disable=g-import-not-at-top  (it imports this module)
    fold_results = parallel_folds.train_folds(config, folds, workdir)
  else:
    fold_results = {fold: train_fold(config, fold, workdir) for fold in folds}
  num_params = fold_results[folds[-1]]["params"]
  results = collect_results(workdir, config.num_folds)
  if jax.process_index() == 0:
    write_json(os.path.join(workdir, RESULTS_FILE), results)
    print(format_table(results, config, num_params), flush=True)
  return results
