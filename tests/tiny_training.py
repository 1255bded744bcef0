"""Test helpers for the training tests: a tiny stand-in model, small configs, fake batches, and a `run.py` entry
that registers the tiny model (so subprocess tests train in seconds instead of compiling ResNet18 for a minute).

Run as a script: `python tests/tiny_training.py --config=configs/default.py ... --workdir=DIR` (the flags of run.py).
"""

from __future__ import annotations

import os
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
  sys.path.insert(0, REPO)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from ccfnet_jax import maps as maps_lib  # noqa: E402
from ccfnet_jax import models, objects  # noqa: E402
from ccfnet_jax.models import layers  # noqa: E402

TINY = "tiny_test_net"
IMAGE_SIZE = 128


class TinyNet(nnx.Module):
  """Four stride-2 convs (with BatchNorm) and a 1x1 head: output stride 16, `Maps [B, H/16, W/16, 11]`."""

  def __init__(self, depth: int = 18, msc: bool = True, *, rngs: nnx.Rngs, dtype=jnp.float32):
    del depth, msc
    self.stride = 16
    self.dtype = dtype
    widths = (3, 8, 16, 16, 16)
    self.convs = nnx.List([layers.conv(widths[i], widths[i + 1], 3, stride=2, rngs=rngs, dtype=dtype)
                           for i in range(4)])
    self.norms = nnx.List([layers.batch_norm(widths[i + 1], rngs=rngs, dtype=dtype) for i in range(4)])
    self.head = nnx.Conv(widths[-1], maps_lib.NUM_CHANNELS, (1, 1), dtype=dtype, param_dtype=jnp.float32,
                         kernel_init=nnx.initializers.normal(0.05), rngs=rngs)

  def __call__(self, x: jax.Array) -> maps_lib.Maps:
    x = x.astype(self.dtype)
    for conv, norm in zip(self.convs, self.norms):
      x = jax.nn.relu(norm(conv(x)))
    return maps_lib.from_channels(self.head(x).astype(jnp.float32))


def register() -> None:
  """Adds TinyNet to the model registry under the name `TINY`."""
  models.MODELS.setdefault(TINY, TinyNet)


def tiny_config(**overrides):
  """The default config shrunk for tests: tiny model, 128 px, batch 8, phantom data; `overrides` set fields."""
  from configs import default  # pylint: disable=g-import-not-at-top
  register()
  config = default.get_config()
  config.model.name = TINY
  config.image_size = IMAGE_SIZE
  config.batch_size = 8
  config.eval_batch_size = 8
  config.phantom_studies = 16
  config.learning_rate = 1e-3
  config.schedule = "constant"
  config.log_every_steps = 1
  config.num_data_threads = 1
  for key, value in overrides.items():
    target = config
    *path, last = key.split(".")
    for part in path:
      target = target[part]
    target[last] = value
  return config


def config_flags_of(config_overrides: dict) -> list[str]:
  """run.py flags `--config.<key>=<value>` that turn configs/default.py into `tiny_config(**config_overrides)`."""
  base = {"model.name": TINY, "image_size": IMAGE_SIZE, "batch_size": 8, "eval_batch_size": 8, "phantom_studies": 16,
          "learning_rate": 1e-3, "schedule": "constant", "log_every_steps": 1, "num_data_threads": 1}
  base.update(config_overrides)
  return ["--config=configs/default.py"] + [f"--config.{k}={v}" for k, v in base.items()]


def fake_batch(batch_size: int = 8, image_size: int = IMAGE_SIZE, seed: int = 0) -> dict[str, np.ndarray]:
  """A host batch of the pipeline's contract with a bright blob at each (random) point, so there is signal."""
  rng = np.random.default_rng(seed)
  n = objects.NUM_OBJECTS
  points = rng.uniform(16, image_size - 16, (batch_size, n, 2)).astype(np.float32)
  yy, xx = np.mgrid[0:image_size, 0:image_size] + 0.5
  image = np.zeros((batch_size, image_size, image_size, 3), np.float32)
  for b in range(batch_size):
    for k in range(n):
      image[b] += np.exp(-((xx - points[b, k, 0]) ** 2 + (yy - points[b, k, 1]) ** 2) / 18.0)[..., None] * (
          0.3 + 0.05 * k)
  native_hw = np.full((batch_size, 2), 2 * image_size, np.int32)
  return {
      "image": np.clip(image, 0, 1),
      "points_xy": points,
      "points_xy_native": points * 2,
      "native_hw": native_hw,
      "pixel_spacing_mm": np.full((batch_size, 2), 0.6, np.float32),
      "point_valid": np.ones((batch_size, n), bool),
      "disease": rng.integers(0, 2, (batch_size, n)).astype(np.int32),
      "example_valid": np.ones((batch_size,), bool),
  }


