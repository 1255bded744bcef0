"""What the commands share: the flags for devices, checkpoint choice and the compile cache (defined once), quiet
third-party logging, and one way to end on a user error.

A command module defines its own flags in `define_flags()` and ends with

    if __name__ == "__main__":
      cli.run(main, define_flags)

`run` defines the flags, quiets third-party logs and warnings unless `-v`/`--verbosity` is given, and turns a user
error (`USER_ERRORS`: a bad path, a bad config, an incompatible checkpoint, a malformed input file) into one line
`error: ...` on stderr and exit status 2, instead of a traceback.
"""

from __future__ import annotations

import logging as py_logging
import sys
import warnings
from collections.abc import Callable, Sequence

from absl import app, flags, logging

from ccfnet_jax import checkpoint, config, convert, parallel, rundir
from ccfnet_jax.data.errors import StudyError
from ccfnet_jax.inference import predictions

FLAGS = flags.FLAGS

USER_ERRORS: tuple[type[BaseException], ...] = (
    config.ConfigError, checkpoint.CheckpointError, rundir.RunDirError, predictions.PredictionFileError,
    convert.StateDictError, StudyError, FileNotFoundError, NotADirectoryError, PermissionError,
)
"""Errors that mean the user asked for something impossible: one line, no traceback."""


class UserError(ValueError):
  """A command's own check of its flags failed."""


USER_ERRORS += (UserError,)


# ---------------------------------------------------------------------------------------------------------------
# Shared flags.
# ---------------------------------------------------------------------------------------------------------------


def define_device_flags() -> None:
  flags.DEFINE_integer(
      "cpu_devices", 0, "XLA devices a CPU host is split into, the batch data-parallel over them (0: one per core "
      "that divides the batch sizes, in single-process runs; 1: JAX's single CPU device). GPUs and TPUs are not "
      "affected.")


def configure_devices(batch_sizes: Sequence[int], *, multi_process: bool | None = None) -> int:
  """Applies --cpu_devices (must run before anything starts a JAX backend)."""
  return parallel.configure_cpu_devices(FLAGS.cpu_devices, tuple(batch_sizes), multi_process=multi_process)


def define_compilation_cache_flag() -> None:
  flags.DEFINE_string(
      "compilation_cache", parallel.DEFAULT_COMPILATION_CACHE, "JAX's persistent compilation cache: repeated and "
      "resumed runs load their compiled steps from here ('' turns it off; JAX_COMPILATION_CACHE_DIR, where set, "
      "wins).")


def enable_compilation_cache() -> str | None:
  return parallel.enable_compilation_cache(FLAGS.compilation_cache)


def define_checkpoint_flags() -> None:
  """The flags that say which trained model a command loads."""
  from ml_collections import config_flags  # pylint: disable=g-import-not-at-top

  flags.DEFINE_string("workdir", None, "Training run directory (run.py --workdir).")
  flags.DEFINE_string("checkpoint", None, "A fold directory, its checkpoints/ directory or one checkpoint step "
                      "directory (instead of --workdir).")
  config_flags.DEFINE_config_file("config", None, "Training config file[:args] (default: the run's config.json).",
                                  lock_config=False)
  flags.DEFINE_enum("which", "best", ["best", "last"], "Checkpoint: best validation score or the last one.")
  flags.DEFINE_string("fold", None, "Fold of a workdir with several trained folds: K, or 'none' for the model "
                      "trained on every study.")


def load_model_from_flags(mesh=None):
  """The model that --workdir / --checkpoint, --config, --which and --fold name (`inference.loading.load_model`)."""
  from ccfnet_jax.inference import loading  # pylint: disable=g-import-not-at-top

  if (FLAGS.workdir is None) == (FLAGS.checkpoint is None):
    raise app.UsageError("give exactly one of --workdir and --checkpoint")
  fold = FLAGS.fold
  if fold is not None and fold != rundir.FINAL_FOLD:
    if not fold.isdigit():
      raise app.UsageError(f"--fold={fold}: expected a fold number or '{rundir.FINAL_FOLD}'")
    fold = int(fold)
  return loading.load_model(FLAGS.workdir or FLAGS.checkpoint, config=FLAGS.config, which=FLAGS.which, fold=fold,
                            mesh=mesh)


def define_renamed_flags(renamed: dict[str, str]) -> None:
  """Flags kept only to say what they are called now: giving `--old` stops the command naming `--new`."""
  for old, new in renamed.items():
    flags.DEFINE_string(old, None, f"Renamed: use --{new}.")
    flags.register_validator(old, lambda value: value is None, message=f"--{old} is now --{new}")


# ---------------------------------------------------------------------------------------------------------------
# Running a command.
# ---------------------------------------------------------------------------------------------------------------


def quiet_third_party() -> None:
  """Third-party INFO/WARNING logs (Orbax, TFDS, absl) and Python warnings off, unless -v / --verbosity was given."""
  if FLAGS["verbosity"].present:
    return
  logging.set_verbosity(logging.ERROR)
  for name in ("absl", "orbax", "tensorflow_datasets", "jax", "grain"):
    py_logging.getLogger(name).setLevel(py_logging.ERROR)
  warnings.filterwarnings("ignore")


def run(main: Callable[[list[str]], None], define_flags: Callable[[], None]) -> None:
  """Defines the command's flags and runs `main` under absl (see the module docstring)."""
  define_flags()

  def wrapped(argv: list[str]) -> None:
    if len(argv) > 1:
      raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    quiet_third_party()
    try:
      main(argv)
    except USER_ERRORS as e:
      print(f"error: {e}", file=sys.stderr, flush=True)
      sys.exit(2)

  app.run(wrapped)
