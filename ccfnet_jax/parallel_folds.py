"""All cross-validation folds trained at once: one jitted program steps every fold's model (`config.parallel_folds`).

The model is small and the data tiny, so one fold's step leaves an accelerator mostly idle. Here the folds' train
states (parameters, BatchNorm statistics, optimizer states; `train.TrainState`) are stacked along a leading fold
axis `[F, ...]` and `train.train_step` -- the same pure step that trains one fold -- is `jax.vmap`ped over it (on
accelerators; on CPU the folds' steps are unrolled side by side in the program: `default_fold_batching`). Each
fold keeps everything it has when trained alone: its own model initialisation (from (seed, fold)), its own data
stream (`pipeline.train_dataset` with the fold's seed; one batch per fold per step, stacked to `[F, B, ...]`), its own
augmentation keys (from (seed, fold, step)) and its own BCE `pos_weight` (from its training labels). So fold k's
parameters after n steps equal those of `train.train_fold` for fold k after n steps, up to float rounding.

Differences from training the folds one after another:
- Every fold takes the same number of steps per epoch: the largest of the folds' `train.steps_per_epoch` (folds
  differ in size by at most one study), so evaluations and learning-rate restarts fall on the same steps. With
  equal training-set sizes (e.g. a study count divisible by the number of folds) nothing differs.
- Evaluation runs fold by fold on each fold's validation studies (`train.evaluate`), after the same step.

Outputs are those of sequential training: `workdir/fold_K/{results.json, metrics.jsonl, tensorboard/, checkpoints/}`
(each fold's checkpoints hold its own unstacked state and data-iterator state, so either trainer can resume them),
and `train.train_and_evaluate` writes `workdir/results.json` as usual.
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from jax.sharding import NamedSharding, PartitionSpec

from ccfnet_jax import checkpoint as checkpoint_lib
from ccfnet_jax import logging_utils, losses, parallel, train
from ccfnet_jax.data import pipeline, records

FOLD_AXIS = 0
"""Axis of the stacked states, batches and scalars that indexes the fold."""


# ---------------------------------------------------------------------------------------------------------------
# Stacking.
# ---------------------------------------------------------------------------------------------------------------


def stack(trees: Sequence[Any]) -> Any:
  """Pytrees of identical structure -> one pytree whose leaves gain a leading fold axis `[F, ...]`."""
  if not trees:
    raise ValueError("stack: no trees given")
  return jax.tree.map(lambda *leaves: jnp.stack(leaves, axis=FOLD_AXIS), *trees)


def unstack(tree: Any, index: int) -> Any:
  """The `index`-th fold's pytree of a stacked pytree (leaves `[F, ...]` -> `[...]`)."""
  return jax.tree.map(lambda x: x[index], tree)


def stacked_data_sharding(mesh: jax.sharding.Mesh) -> NamedSharding:
  """Stacked batches `[F, B, ...]`: the fold axis whole, the batch axis split over the mesh's "data" axis."""
  return NamedSharding(mesh, PartitionSpec(None, parallel.DATA_AXIS))


def stacked_to_global(batches: Sequence[Mapping[str, np.ndarray]], mesh: jax.sharding.Mesh) -> dict[str, jax.Array]:
  """One host batch per fold -> global arrays `[F, B, ...]` sharded by `stacked_data_sharding` (any process count)."""
  sharding = stacked_data_sharding(mesh)
  out = {}
  for key in batches[0]:
    value = np.stack([np.asarray(b[key]) for b in batches], axis=FOLD_AXIS)
    if value.dtype.kind not in "biuf":
      raise TypeError(f"stacked_to_global: batch[{key!r}] has dtype {value.dtype}; only numeric arrays go to devices")
    out[key] = jax.make_array_from_process_local_data(sharding, value)
  return out


# ---------------------------------------------------------------------------------------------------------------
# The stacked step.
# ---------------------------------------------------------------------------------------------------------------


def fold_train_step(state: train.TrainState, batch: Mapping[str, jax.Array], fold: jax.Array, pos_weight: jax.Array,
                    *, graphdef: Any, tx: Any, schedule: Any, settings: train.StepSettings
                    ) -> tuple[train.TrainState, dict[str, jax.Array]]:
  """`train.train_step` of one fold with the fold index and `pos_weight [2]` (vertebra, disc) as traced arrays.

  Everything else comes from `settings`; the result equals `train.train_step` with
  `settings.fold = fold, settings.pos_weight = pos_weight`.
  """
  fold_settings = dataclasses.replace(settings, fold=fold, pos_weight=pos_weight)
  return train.train_step(state, batch, graphdef=graphdef, tx=tx, schedule=schedule, settings=fold_settings)