def fake_record(index: int, native_hw: tuple[int, int] = (96, 80)) -> dict:
  """A study record of the data contract (`ccfnet_jax.data.records`) with random pixels and points."""
  rng = np.random.default_rng(index)
  n = objects.NUM_OBJECTS
  height, width = native_hw
  return {"image": rng.integers(0, 65535, (height, width, 3), dtype=np.uint16),
          "pixel_spacing_mm": np.asarray([0.7, 0.6], np.float32),
          "points_xy": np.stack([rng.uniform(5, width - 5, n), rng.uniform(5, height - 5, n)], -1).astype(np.float32),
          "point_valid": np.ones(n, bool), "disease": rng.integers(0, 2, n).astype(np.int32),
          "tags": np.asarray([""] * n), "study_uid": f"1.2.{index}", "series_uid": f"1.3.{index}",
          "instance_uid": f"1.4.{index}"}


def initial_state(config, key: int = 0):
  """(train graphdef, eval graphdef, TrainState) of `config`'s model initialised from `jax.random.key(key)`."""
  from ccfnet_jax.train import setup  # pylint: disable=g-import-not-at-top
  return setup.init_state(setup.create_model(config, jax.random.key(key)), config.weight_decay, config.ema_decay)


def jit_step(config, mesh, *, folds=(0,), pos_weight=(0.4, 0.9), key: int = 0, batching: str | None = None,
             num_steps: int = 100):
  """The run's jitted train step for `folds` stacked, their stacked initial states and traced arguments.

  Returns:
    (step(states, stacked global batches, args), states, args, eval graphdef), all placed on `mesh`.
  """
  from ccfnet_jax import parallel  # pylint: disable=g-import-not-at-top
  from ccfnet_jax.train import setup, steps  # pylint: disable=g-import-not-at-top
  model = setup.create_model(config, jax.random.key(key))
  train_graphdef, eval_graphdef, state = setup.init_state(model, config.weight_decay, config.ema_decay)
  rates = setup.learning_rates(config, num_steps, max(1, num_steps // 10), num_steps)
  args = steps.stack([steps.FoldArgs(np.int32(f), np.asarray(pos_weight, np.float32), rates) for f in folds])
  step = steps.jit_train_step(mesh, batching=batching or steps.default_fold_batching(mesh, len(folds)),
                              graphdef=train_graphdef, settings=setup.step_settings(config, model.stride))
  states = parallel.replicate(steps.stack([state] * len(folds)), mesh)
  return step, states, parallel.replicate(args, mesh), eval_graphdef


def model_step(model, image_size: int, learning_rate: float):
  """(jitted step(state, batch) of one fold, initial TrainState) for any model at a constant rate, no
  augmentation, pos_weight 1: the training step the run uses, for models built outside a config."""
  from ccfnet_jax.train import setup, steps  # pylint: disable=g-import-not-at-top
  train_graphdef, _, state = setup.init_state(model, 0.0)
  settings = steps.StepSettings(image_size=image_size, stride=int(model.stride), loss="reference", augment=None,
                                seed=0, weight_decay=0.0)
  args = steps.FoldArgs(jnp.int32(0), jnp.ones(2, jnp.float32), jnp.full((8,), learning_rate, jnp.float32))
  return jax.jit(lambda s, b: steps.train_step(s, b, args, graphdef=train_graphdef, settings=settings)), state


def stacked_global(host_batches, mesh):
  """Host batches of the folds -> one stacked global batch `[F, B, ...]`."""
  from ccfnet_jax import parallel  # pylint: disable=g-import-not-at-top
  return parallel.host_to_global({k: np.stack([b[k] for b in host_batches]) for k in host_batches[0]}, mesh,
                                 stacked_folds=True)


def main() -> None:
  """run.py with TinyNet registered."""
  register()
  import run  # pylint: disable=g-import-not-at-top
  from ccfnet_jax import cli  # pylint: disable=g-import-not-at-top
  cli.run(run.main, run.define_flags)


if __name__ == "__main__":
  main()
