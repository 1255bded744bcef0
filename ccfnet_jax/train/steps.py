"""The pure train step, for one fold or several stacked along a leading axis, and its jitted form.

What differs between folds (the fold index that seeds the augmentation, the BCE pos_weight from the fold's labels,
the learning-rate schedule that depends on the fold's size) is a traced argument, `FoldArgs`: folds trained one
after another run one compiled step, and folds trained together run the same step over `[F, ...]` stacks.
Everything else is static (`StepSettings`). The step takes the state and returns the next one (donated); the
augmentation key derives from (seed, fold, step), so a resumed run repeats an uninterrupted one exactly.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import nnx, struct

from ccfnet_jax import ema, losses, parallel, targets
from ccfnet_jax.data import augment as augment_lib
from ccfnet_jax.maps import Maps

FOLD_AXIS = 0
"""Axis of stacked states, batches, arguments and scalars that indexes the fold."""
FOLD_BATCHING = ("vmap", "unroll")
"""How a stacked step runs its folds: `vmap` (each conv becomes one grouped conv over the folds: bigger kernels,
which fill an accelerator) or `unroll` (the folds' steps side by side in one program, each with its own convs)."""


@struct.dataclass
class TrainState:
  """Everything a fold carries from step to step (a pytree; replicated on the mesh).

  step: int32 scalar, optimizer steps taken. params / batch_stats: the model's `nnx.Param` / `nnx.BatchStat`
  variables (float32). opt_state: the optax state (float32). ema: None, or with `config.ema_decay` > 0
  {'params', 'batch_stats'}: their moving averages (`ccfnet_jax.ema`), which evaluation, the best checkpoint and
  inference use (saved under `checkpoint.EMA_KEY`); a state without them saves as before the option existed.
  """

  step: jax.Array
  params: nnx.State
  batch_stats: nnx.State
  opt_state: optax.OptState
  ema: Any = None


class FoldArgs(NamedTuple):
  """The traced per-fold inputs of the step (leaves gain a leading `[F]` axis when stacked).

  fold: int32 `[]`, seeds the augmentation. pos_weight: float32 `[2]` (vertebra, disc). learning_rate: float32 `[T]`,
  the schedule's rate at each step (`T` >= the run's steps; one length for every fold of a run, so one compile).
  """

  fold: jax.Array
  pos_weight: jax.Array
  learning_rate: jax.Array


@dataclasses.dataclass(frozen=True)
class StepSettings:
  """Static settings of the train step, the same for every fold of a run (part of the jitted function's identity)."""

  image_size: int
  stride: int
  loss: str
  augment: augment_lib.AugmentConfig | None
  seed: int
  weight_decay: float
  loss_weights: tuple[tuple[str, float], ...] = tuple(losses.LOSS_WEIGHTS.items())
  disease_region: str = "peak"  # the reference loss's disease BCE: 'peak' cell or 'region' (losses.DISEASE_REGIONS)
  ema_decay: float = 0.0  # > 0: the state keeps moving averages of the weights (`TrainState.ema`)


def eval_weights(state: TrainState) -> tuple[nnx.State, nnx.State]:
  """(params, batch_stats) that evaluation uses: the moving averages when the state keeps them."""
  if state.ema is not None:
    return state.ema["params"], state.ema["batch_stats"]
  return state.params, state.batch_stats


def with_eval_batch_stats(state: TrainState, batch_stats: nnx.State) -> TrainState:
  """`state` whose evaluated BatchNorm statistics (`eval_weights`) are `batch_stats` (e.g. recalibrated ones)."""
  if state.ema is not None:
    return state.replace(ema={**state.ema, "batch_stats": batch_stats})
  return state.replace(batch_stats=batch_stats)


def loss_function(settings: StepSettings) -> Callable[..., tuple[jax.Array, dict[str, jax.Array]]]:
  """The loss of `settings` with its term weights (and, for the reference loss, its disease region; the paper's
  loss always reads the region)."""
  options: dict[str, Any] = {"weights": dict(settings.loss_weights)}
  if settings.loss == "reference":
    options["disease_region"] = settings.disease_region
  return functools.partial(losses.LOSSES[settings.loss], **options)


def adamw(learning_rate: Callable[[jax.Array], jax.Array], weight_decay: float) -> optax.GradientTransformation:
  """AdamW with torch's defaults (betas 0.9 / 0.999, eps 1e-8, decay on every parameter).

  `learning_rate` is a function of the step count, so the optimizer state is the same pytree whatever the rate's
  source (a host schedule when the state is created, the traced per-fold table inside the step).
  """
  return optax.adamw(learning_rate, b1=0.9, b2=0.999, eps=1e-8, weight_decay=weight_decay)


def rate_at(table: jax.Array, step: jax.Array) -> jax.Array:
  """The rate of `step` in a schedule table (the last entry beyond its end)."""
  return table[jnp.minimum(step, table.shape[-1] - 1)]


def step_key(seed: int, fold: jax.Array, step: jax.Array) -> jax.Array:
  """The augmentation key of `step`: derived from (seed, fold, step) only, so resuming repeats it exactly."""
  fold_key = jax.random.fold_in(jax.random.key(seed), fold)
  return jax.random.fold_in(jax.random.fold_in(fold_key, 1), step)


def train_step(state: TrainState, batch: Mapping[str, jax.Array], args: FoldArgs, *, graphdef: nnx.GraphDef,
               settings: StepSettings) -> tuple[TrainState, dict[str, jax.Array]]:
  """One optimizer step of one fold on a global batch.

  Args:
    state: the TrainState (replicated).
    batch: `image [B, S, S, 3]` in [0, 1], `points_xy [B, 11, 2]` input px, `point_valid [B, 11]`,
      `disease [B, 11]`, `pixel_spacing_mm [B, 2]`, `native_hw [B, 2]` (sharded on "data").
    args: this fold's traced arguments.
    graphdef: the model's train-mode graphdef (BatchNorm with batch statistics over the global batch).
    settings: static step settings.
  Returns:
    (new state, scalars: loss, the loss parts, learning_rate, grad_norm).
  """
  batch = dict(batch)
  if settings.augment is not None:
    batch = augment_lib.augment_batch(step_key(settings.seed, args.fold, state.step), batch, settings.augment)
  image_hw = (settings.image_size, settings.image_size)
  target = targets.encode(batch["points_xy"], batch["point_valid"], image_hw, settings.stride,
                          disease=batch["disease"])
  loss_fn = loss_function(settings)

  def objective(params):
    # copy=True: fresh Variables at this trace level (BatchNorm updates its statistics in place).
    model = nnx.merge(graphdef, params, state.batch_stats, copy=True)
    maps = Maps(*(m.astype(jnp.float32) for m in model(batch["image"])))
    total, parts = loss_fn(maps, target, batch["disease"], args.pos_weight)
    return total, (parts, nnx.state(model, nnx.BatchStat))

  (loss, (parts, batch_stats)), grads = jax.value_and_grad(objective, has_aux=True)(state.params)
  tx = adamw(lambda count: rate_at(args.learning_rate, count), settings.weight_decay)
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  new_state = state.replace(step=state.step + 1, params=params, batch_stats=batch_stats, opt_state=opt_state)
  if settings.ema_decay > 0:
    # The running BatchNorm statistics are averaged with the weights; config.recalibrate_bn recomputes them for the
    # averaged weights before each evaluation.
    new_state = new_state.replace(ema=ema.update(state.ema, {"params": params, "batch_stats": batch_stats},
                                                 ema.decay_at(state.step, settings.ema_decay)))
  scalars = {"loss": loss, **parts, "learning_rate": rate_at(args.learning_rate, state.step),
             "grad_norm": optax.global_norm(grads)}
  return new_state, scalars


# ---------------------------------------------------------------------------------------------------------------
# Stacked folds.
# ---------------------------------------------------------------------------------------------------------------


def stack(trees: list[Any]) -> Any:
  """Pytrees of identical structure -> one pytree whose leaves gain a leading fold axis `[F, ...]`."""
  if not trees:
    raise ValueError("stack: no trees given")
  return jax.tree.map(lambda *leaves: jnp.stack(leaves, axis=FOLD_AXIS), *trees)


def unstack(tree: Any, index: int) -> Any:
  """The `index`-th fold's pytree of a stacked pytree (leaves `[F, ...]` -> `[...]`)."""
  return jax.tree.map(lambda x: x[index], tree)


def default_fold_batching(mesh: jax.sharding.Mesh, num_folds: int) -> str:
  """`unroll` for one fold and on CPU devices, `vmap` elsewhere.

  XLA:CPU runs grouped convs far slower than the same convs one by one (docs/performance.md), and a vmap over one
  fold only adds an axis.
  """
  return "unroll" if num_folds == 1 or mesh.devices.flat[0].platform == "cpu" else "vmap"


def stacked_train_step(states: TrainState, batches: Mapping[str, jax.Array], args: FoldArgs, *, batching: str,
                       graphdef: nnx.GraphDef, settings: StepSettings) -> tuple[TrainState, dict[str, jax.Array]]:
  """`train_step` of every fold over the leading fold axis of `states`, `batches` and `args`, vmapped or unrolled.

  Returns:
    (new stacked states, scalars each `[F]`).
  """
  def one(state, batch, fold_args):
    return train_step(state, batch, fold_args, graphdef=graphdef, settings=settings)

  if batching == "vmap":
    return jax.vmap(one)(states, batches, args)
  if batching != "unroll":
    raise ValueError(f"fold batching {batching!r}: expected one of {FOLD_BATCHING}")
  num_folds = args.fold.shape[0]
  return stack([one(unstack(states, k), unstack(batches, k), unstack(args, k)) for k in range(num_folds)])


def jit_train_step(mesh: jax.sharding.Mesh, *, batching: str, graphdef: nnx.GraphDef, settings: StepSettings
                   ) -> Callable[[TrainState, Mapping[str, jax.Array], FoldArgs],
                                 tuple[TrainState, dict[str, jax.Array]]]:
  """`stacked_train_step` jitted on `mesh`: states replicated and donated, batches `[F, B, ...]` split on "data"."""
  replicated = parallel.replicated_sharding(mesh)

  def stacked_step(states, batches, args):
    return stacked_train_step(states, batches, args, batching=batching, graphdef=graphdef, settings=settings)

  return jax.jit(stacked_step, in_shardings=(replicated, parallel.folds_data_sharding(mesh), replicated),
                 out_shardings=(replicated, replicated), donate_argnums=0)
