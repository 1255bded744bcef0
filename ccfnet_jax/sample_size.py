"""Runs the training-size experiment (the paper's Fig. 4) and writes its table and plot.

    python -m ccfnet_jax.sample_size --grid=configs/fig4.py --grid.overrides.manual_dir=DIR --workdir=runs/fig4

A grid file names the models (their config files), the training fractions, the folds and the overrides of every
run (`configs/fig4.py`). Each cell is a resumable run directory under `--workdir`; a stopped grid picks up where it
stopped. Writes `sample_size.md` (the table), `sample_size.png` (score against fraction, mean +- std over folds)
and `sample_size.json` into `--workdir`.
"""

from __future__ import annotations

from absl import flags

from ccfnet_jax import cli

FLAGS = flags.FLAGS


def define_flags() -> None:
  from ml_collections import config_flags  # pylint: disable=g-import-not-at-top

  config_flags.DEFINE_config_file("grid", "configs/fig4.py", "Grid file[:preset]: models, fractions, folds, overrides.",
                                  lock_config=False)
  flags.DEFINE_string("workdir", None, "Folder of the grid's run directories and its table and plot.", required=True)
  flags.DEFINE_enum("which", "last", ["last", "best"], "Which evaluation of each run the table and plot show.")
  cli.define_device_flags()
  cli.define_compilation_cache_flag()


def main(argv: list[str]) -> None:
  del argv
  from ccfnet_jax.train import sample_size  # pylint: disable=g-import-not-at-top  (importing starts no backend)

  grid = FLAGS.grid
  cli.configure_devices((int(grid.overrides.get("batch_size", 8)),))
  cli.enable_compilation_cache()
  rows = sample_size.run_grid(grid, FLAGS.workdir, which=FLAGS.which)
  print(sample_size.format_table(rows, FLAGS.which), flush=True)
  print(f"table, plot and summary in {FLAGS.workdir}: {sample_size.TABLE_FILE}, {sample_size.PLOT_FILE}, "
        f"{sample_size.SUMMARY_FILE}", flush=True)


if __name__ == "__main__":
  cli.run(main, define_flags)
