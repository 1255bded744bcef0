"""The training loop: one or several folds stepped together, evaluated, logged and checkpointed; and a whole run.

`train_and_evaluate(config, workdir)` validates the config, checks it against the one the run directory was started
with, and trains the folds of `config.fold`: one after another (a group of one fold at a time), or all together
(`config.parallel_folds`: one group, states stacked along a leading fold axis). Either way `_train_group` runs the
same loop and the same compiled step, so sequential and stacked training give the same models.

Sections of a group: data -> models and states -> jitted steps -> resume -> loop (train step; every
`log_every_steps` one host sync for logging and the NaN check; an evaluation every epoch; checkpoints).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import ml_collections
import numpy as np
from absl import logging

from ccfnet_jax import checkpoint as checkpoint_lib
from ccfnet_jax import config as config_lib
from ccfnet_jax import forward, logging_utils, metrics, parallel, rundir
from ccfnet_jax.models import complexity
from ccfnet_jax.data import phantom, pipeline
from ccfnet_jax.train import device_data, recalibrate, results, setup, steps

EVAL_KEYS = ("image", "native_hw", "points_xy_native", "pixel_spacing_mm", "point_valid", "disease", "example_valid")


class TrainingDivergedError(RuntimeError):
  """The training loss became NaN or infinite; the run stopped without saving the diverged state."""


class ConfigChangedError(config_lib.ConfigError):
  """A run directory's config differs from the one given in fields that change the trained model."""


def report(message: str) -> None:
  """A line for the console (process 0) and the log."""
  logging.info("%s", message)
  if jax.process_index() == 0:
    print(message, flush=True)


def epoch_of(step: int, epoch_steps: int) -> float | int:
  return step // epoch_steps if step % epoch_steps == 0 else round(step / epoch_steps, 3)


# ---------------------------------------------------------------------------------------------------------------
# Evaluation.
# ---------------------------------------------------------------------------------------------------------------


def _eval_step(params, batch_stats, batch, *, graphdef, options):
  """`forward.predict_from_state` of a batch, with the batch's ground truth beside it (gathered on every host)."""
  pred = forward.predict_from_state(graphdef, params, batch_stats, batch["image"], batch["native_hw"], options)
  return {"pred_xy": pred.xy, "pred_prob": pred.prob, **{k: batch[k] for k in EVAL_KEYS[2:]}}


def jit_eval_step(mesh: jax.sharding.Mesh, graphdef: Any,
                  options: forward.EvalOptions = forward.EvalOptions()) -> Callable[..., dict[str, jax.Array]]:
  replicated = parallel.replicated_sharding(mesh)
  return jax.jit(lambda params, batch_stats, batch: _eval_step(params, batch_stats, batch, graphdef=graphdef,
                                                               options=options),
                 in_shardings=(replicated, replicated, parallel.data_sharding(mesh)), out_shardings=replicated)


def eval_batches(source: Sequence[Any], *, batch_size: int, image_size: int, mesh: jax.sharding.Mesh,
                 options: pipeline.PipelineOptions = pipeline.PipelineOptions()):
  """Every study of `source` in evaluation batches (padded), as global arrays, read from the host as they come."""
  for host_batch in pipeline.eval_dataset(source, batch_size=batch_size, image_size=image_size, options=options):
    yield parallel.host_to_global({k: host_batch[k] for k in EVAL_KEYS}, mesh)


def evaluate(eval_fn: Callable[..., dict[str, jax.Array]], state: steps.TrainState, batches) -> dict[str, float]:
  """The paper's metrics (`metrics.evaluate`, in %) of `state` (its `steps.eval_weights`) over evaluation batches
  (`eval_batches`)."""
  outputs = [eval_fn(*steps.eval_weights(state), batch) for batch in batches]
  outputs = jax.device_get(outputs)  # the one host sync of an evaluation
  cat = {k: np.concatenate([np.asarray(o[k]) for o in outputs]) for k in outputs[0]}
  keep = cat["example_valid"].astype(bool)
  return metrics.evaluate(cat["pred_xy"][keep], cat["pred_prob"][keep], cat["points_xy_native"][keep],
                          cat["point_valid"][keep], cat["disease"][keep], cat["pixel_spacing_mm"][keep])


# ---------------------------------------------------------------------------------------------------------------
# One group of folds.
# ---------------------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class _Fold:
  """Host-side bookkeeping of one fold of a group."""

  data: setup.FoldData
  dir: str
  args: steps.FoldArgs
  train_iter: Any
  val_batches: Callable[[], Any] | None  # () -> the validation fold's evaluation batches
  checkpoints: checkpoint_lib.Checkpointer
  writer: logging_utils.MetricWriter
  history: list[dict[str, Any]] = dataclasses.field(default_factory=list)

  @property
  def index(self) -> int:
    return self.data.fold