FOLD_BATCHING = ("vmap", "unroll")
"""How the stacked step runs the folds: `vmap` (each conv becomes one grouped conv over the folds: bigger kernels,
which fill an accelerator) or `unroll` (the folds' steps side by side in the one program, each with its own convs)."""


def default_fold_batching(mesh: jax.sharding.Mesh) -> str:
  """`unroll` on CPU devices, `vmap` elsewhere.

  XLA:CPU runs grouped convs far slower than the same convs one by one (the vmapped R18-MSC step of 4 folds at
  256 px, batch 8 took 7.8x the time of 4 single-fold steps on 2 cores); unrolled, the CPU does the folds' work at
  the single-fold speed. (`jax.lax.map` over the folds was slower still, ~25x, so it is not offered.)
  """
  return "unroll" if mesh.devices.flat[0].platform == "cpu" else "vmap"


def stacked_train_step(states: train.TrainState, batches: Mapping[str, jax.Array], folds: jax.Array,
                       pos_weights: jax.Array, *, batching: str = "vmap",
                       **step_kwargs: Any) -> tuple[train.TrainState, dict[str, jax.Array]]:
  """One optimizer step of every fold: `fold_train_step` over the leading fold axis, vmapped or unrolled.

  Args:
    states: TrainState with leaves `[F, ...]`.
    batches: the batch contract with a leading fold axis, e.g. `image [F, B, S, S, 3]`.
    folds: int32 `[F]` fold indices (they pick the augmentation keys). pos_weights: float32 `[F, 2]`.
    batching: one of `FOLD_BATCHING` (the same results up to float rounding; see `default_fold_batching`).
    **step_kwargs: graphdef, tx, schedule, settings (as `train.train_step`).
  Returns:
    (new stacked states, scalars each `[F]`).
  """
  def one(s, b, f, w):
    return fold_train_step(s, b, f, w, **step_kwargs)

  if batching == "vmap":
    return jax.vmap(one)(states, batches, folds, pos_weights)
  if batching != "unroll":
    raise ValueError(f"fold batching {batching!r}: expected one of {FOLD_BATCHING}")
  return stack([one(unstack(states, k), unstack(batches, k), folds[k], pos_weights[k])
                for k in range(folds.shape[0])])


def jit_stacked_train_step(mesh: jax.sharding.Mesh, *, batching: str | None = None,
                           **step_kwargs: Any) -> Callable[..., Any]:
  """`stacked_train_step` jitted on `mesh`: states replicated and donated, batches `[F, B, ...]` split on "data".

  `batching` defaults to `default_fold_batching(mesh)`.
  """
  replicated = parallel.replicated_sharding(mesh)
  batching = batching or default_fold_batching(mesh)

  def step(states, batches, folds, pos_weights):
    return stacked_train_step(states, batches, folds, pos_weights, batching=batching, **step_kwargs)

  return jax.jit(step, in_shardings=(replicated, stacked_data_sharding(mesh), replicated, replicated),
                 out_shardings=(replicated, replicated), donate_argnums=0)


# ---------------------------------------------------------------------------------------------------------------
# Training all folds.
# ---------------------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class _Fold:
  """Host-side bookkeeping of one fold of a stacked run."""

  index: int
  dir: str
  train_source: Sequence[Any]
  val_source: Sequence[Any]
  pos_weight: tuple[float, float]
  train_iter: Any
  checkpoints: checkpoint_lib.Checkpointer
  writer: logging_utils.MetricWriter
  history: list[dict[str, Any]] = dataclasses.field(default_factory=list)


def _common_resume_step(folds: Sequence[_Fold]) -> int | None:
  """The newest checkpoint step that every fold has, None when no fold has one.

  Raises:
    ValueError: when some folds have checkpoints but no step is shared by all (e.g. folds trained separately for
      different lengths): resume them with sequential training instead.
  """
  steps = [set(f.checkpoints.all_steps()) for f in folds]
  if not any(steps):
    return None
  common = set.intersection(*steps)
  if not common:
    raise ValueError("parallel_folds: cannot resume: the folds' checkpoints share no step (" +
                     ", ".join(f"fold {f.index}: {sorted(s)}" for f, s in zip(folds, steps)) +
                     "); train them with config.parallel_folds=False or use a fresh workdir")
  return max(common)


