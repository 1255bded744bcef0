"""The jitted train and eval steps of a config, built as training builds them, for timing.

What is timed is what trains: `ccfnet_jax.train`'s step (forward, loss, backward and the AdamW update with on-device
augmentation, the state donated), its evaluation step (`forward.predict`: flip TTA and decode) and its stacked-folds
step. Every call into the training package sits in this file.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from ccfnet_jax import forward, losses, objects, parallel
from ccfnet_jax.train import loop, results, setup, steps
from ccfnet_jax.perf import flops as flops_lib

TRAIN_KEYS = ("image", "points_xy", "point_valid", "disease", "pixel_spacing_mm", "native_hw")
"""The batch fields the train step reads."""

FOLD_BATCHING: tuple[str, ...] = steps.FOLD_BATCHING
"""How the stacked-folds step may batch the folds."""


def synthetic_batch(batch_size: int, image_size: int, seed: int = 0) -> dict[str, Any]:
  """A host batch of the pipeline's contract (`ccfnet_jax.data.pipeline`) with random images and points.

  `image [B, S, S, 3]` uniform in [0, 1]; 11 valid points per image, uniform in the central 80 % (input px, native =
  input, `native_hw = (S, S)`, spacing 0.5 mm); disease labels 0/1 at random.
  """
  rng = np.random.default_rng(seed)
  n = objects.NUM_OBJECTS
  points = rng.uniform(0.1 * image_size, 0.9 * image_size, (batch_size, n, 2)).astype(np.float32)
  return {
      "image": rng.uniform(0.0, 1.0, (batch_size, image_size, image_size, 3)).astype(np.float32),
      "points_xy": points,
      "points_xy_native": points.copy(),
      "native_hw": np.full((batch_size, 2), image_size, np.int32),
      "pixel_spacing_mm": np.full((batch_size, 2), 0.5, np.float32),
      "point_valid": np.ones((batch_size, n), bool),
      "disease": rng.integers(0, 2, (batch_size, n)).astype(np.int32),
      "example_valid": np.ones((batch_size,), bool),
  }


def model_label(config: ml_collections.ConfigDict) -> str:
  """'R18-MSC', 'R50', ... for the lines' `model` field."""
  return results.model_label(config)


def create_model(config: ml_collections.ConfigDict) -> nnx.Module:
  """The config's model with its training initialisation (from `config.seed`)."""
  return setup.create_model(config, jax.random.key(config.seed))


def with_sizes(config: ml_collections.ConfigDict, *, batch_size: int, image_size: int,
               dtype: str = "float32") -> ml_collections.ConfigDict:
  """A copy of `config` with the batch, the input size and the compute dtype of a measurement."""
  if dtype not in ("float32", "bfloat16"):
    raise ValueError(f"dtype {dtype!r}: expected 'float32' or 'bfloat16'")
  config = config.copy_and_resolve_references()
  with config.unlocked():
    config.mixed_precision = dtype == "bfloat16"
    config.image_size = image_size
    config.batch_size = batch_size
  return config


class BoundStep:
  """A compiled train step with its fold arguments bound: `(state, batch) -> (state, scalars)`, state donated."""

  def __init__(self, compiled: Any, args: steps.FoldArgs):
    self.compiled, self.args = compiled, args

  def __call__(self, state: Any, batch: dict[str, Any]) -> tuple[Any, dict[str, Any]]:
    return self.compiled(state, batch, self.args)

  def as_text(self) -> str:
    return self.compiled.as_text()


@dataclasses.dataclass
class Steps:
  """The compiled train step of a config and what it runs on (see `build_steps`)."""

  compiled_train: BoundStep  # (state, train_batch) -> (state, scalars); the state is donated
  jit_eval: Any  # (state, eval_batch) -> predictions
  state: Any  # the train state; replace it with the one a donating call returns
  train_batch: dict[str, Any]
  eval_batch: dict[str, Any]
  settings: steps.StepSettings  # the train step's static settings (image size, stride, loss, augmentation)
  fold_args: steps.FoldArgs  # the traced per-fold arguments (fold 0, the reference's pos_weight, the schedule)
  flip_tta: bool
  label: str
  compile_s: float
  flops: float | None
  mesh: jax.sharding.Mesh
  model: nnx.Module  # the model the state was taken from, with the state's initial weights
  train_graphdef: Any