@dataclasses.dataclass(frozen=True)
class _Compiled:
  """What every group of a run shares: one train step, one eval step (compiled once per run)."""

  train: Callable[..., Any]
  train_on_device: Callable[..., Any] | None
  evaluate: Callable[..., Any]
  train_graphdef: Any
  schedule_length: int


def _resume(folds: Sequence[_Fold], abstract: Any) -> tuple[int, list[Any]] | None:
  """The newest checkpoint step that every fold of the group has and can restore, with the restored states.

  A fold's checkpoints newer than that step (a kill can fall between the folds' saves of one step) are set aside, so
  the group continues in step. A checkpoint that cannot be restored is reported and set aside too (so training can
  write that step again), and the one before is used. Set-aside checkpoints go to `fold_K/damaged_checkpoints/`:
  nothing is deleted. Returns None when the group starts from scratch.
  """
  kept = [set(f.checkpoints.all_steps()) for f in folds]
  for step in sorted(set.intersection(*kept), reverse=True) if all(kept) else []:
    restored = []
    for fold in folds:
      try:
        restored.append(fold.checkpoints.restore(step, abstract))
      except Exception as e:  # pylint: disable=broad-except  (tensorstore, JSON and shape errors alike)
        moved = fold.checkpoints.set_aside(step)
        report(f"warning: fold {fold.index}: checkpoint step {step} cannot be restored ({type(e).__name__}: "
               f"{str(e).splitlines()[0] if str(e) else ''}); moved to {moved}, using the one before")
        break
    else:
      _set_aside_newer(folds, step)
      for fold, (_, extra) in zip(folds, restored):
        fold.train_iter.set_state(extra["data_iterator"])
        fold.history = list(extra.get("evals", []))
      return step, [state for state, _ in restored]
  _set_aside_newer(folds, 0)
  return None


def _set_aside_newer(folds: Sequence[_Fold], step: int) -> None:
  for fold in folds:
    for newer in [s for s in fold.checkpoints.all_steps() if s > step]:
      moved = fold.checkpoints.set_aside(newer)
      report(f"fold {fold.index}: checkpoint step {newer} is newer than the step all folds share ({step}): "
             f"moved to {moved}")


def _flush(window: list[tuple[int, dict[str, Any]]], folds: Sequence[_Fold]) -> list[dict[str, float]]:
  """Fetches the scalars of the steps since the last flush (one host sync), checks them, returns each fold's means.

  Raises:
    TrainingDivergedError: when any step's loss is NaN or infinite.
  """
  fetched = jax.device_get([scalars for _, scalars in window])
  means = []
  for i, fold in enumerate(folds):
    for (step, _), scalars in zip(window, fetched):
      loss = float(scalars["loss"][i])
      if not math.isfinite(loss):
        last_good = fold.checkpoints.latest_step()
        raise TrainingDivergedError(
            f"fold {fold.index}: the training loss is {loss} at step {step}: stopped. Nothing after step "
            f"{last_good if last_good is not None else 0} was saved; the last good checkpoint is "
            f"{'step ' + str(last_good) if last_good is not None else 'none'} in {fold.checkpoints.directory}. "
            "Lower config.learning_rate or try config.mixed_precision=False.")
    means.append({name: float(np.mean([float(s[name][i]) for s in fetched])) for name in fetched[0]})
  return means