def train_folds(config: ml_collections.ConfigDict, folds: Sequence[int], workdir: str | os.PathLike,
                *, mesh: jax.sharding.Mesh | None = None) -> dict[int, dict[str, Any]]:
  """Trains `folds` in one jitted program (stacked states, vmapped `train.train_step`); evaluates each fold.

  Resumes from the folds' checkpoints (the newest step all of them have). Writes `workdir/fold_K/results.json` like
  `train.train_fold`.

  Returns:
    fold -> {'best': {metrics..., 'epoch', 'step'}, 'last': {...}, 'params': parameter count}.
  Raises:
    train.TrainingDivergedError: NaN or infinite loss in any fold (nothing after the last checkpoint is saved).
  """
  workdir = os.path.abspath(os.fspath(workdir))
  folds = [int(k) for k in folds]
  if not folds or len(set(folds)) != len(folds):
    raise ValueError(f"parallel_folds: folds must be distinct, got {folds}")
  mesh = parallel.make_mesh() if mesh is None else mesh
  eval_batch_size = train.global_eval_batch_size(config)
  parallel.check_global_batch_size(config.batch_size, mesh)
  parallel.check_global_batch_size(eval_batch_size, mesh, "eval_batch_size")
  if config.loss not in train.LOSSES:
    raise ValueError(f"config.loss = {config.loss!r}: expected one of {sorted(train.LOSSES)}")
  options = pipeline.PipelineOptions(num_threads=config.num_data_threads, worker_count=config.num_data_workers)

  # Data: every fold its own sources, label counts and stream.
  opened = [train.open_sources(config, k, workdir) for k in folds]
  epoch_steps = max(train.steps_per_epoch(config, len(tr)) for tr, _ in opened)
  num_steps = int(config.num_steps) if config.num_steps else int(config.num_epochs) * epoch_steps
  eval_every = int(config.eval_every_steps or epoch_steps)
  checkpoint_every = int(config.checkpoint_every_steps or eval_every)

  # Models, optimizer, states (one per fold, stacked).
  schedule = train.create_schedule(config, num_steps, epoch_steps)
  tx = train.create_optimizer(config, schedule)
  states, fold_infos = [], []
  train_graphdef = eval_graphdef = None
  stride = None
  for k, (train_source, val_source) in zip(folds, opened):
    counts = losses.label_counts(records.disease_labels(train_source))
    pos_weight = (losses.class_balanced_pos_weight(*counts["vertebra"]),
                  losses.class_balanced_pos_weight(*counts["disc"]))
    # The same key derivation as train.train_fold: fold k's model is initialised exactly as when trained alone.
    fold_key = jax.random.fold_in(jax.random.key(config.seed), k)
    model = train.initial_model(config, jax.random.fold_in(fold_key, 0))
    train_graphdef, eval_graphdef, state = train.init_state(model, tx)
    stride = int(model.stride)
    states.append(state)
    fold_dir = os.path.join(workdir, f"fold_{k}")
    train_iter = iter(pipeline.train_dataset(train_source, batch_size=config.batch_size,
                                             image_size=config.image_size, seed=config.seed * 1000 + k,
                                             options=options))
    fold_infos.append(_Fold(index=k, dir=fold_dir, train_source=train_source, val_source=val_source,
                            pos_weight=pos_weight, train_iter=train_iter,
                            checkpoints=checkpoint_lib.Checkpointer(os.path.join(fold_dir, "checkpoints"),
                                                                    keep=config.keep_checkpoints),
                            writer=logging_utils.MetricWriter(fold_dir)))
    logging.info("fold %d: %d train / %d val studies, label counts %s -> pos_weight %s", k, len(train_source),
                 len(val_source), counts, pos_weight)
  num_params = train.count_params(states[0].params)
  settings = train.StepSettings(image_size=int(config.image_size), stride=stride, loss=config.loss,
                                pos_weight=fold_infos[0].pos_weight, augment=train.augment_config(config),
                                flip_tta=bool(config.flip_tta), seed=int(config.seed), fold=folds[0])
  replicated = parallel.replicated_sharding(mesh)
  fold_ids = parallel.replicate(np.asarray(folds, np.int32), mesh)
  pos_weights = parallel.replicate(np.asarray([f.pos_weight for f in fold_infos], np.float32), mesh)
  jit_train = jit_stacked_train_step(mesh, batching=config.get("fold_batching", "") or None, graphdef=train_graphdef,
                                     tx=tx, schedule=schedule, settings=settings)
  # The eval step reads only image_size, stride and flip_tta from the settings: one compiled step serves every fold.
  _, jit_eval = train.jit_steps(mesh, train_graphdef=train_graphdef, eval_graphdef=eval_graphdef, tx=tx,
                                schedule=schedule, settings=settings)
  logging.info("parallel folds %s: %d steps (%d per epoch), mesh %s", folds, num_steps, epoch_steps, dict(mesh.shape))

  try:
    # Resume: each fold from its own checkpoint of a step all folds share.
    resume_step = _common_resume_step(fold_infos)
    if resume_step is not None:
      restored = []
      for fold, state in zip(fold_infos, states):
        state, extra = fold.checkpoints.restore(resume_step, checkpoint_lib.abstract_like(state, replicated))
        fold.train_iter.set_state(extra["data_iterator"])
        fold.history = list(extra.get("evals", []))
        restored.append(state)
      states = restored
      logging.info("parallel folds: resumed from step %d", resume_step)
    stacked = parallel.replicate(stack(states), mesh)
    del states
    step = int(jax.device_get(stacked.step[0]))
    _train_loop(config, fold_infos, stacked, step, num_steps=num_steps, epoch_steps=epoch_steps,
                eval_every=eval_every, checkpoint_every=checkpoint_every, eval_batch_size=eval_batch_size,
                jit_train=jit_train, jit_eval=jit_eval, fold_ids=fold_ids, pos_weights=pos_weights, mesh=mesh,
                options=options, num_params=num_params)
    for fold in fold_infos:
      fold.checkpoints.wait()
  finally:
    for fold in fold_infos:
      fold.checkpoints.close()
      fold.writer.close()

  results = {}
  for fold in fold_infos:
    result = {**train.summarize_history(fold.history), "params": num_params}
    if jax.process_index() == 0:
      train.write_json(os.path.join(fold.dir, train.RESULTS_FILE), result)
    results[fold.index] = result
  return results