def build_steps(config: ml_collections.ConfigDict, *, batch_size: int, image_size: int, dtype: str = "float32",
                augment: bool = True, num_devices: int = 0, model: nnx.Module | None = None,
                batch: dict[str, Any] | None = None) -> Steps:
  """Builds the model, state and jitted steps of training for `config` and compiles the train step.

  The batch is `synthetic_batch` (or the host batch `batch`) placed on the mesh; the learning-rate schedule is the
  config's over 1000 steps (its value does not change the cost). `pos_weight` is the reference's
  (docs/method.md#losses). `num_devices` > 0 uses the first that many devices for the mesh, 0 all of them. `model`
  replaces the config's freshly initialised model (it must be built with the dtype of `dtype`).
  """
  config = with_sizes(config, batch_size=batch_size, image_size=image_size, dtype=dtype)
  if num_devices < 0 or num_devices > jax.device_count():
    raise ValueError(f"--num_devices = {num_devices}: expected 0 (all) .. {jax.device_count()}")
  mesh = parallel.make_mesh(jax.devices()[:num_devices] if num_devices else None)
  parallel.check_global_batch_size(batch_size, mesh)
  model = create_model(config) if model is None else model
  if hasattr(model, "check_input"):  # CCFNet names the input sides it accepts before anything compiles
    model.check_input(jnp.zeros((1, image_size, image_size, 3), jnp.float32))
  train_graphdef, eval_graphdef, state = setup.init_state(model, config.weight_decay)
  settings = setup.step_settings(config, int(model.stride))
  if not augment:
    settings = dataclasses.replace(settings, augment=None)
  fold_args = steps.FoldArgs(fold=np.int32(0), pos_weight=np.asarray(losses.REFERENCE_POS_WEIGHT, np.float32),
                             learning_rate=setup.learning_rates(config, 1000, 100, 1000))
  replicated, data = parallel.replicated_sharding(mesh), parallel.data_sharding(mesh)
  state, fold_args = parallel.replicate(state, mesh), parallel.replicate(fold_args, mesh)
  jit_train = jax.jit(lambda s, b, a: steps.train_step(s, b, a, graphdef=train_graphdef, settings=settings),
                      in_shardings=(replicated, data, replicated), out_shardings=(replicated, replicated),
                      donate_argnums=0)
  eval_step = loop.jit_eval_step(mesh, eval_graphdef, forward.eval_options(config))
  on_mesh = parallel.host_to_global(synthetic_batch(batch_size, image_size) if batch is None else batch, mesh)
  train_batch = {k: on_mesh[k] for k in TRAIN_KEYS}
  eval_batch = {k: on_mesh[k] for k in loop.EVAL_KEYS}
  started = time.perf_counter()
  compiled = jit_train.lower(state, train_batch, fold_args).compile()
  compile_s = time.perf_counter() - started
  return Steps(compiled_train=BoundStep(compiled, fold_args),
               jit_eval=lambda s, b: eval_step(s.params, s.batch_stats, b), state=state, train_batch=train_batch,
               eval_batch=eval_batch, settings=settings, fold_args=fold_args, flip_tta=bool(config.flip_tta),
               label=model_label(config), compile_s=compile_s,
               flops=flops_lib.xla_flops(compiled, mesh.devices.size), mesh=mesh, model=model,
               train_graphdef=train_graphdef)


@dataclasses.dataclass
class StackedFolds:
  """The compiled stacked-folds train step and its arguments: `compiled(states, *args) -> (states, scalars)`."""

  compiled: Any
  states: Any
  args: tuple[Any, ...]
  batching: str
  compile_s: float


def build_stacked_folds(built: Steps, state: Any, num_folds: int, fold_batching: str = "") -> StackedFolds:
  """`num_folds` copies of `state` (copied, so `state` stays live) and of the batch, and the stacked step compiled.

  `fold_batching` is one of `FOLD_BATCHING` ("": the platform's default).
  """
  if num_folds < 1:
    raise ValueError(f"--folds = {num_folds}: expected >= 1")
  mesh = built.mesh
  states = parallel.replicate(steps.stack([state] * num_folds), mesh)
  host = {k: np.asarray(v) for k, v in jax.device_get(built.train_batch).items()}
  batches = parallel.host_to_global({k: np.stack([v] * num_folds) for k, v in host.items()}, mesh,
                                    stacked_folds=True)
  one = jax.device_get(built.fold_args)
  args = parallel.replicate(steps.stack([one._replace(fold=np.int32(k)) for k in range(num_folds)]), mesh)
  batching = fold_batching or steps.default_fold_batching(mesh, num_folds)
  jitted = steps.jit_train_step(mesh, batching=batching, graphdef=built.train_graphdef, settings=built.settings)
  started = time.perf_counter()
  compiled = jitted.lower(states, batches, args).compile()
  return StackedFolds(compiled=compiled, states=states, args=(batches, args), batching=batching,
                      compile_s=time.perf_counter() - started)