def _train_group(config: ml_collections.ConfigDict, workdir: str, group: Sequence[setup.FoldData], *,
                 mesh: jax.sharding.Mesh, compiled: _Compiled, num_params: int, batching: str) -> None:
  """Trains the folds of `group` together from their latest checkpoints; writes each fold's results.json."""
  eval_batch_size = config.eval_batch_size or config.batch_size
  options = pipeline.PipelineOptions(num_threads=config.num_data_threads, worker_count=config.num_data_workers)
  epoch_steps = max(setup.steps_per_epoch(config, len(d.train_source)) for d in group)
  num_steps = setup.total_steps(config, epoch_steps)
  eval_every = int(config.eval_every_steps or epoch_steps)
  checkpoint_every = int(config.checkpoint_every_steps or eval_every)
  rates = setup.learning_rates(config, num_steps, epoch_steps, compiled.schedule_length)

  folds, states = [], []
  for data in group:
    model = setup.initial_model(config, jax.random.fold_in(setup.fold_key(config, data.number), 0), report)
    _, _, state = setup.init_state(model, config.weight_decay, config.ema_decay)
    states.append(state)
    fold_dir = rundir.fold_dir(workdir, data.fold)
    args = steps.FoldArgs(fold=np.int32(data.number), pos_weight=np.asarray(data.pos_weight, np.float32),
                          learning_rate=rates)
    train_iter = iter(pipeline.train_dataset(data.train_source, batch_size=config.batch_size,
                                             image_size=config.image_size, seed=config.seed * 1000 + data.number,
                                             options=options))
    if data.val_source is None:
      val_batches = None
    elif config.data_on_device:
      val_batches = device_data.EvalBatches(data.val_source, batch_size=eval_batch_size, image_size=config.image_size,
                                            mesh=mesh, keys=EVAL_KEYS, options=options)
    else:
      val_batches = functools.partial(eval_batches, data.val_source, batch_size=eval_batch_size,
                                      image_size=config.image_size, mesh=mesh, options=options)
    folds.append(_Fold(data=data, dir=fold_dir, args=args, train_iter=train_iter, val_batches=val_batches,
                       checkpoints=checkpoint_lib.Checkpointer(rundir.checkpoints_dir(workdir, data.fold),
                                                               keep=config.keep_checkpoints),
                       writer=logging_utils.MetricWriter(fold_dir)))
    held_out = f"{len(data.val_source)} val studies" if data.val_source is not None else "none held out"
    report(f"fold {data.fold}: {len(data.train_source)} train studies, {held_out}; label counts "
           f"{data.label_counts} -> pos_weight (vertebra, disc) ({data.pos_weight[0]:.4f}, "
           f"{data.pos_weight[1]:.4f}); {num_steps} steps, {epoch_steps} per epoch; {jax.device_count()} devices on "
           f"{jax.process_count()} process(es)")
  replicated = parallel.replicated_sharding(mesh)
  names = ",".join(str(f.index) for f in folds)
  try:
    resumed = _resume(folds, checkpoint_lib.abstract_like(states[0], replicated))
    if resumed is not None:
      step, states = resumed
      report(f"fold{'s' if len(folds) > 1 else ''} {names}: resumed from step {step}")
    stacked = parallel.replicate(steps.stack(states), mesh)
    args = parallel.replicate(steps.stack([f.args for f in folds]), mesh)
    del states
    step = int(jax.device_get(stacked.step[0]))
    _loop(config, folds, stacked, args, step, num_steps=num_steps, epoch_steps=epoch_steps, eval_every=eval_every,
          checkpoint_every=checkpoint_every, eval_batch_size=eval_batch_size, compiled=compiled, mesh=mesh,
          options=options, num_params=num_params, batching=batching)
    for fold in folds:
      fold.checkpoints.wait()
  finally:
    for fold in folds:
      fold.checkpoints.close()
      fold.writer.close()

  for fold in folds:
    if fold.data.val_source is None:
      result = results.final_result(num_steps, epoch_of(num_steps, epoch_steps), len(fold.data.train_source))
    else:
      result = results.summarize_history(fold.history)
    result["params"] = num_params
    if jax.process_index() == 0:
      rundir.write_json(os.path.join(fold.dir, rundir.RESULTS_FILE), result)


