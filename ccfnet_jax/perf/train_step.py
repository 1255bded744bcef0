"""The jitted train and eval steps of a config, built as training builds them, for timing.

What is timed is what trains: `ccfnet_jax.train`'s steps (forward, loss, backward and the AdamW update with
on-device augmentation, the state donated; the eval step with flip TTA and decode) and the stacked-folds step of
`ccfnet_jax.parallel_folds`. Every call into those two modules sits in this file.
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

from ccfnet_jax import losses, objects, parallel, parallel_folds, train
from ccfnet_jax.data import pipeline
from ccfnet_jax.perf import flops as flops_lib

TRAIN_KEYS = ("image", "points_xy", "point_valid", "disease", "pixel_spacing_mm", "native_hw")
"""The batch fields the train step reads."""

FOLD_BATCHING: tuple[str, ...] = parallel_folds.FOLD_BATCHING
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
  return train.model_label(config)


def create_model(config: ml_collections.ConfigDict) -> nnx.Module:
  """The config's model with its training initialisation (from `config.seed`)."""
  return train.create_model(config, jax.random.key(config.seed))


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


@dataclasses.dataclass
class Steps:
  """The compiled train step of a config and what it runs on (see `build_steps`)."""

  compiled_train: Any  # (state, train_batch) -> (state, scalars); the state is donated
  jit_eval: Any  # (state, eval_batch) -> predictions
  state: Any  # the train state; replace it with the one a donating call returns
  train_batch: dict[str, Any]
  eval_batch: dict[str, Any]
  settings: Any  # the steps' static settings (image size, stride, loss, pos_weight, augmentation, flip TTA)
  label: str
  compile_s: float
  flops: float | None
  mesh: jax.sharding.Mesh
  model: nnx.Module  # the model the state was taken from, with the state's initial weights
  step_kwargs: dict[str, Any]  # graphdef, tx, schedule, settings of the train step (for the stacked folds)


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
  schedule = train.create_schedule(config, num_steps=1000, epoch_steps=100)
  tx = train.create_optimizer(config, schedule)
  train_graphdef, eval_graphdef, state = train.init_state(model, tx)
  settings = train.StepSettings(image_size=image_size, stride=int(model.stride), loss=config.loss,
                                pos_weight=tuple(losses.REFERENCE_POS_WEIGHT),
                                augment=train.augment_config(config) if augment else None,
                                flip_tta=bool(config.flip_tta), seed=int(config.seed), fold=0)
  state = parallel.replicate(state, mesh)
  jit_train, jit_eval = train.jit_steps(mesh, train_graphdef=train_graphdef, eval_graphdef=eval_graphdef, tx=tx,
                                        schedule=schedule, settings=settings)
  on_mesh = pipeline.to_global(synthetic_batch(batch_size, image_size) if batch is None else batch, mesh)
  train_batch = {k: on_mesh[k] for k in TRAIN_KEYS}
  eval_batch = {k: on_mesh[k] for k in train.EVAL_KEYS}
  started = time.perf_counter()
  compiled = jit_train.lower(state, train_batch).compile()
  compile_s = time.perf_counter() - started
  return Steps(compiled_train=compiled, jit_eval=jit_eval, state=state, train_batch=train_batch,
               eval_batch=eval_batch, settings=settings, label=model_label(config), compile_s=compile_s,
               flops=flops_lib.xla_flops(compiled, mesh.devices.size), mesh=mesh, model=model,
               step_kwargs={"graphdef": train_graphdef, "tx": tx, "schedule": schedule, "settings": settings})


@dataclasses.dataclass
class StackedFolds:
  """The compiled stacked-folds train step and its arguments: `compiled(states, *args) -> (states, scalars)`."""

  compiled: Any
  states: Any
  args: tuple[Any, ...]
  batching: str
  compile_s: float


def build_stacked_folds(setup: Steps, state: Any, num_folds: int, fold_batching: str = "") -> StackedFolds:
  """`num_folds` copies of `state` (copied, so `state` stays live) and of the batch, and the stacked step compiled.

  `fold_batching` is one of `FOLD_BATCHING` ("": the platform's default).
  """
  if num_folds < 1:
    raise ValueError(f"--folds = {num_folds}: expected >= 1")
  mesh = setup.mesh
  states = parallel.replicate(parallel_folds.stack([state] * num_folds), mesh)
  host = {k: np.asarray(v) for k, v in jax.device_get(setup.train_batch).items()}
  batches = parallel_folds.stacked_to_global([host] * num_folds, mesh)
  fold_ids = parallel.replicate(np.arange(num_folds, dtype=np.int32), mesh)
  pos_weights = parallel.replicate(np.tile(np.asarray(setup.settings.pos_weight, np.float32), (num_folds, 1)), mesh)
  batching = fold_batching or parallel_folds.default_fold_batching(mesh)
  jitted = parallel_folds.jit_stacked_train_step(mesh, batching=batching, **setup.step_kwargs)
  started = time.perf_counter()
  compiled = jitted.lower(states, batches, fold_ids, pos_weights).compile()
  return StackedFolds(compiled=compiled, states=states, args=(batches, fold_ids, pos_weights), batching=batching,
                      compile_s=time.perf_counter() - started)