def _train_loop(config: ml_collections.ConfigDict, folds: Sequence[_Fold], stacked: train.TrainState, step: int, *,
                num_steps: int, epoch_steps: int, eval_every: int, checkpoint_every: int, eval_batch_size: int,
                jit_train: Callable[..., Any], jit_eval: Callable[..., Any], fold_ids: jax.Array,
                pos_weights: jax.Array, mesh: jax.sharding.Mesh, options: pipeline.PipelineOptions,
                num_params: int) -> None:
  """The loop of `train_folds`: stacked steps; one host sync every `log_every_steps`; per-fold evals and saves."""
  names = ",".join(str(f.index) for f in folds)
  progress = logging_utils.Progress(num_steps, step, batch_size=config.batch_size * len(folds),
                                    prefix=f"folds {names} | ")
  if step == 0:
    for fold in folds:
      fold.writer.write(0, "config", {"params": num_params, "pos_weight_vertebra": fold.pos_weight[0],
                                      "pos_weight_disc": fold.pos_weight[1], "steps": num_steps,
                                      "steps_per_epoch": epoch_steps, "parallel_folds": len(folds)})
  replicated = parallel.replicated_sharding(mesh)
  take_fold = jax.jit(unstack, static_argnums=1, out_shardings=replicated)
  window: list[tuple[int, dict[str, jax.Array]]] = []
  while step < num_steps:
    batches = stacked_to_global([next(fold.train_iter) for fold in folds], mesh)
    stacked, scalars = jit_train(stacked, batches, fold_ids, pos_weights)
    step += 1
    window.append((step, scalars))
    is_eval = step % eval_every == 0 or step == num_steps
    is_checkpoint = is_eval or step % checkpoint_every == 0
    if step % config.log_every_steps == 0 or is_checkpoint:
      fetched = jax.device_get([s for _, s in window])  # the one host sync of a logging interval
      for i, fold in enumerate(folds):
        per_fold = [(st, {name: value[i] for name, value in s.items()}) for (st, _), s in zip(window, fetched)]
        means = train.flush_window(per_fold, fold=fold.index,
                                    checkpoints=fold.checkpoints)
        fold.writer.write(step, "train", means)
      window = []
      progress.update(step, {"loss": float(np.mean(fetched[-1]["loss"]))})
    for i, fold in enumerate(folds):
      eval_metrics = None
      state = take_fold(stacked, i) if (is_eval or is_checkpoint) else None
      if is_eval:
        started = time.perf_counter()
        eval_metrics = train.evaluate(jit_eval, state, fold.val_source, batch_size=eval_batch_size,
                                      image_size=config.image_size, mesh=mesh, options=options)
        epoch = train.epoch_of(step, epoch_steps)
        fold.history.append({**eval_metrics, "epoch": epoch, "step": step})
        fold.writer.write(step, "eval", eval_metrics)
        logging.info("fold %d step %d eval (%.1fs): %s", fold.index, step, time.perf_counter() - started,
                     ", ".join(f"{k} {v:.2f}" for k, v in eval_metrics.items()))
        if jax.process_index() == 0:
          print(f"fold {fold.index} | step {step} | epoch {fold.history[-1]['epoch']} | eval " +
                " ".join(f"{k} {v:.2f}" for k, v in eval_metrics.items()), flush=True)
      if is_checkpoint:
        extra = {"data_iterator": fold.train_iter.get_state(), "evals": fold.history, "fold": fold.index}
        fold.checkpoints.save(step, state, extra, metrics=eval_metrics)
    if is_eval:
      progress.reset_clock(step)
