"""Training throughput of the jitted train step (augmentation + targets + forward + backward + AdamW), images/s.

    python scripts/bench_train.py --config=configs/tianchi_quick.py --steps=10

Runs on synthetic batches of the config's image size and batch size on every device of the host (no data
loading: the input pipeline has its own benchmark). Prints compile time and steady-state steps/s and images/s.
"""

from __future__ import annotations

import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from ccfnet_jax import objects, parallel, train  # noqa: E402
from ccfnet_jax.data import pipeline  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file("config", "configs/tianchi_quick.py", "Experiment config.")
_STEPS = flags.DEFINE_integer("steps", 10, "Timed steps (after one warm-up step).")


def synthetic_batch(batch_size: int, image_size: int, seed: int = 0) -> dict[str, np.ndarray]:
  """Random images with plausible points (the cost of a step does not depend on the pixel values)."""
  rng = np.random.default_rng(seed)
  n = objects.NUM_OBJECTS
  points = np.stack([rng.uniform(0.3, 0.7, (batch_size, n)), np.sort(rng.uniform(0.2, 0.8, (batch_size, n)))],
                    -1).astype(np.float32) * image_size
  return {"image": rng.random((batch_size, image_size, image_size, 3), dtype=np.float32), "points_xy": points,
          "point_valid": np.ones((batch_size, n), bool), "disease": rng.integers(0, 2, (batch_size, n), np.int32),
          "pixel_spacing_mm": np.full((batch_size, 2), 0.6, np.float32),
          "native_hw": np.full((batch_size, 2), image_size, np.int32)}


def main(argv):
  del argv
  config = _CONFIG.value
  mesh = parallel.make_mesh()
  model = train.create_model(config, jax.random.key(0))
  schedule = train.create_schedule(config, 1000, 100)
  tx = train.create_optimizer(config, schedule)
  train_graphdef, eval_graphdef, state = train.init_state(model, tx)
  settings = train.StepSettings(image_size=config.image_size, stride=model.stride, loss=config.loss,
                                pos_weight=(0.4, 0.9), augment=train.augment_config(config), flip_tta=config.flip_tta,
                                seed=0, fold=0)
  jit_train, _ = train.jit_steps(mesh, train_graphdef=train_graphdef, eval_graphdef=eval_graphdef, tx=tx,
                                 schedule=schedule, settings=settings)
  state = parallel.replicate(state, mesh)
  batch = pipeline.to_global(synthetic_batch(config.batch_size, config.image_size), mesh)
  started = time.perf_counter()
  state, scalars = jit_train(state, batch)
  jax.block_until_ready(scalars)
  compile_s = time.perf_counter() - started
  started = time.perf_counter()
  for _ in range(_STEPS.value):
    state, scalars = jit_train(state, batch)
  jax.block_until_ready(scalars)
  elapsed = time.perf_counter() - started
  steps_per_s = _STEPS.value / elapsed
  print(f"{config.model.name} R{config.model.depth}{'-MSC' if config.model.msc else ''} {config.image_size} px, "
        f"batch {config.batch_size}, mixed_precision={config.mixed_precision}, {jax.device_count()} x "
        f"{jax.devices()[0].device_kind}: first step (compile + run) {compile_s:.1f} s; "
        f"{steps_per_s:.3f} steps/s = {steps_per_s * config.batch_size:.2f} images/s over {_STEPS.value} steps")


if __name__ == "__main__":
  app.run(main)