def _loop(config: ml_collections.ConfigDict, folds: Sequence[_Fold], stacked: steps.TrainState, args: steps.FoldArgs,
          step: int, *, num_steps: int, epoch_steps: int, eval_every: int, checkpoint_every: int,
          eval_batch_size: int, compiled: _Compiled, mesh: jax.sharding.Mesh, options: pipeline.PipelineOptions,
          num_params: int, batching: str) -> None:
  """Stacked steps; one host sync every `log_every_steps`; per-fold evaluations and checkpoints."""
  names = ",".join(str(f.index) for f in folds)
  prefix = f"fold {names} | " if len(folds) == 1 else f"folds {names} | "
  progress = logging_utils.Progress(num_steps, step, batch_size=config.batch_size * len(folds), prefix=prefix)
  if step == 0:
    for fold in folds:
      fold.writer.write(0, "config", {"params": num_params, "pos_weight_vertebra": fold.data.pos_weight[0],
                                      "pos_weight_disc": fold.data.pos_weight[1], "steps": num_steps,
                                      "steps_per_epoch": epoch_steps, "stacked_folds": len(folds),
                                      "fold_batching": batching})
  replicated = parallel.replicated_sharding(mesh)
  take_fold = jax.jit(steps.unstack, static_argnums=1, out_shardings=replicated)
  put_stats = jax.jit(lambda s, k, stats: steps.with_eval_batch_stats(
      s, jax.tree.map(lambda a, b: a.at[k].set(b), steps.eval_weights(s)[1], stats)),
                      static_argnums=1, out_shardings=replicated, donate_argnums=0)
  window: list[tuple[int, dict[str, jax.Array]]] = []
  evaluated = all(f.data.val_source is not None for f in folds)
  on_device = None
  if config.data_on_device:
    started = time.perf_counter()
    on_device = device_data.load([f.data.train_source for f in folds],
                                 [config.seed * 1000 + f.data.number for f in folds], batch_size=config.batch_size,
                                 image_size=config.image_size, num_steps=num_steps, mesh=mesh)
    report(f"{prefix}training data on the devices: {on_device.num_bytes / 2**20:.1f} MiB per device "
           f"({len(folds)} fold(s), {num_steps} steps; {time.perf_counter() - started:.1f}s to load)")
    for fold in folds:
      fold.writer.write(step, "config", {"data_on_device_bytes": on_device.num_bytes})
  while step < num_steps:
    if on_device is not None:
      stacked, scalars = compiled.train_on_device(stacked, on_device.records, on_device.order, args)
    else:
      host = [next(f.train_iter) for f in folds]
      batches = parallel.host_to_global({k: np.stack([b[k] for b in host]) for k in host[0]}, mesh,
                                        stacked_folds=True)
      stacked, scalars = compiled.train(stacked, batches, args)
    step += 1
    window.append((step, scalars))
    is_eval = evaluated and (step % eval_every == 0 or step == num_steps)
    is_checkpoint = is_eval or step % checkpoint_every == 0 or step == num_steps
    if step % config.log_every_steps == 0 or is_checkpoint:
      means = _flush(window, folds)
      window = []
      for fold, fold_means in zip(folds, means):
        fold.writer.write(step, "train", fold_means)
      progress.update(step, {"loss": float(np.mean([m["loss"] for m in means])),
                             "lr": means[0]["learning_rate"]})
    if not (is_eval or is_checkpoint):
      continue
    for i, fold in enumerate(folds):
      state = take_fold(stacked, i)
      eval_metrics = None
      if is_eval:
        started = time.perf_counter()
        if config.recalibrate_bn:
          stats = recalibrate.recalibrated_batch_stats(
              *steps.eval_weights(state), pipeline.calibration_dataset(
                  fold.data.train_source, batch_size=config.batch_size, image_size=config.image_size,
                  options=options), graphdef=compiled.train_graphdef, mesh=mesh)
          state = steps.with_eval_batch_stats(state, stats)
          stacked = put_stats(stacked, i, stats)
        eval_metrics = evaluate(compiled.evaluate, state, fold.val_batches())
        fold.history.append({**eval_metrics, "epoch": epoch_of(step, epoch_steps), "step": step})
        fold.writer.write(step, "eval", eval_metrics)
        report(f"fold {fold.index} | step {step} | epoch {fold.history[-1]['epoch']} | eval "
               + " ".join(f"{k} {v:.2f}" for k, v in eval_metrics.items())
               + f" ({time.perf_counter() - started:.1f}s)")
      # The iterator state (batches read so far) is the same on every process; process 0's copy is saved.
      position = device_data.iterator_state(step) if on_device is not None else fold.train_iter.get_state()
      extra = {"data_iterator": position, "evals": fold.history, "fold": fold.index}
      fold.checkpoints.save(step, state, extra, metrics=eval_metrics)
    if is_eval:
      progress.reset_clock(step)


# ---------------------------------------------------------------------------------------------------------------
# A whole run.
# ---------------------------------------------------------------------------------------------------------------


