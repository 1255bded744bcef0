"""Training and cross-validation: `train_and_evaluate(config, workdir)` (see `ccfnet_jax.train.loop`).

Modules: `setup` (a fold's data, schedule, model and state), `steps` (the pure train step and its jitted, stacked
form), `recalibrate` (BatchNorm recalibration), `loop` (the one training loop and a whole run), `results`.
"""

from ccfnet_jax.train.loop import ConfigChangedError, TrainingDivergedError, train_and_evaluate
from ccfnet_jax.train.steps import TrainState

__all__ = ["ConfigChangedError", "TrainState", "TrainingDivergedError", "train_and_evaluate"]
