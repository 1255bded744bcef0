"""Predicts the 11 points and their disease probabilities for every study folder, as an official-schema JSON file.

    python -m ccfnet_jax.predict --workdir=runs/r18 --studies=DIR --output=preds.json \
        [--annotations=ann.json] [--overlays=DIR] [--which=best|last] [--fold=K] [--batch_size=N]
    python -m ccfnet_jax.predict --checkpoint=runs/r18/fold_0/checkpoints/1200 [--config=configs/r18_msc.py] ...

Writes `--output` (schema: `ccfnet_jax.inference.predictions`) and its sidecar `<output stem>.errors.json`: the
study folders that could not be predicted (folder, file, reason, kind), warnings, problems in the annotation file,
and what was run. `--overlays=DIR`: one PNG per study with the points and probabilities. `--report=DIR`: one
self-contained HTML page with every study (`ccfnet_jax.inference.report`).
"""

from __future__ import annotations

import os
import sys

import jax
from absl import flags

from ccfnet_jax import cli, config, rundir
from ccfnet_jax.data import layout
from ccfnet_jax.inference import predictor, report, studies

FLAGS = flags.FLAGS


def define_flags() -> None:
  cli.define_checkpoint_flags()
  cli.define_device_flags()
  flags.DEFINE_string("studies", None, "Folder of study folders (official layout).", required=True)
  flags.DEFINE_string("output", None, "Predictions JSON to write.", required=True)
  flags.DEFINE_string("annotations", None, "Official annotation JSON: predict on the annotated slices.")
  flags.DEFINE_string("overlays", None, "Folder for overlay PNGs (one per study).")
  flags.DEFINE_string("report", None, "Folder for the QC page (index.html: every study's overlay and points; with "
                      "--annotations, each point's error and the metric).")
  flags.DEFINE_integer("batch_size", None, "Global batch size (a multiple of the device count; default 8 or the "
                       "device count).")
  flags.DEFINE_integer("num_threads", 4, "Threads reading DICOM files.")


def main(argv: list[str]) -> None:
  del argv
  folders = layout.study_folders(FLAGS.studies)
  if not folders:
    raise cli.UserError(f"--studies={FLAGS.studies}: no study folder (and no .dcm file) in it")
  rundir.check_writable(FLAGS.output)
  if FLAGS.report:
    rundir.check_writable(os.path.join(FLAGS.report, report.INDEX_NAME))
  cli.configure_devices((FLAGS.batch_size or predictor.DEFAULT_BATCH_SIZE,))
  loaded = cli.load_model_from_flags()
  runner = predictor.Predictor(loaded.model, image_size=loaded.image_size, options=loaded.eval_options,
                               batch_size=FLAGS.batch_size)
  print(f"model {config.describe_model(loaded.config)} from {loaded.checkpoint.step_dir} "
        f"({loaded.checkpoint.which}, step {loaded.checkpoint.step}); {loaded.image_size} px, "
        f"batch {runner.batch_size} on {jax.device_count()} device(s)", flush=True)
  run = studies.predict_studies(runner, FLAGS.studies, annotations=FLAGS.annotations, overlays_dir=FLAGS.overlays,
                                num_threads=FLAGS.num_threads, report_tiles=bool(FLAGS.report),
                                progress=sys.stderr.isatty())  # a bar at a terminal, none in logs
  output, sidecar = studies.write_outputs(run, FLAGS.output, studies.run_info(loaded, runner))
  print(f"predicted {len(run.predictions)} of {run.num_folders} studies -> {output}; "
        f"{len(run.failed.errors)} failed, {len(run.warnings)} warnings -> {sidecar}", flush=True)
  for error in run.failed.errors:
    print(f"  failed: {error.study}: {error.reason} [{error.kind}] ({error.file})", flush=True)
  if FLAGS.overlays:
    print(f"overlays -> {os.path.abspath(FLAGS.overlays)}", flush=True)
  if FLAGS.report:
    page = report.write_report(FLAGS.report, run.report_studies, run.failed,
                               title=f"{config.describe_model(loaded.config)}: {FLAGS.studies}")
    print(f"QC page -> {os.path.abspath(page)}", flush=True)


if __name__ == "__main__":
  cli.run(main, define_flags)