def check_run_config(config: ml_collections.ConfigDict, workdir: str, *, allow_change: bool = False) -> None:
  """Keeps the config a run directory was started with, and refuses a later launch that would train another model.

  The first launch writes `config.json`. A later one compares (`config.model_changes`): with no difference that
  changes the trained model it goes on (the file keeps the first launch's values); with differences it raises
  ConfigChangedError listing them, unless `allow_change`, which records the launch in `config_changes.jsonl` and
  goes on.
  """
  path = os.path.join(workdir, rundir.CONFIG_FILE)
  if not os.path.exists(path):
    if jax.process_index() == 0:
      rundir.write_text(path, config_lib.to_json(config))
    return
  saved, _ = config_lib.load_run_config(path)
  changes = config_lib.model_changes(saved, config)
  if not changes:
    return
  listed = "; ".join(f"{name}: {old!r} -> {new!r}" for name, old, new in changes)
  if (float(saved.get("ema_decay", 0.0)) > 0) != (float(config.get("ema_decay", 0.0)) > 0):
    # The saved train states have (or lack) the EMA field: they could not be restored into the other structure.
    raise ConfigChangedError(f"{workdir} was started with ema_decay={saved.get('ema_decay', 0.0)!r}; turning the "
                             "weight average on or off changes what a checkpoint holds, so it cannot be resumed "
                             "(not even with --allow_config_change). Use a fresh --workdir.")
  if not allow_change:
    raise ConfigChangedError(f"{workdir} was started with another config ({path}); resuming would mix two "
                             f"trainings. Differences: {listed}. Use a fresh --workdir, or pass "
                             "--allow_config_change to continue anyway (recorded in the run directory).")
  if jax.process_index() == 0:
    rundir.append_json_line(os.path.join(workdir, rundir.CONFIG_CHANGES_FILE),
                            {"time": round(time.time(), 3), "changes": [list(c) for c in changes],
                             "config": config.to_dict()})
  report(f"warning: continuing {workdir} with a changed config: {listed}")


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str | os.PathLike, *,
                       mesh: jax.sharding.Mesh | None = None, allow_config_change: bool = False) -> dict[str, Any]:
  """Trains and evaluates the folds of `config.fold`; writes and returns `workdir/results.json`'s content.

  Folds whose training finished earlier in the same workdir are restored from their final checkpoint (no
  retraining). Raises ConfigError (bad value; before any data is read), ConfigChangedError (the workdir holds
  another run), TrainingDivergedError (NaN loss; the last good checkpoint stays as it was).
  """
  config_lib.validate(config)
  workdir = os.path.abspath(os.fspath(workdir))
  os.makedirs(workdir, exist_ok=True)
  check_run_config(config, workdir, allow_change=allow_config_change)
  fold_ids = config_lib.parse_folds(config.fold, config.num_folds)
  mesh = parallel.make_mesh() if mesh is None else mesh
  if fold_ids is None:  # every study, none held out
    fold_ids = [None]
  parallel.check_global_batch_size(config.batch_size, mesh)
  parallel.check_global_batch_size(config.eval_batch_size or config.batch_size, mesh, "eval_batch_size")

  # The model first: the checks that need its stride refuse a config before any data set is opened or built.
  model = setup.create_model(config, setup.fold_key(config, setup.fold_number(config, fold_ids[0])))
  config_lib.check_against_model(config, model.stride)
  data = [setup.open_fold(config, k, workdir) for k in fold_ids]
  groups = [data] if config.parallel_folds and len(data) > 1 else [[d] for d in data]
  # One schedule table length and one step for every group: sequential folds compile their step once.
  schedule_length = max(setup.total_steps(config, max(setup.steps_per_epoch(config, len(d.train_source))
                                                      for d in group)) for group in groups)
  num_params = complexity.count_params(model)
  train_graphdef, eval_graphdef, _ = setup.init_state(model, config.weight_decay)
  settings = setup.step_settings(config, model.stride)
  batching = config.fold_batching or steps.default_fold_batching(mesh, len(groups[0]))
  compiled = _Compiled(train=steps.jit_train_step(mesh, batching=batching, graphdef=train_graphdef,
                                                  settings=settings),
                       train_on_device=device_data.jit_train_step(mesh, batching=batching, graphdef=train_graphdef,
                                                                  settings=settings),
                       evaluate=jit_eval_step(mesh, eval_graphdef, forward.eval_options(config)),
                       train_graphdef=train_graphdef, schedule_length=schedule_length)
  for group in groups:
    _train_group(config, workdir, group, mesh=mesh, compiled=compiled, batching=batching, num_params=num_params)
  run_results = results.collect_results(workdir, config.num_folds)
  if jax.process_index() == 0:
    rundir.write_json(os.path.join(workdir, rundir.RESULTS_FILE), run_results)
    print(results.format_table(run_results, config, num_params), flush=True)
    studies = None
    if config.dataset == "phantom" and config.get("phantom_dicom_studies", 0):
      studies = phantom.write_official_layout(os.path.join(workdir, "phantom_dicom"), config.phantom_dicom_studies,
                                              seed=config.phantom_seed, start_index=config.phantom_studies)
    print(results.next_steps(workdir, [d.fold for d in data], studies), flush=True)
  return run_results
