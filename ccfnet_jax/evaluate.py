"""Scores a predictions file in the official annotation schema with the paper's metric.

    python -m ccfnet_jax.evaluate --predictions=preds.json --annotations=ann.json --studies=DIR \
        [--output=metrics.json] [--use_rounded] [--max_distance_mm=6]

Any tool's predictions can be scored (`ccfnet_jax.inference.predictions` describes what is read, and
`ccfnet_jax.inference.scoring` what is counted). `--use_rounded` scores the integer `coord` even where the float
`coord_float` of our own predictions is present.
"""

from __future__ import annotations

import os

from absl import flags

from ccfnet_jax import cli, metrics, rundir
from ccfnet_jax.inference import scoring

FLAGS = flags.FLAGS


def define_flags() -> None:
  flags.DEFINE_string("predictions", None, "Predictions JSON (official schema with 'prob' per point).", required=True)
  flags.DEFINE_multi_string("annotations", None, "Official annotation JSON (ground truth); may be repeated.",
                            required=True)
  flags.DEFINE_string("studies", None, "Folder of study folders (DICOM; pixel spacing is read from them).",
                      required=True)
  flags.DEFINE_string("output", None, "Write the metrics and counts as JSON here.")
  flags.DEFINE_bool("use_rounded", False, "Score the integer 'coord' even where 'coord_float' is present.")
  flags.DEFINE_float("max_distance_mm", metrics.HIT_DISTANCE_MM, "Hit radius in mm (the paper: 6).")


def main(argv: list[str]) -> None:
  del argv
  if FLAGS.output:
    rundir.check_writable(FLAGS.output)
  result = scoring.evaluate_files(FLAGS.predictions, FLAGS.annotations, FLAGS.studies, use_rounded=FLAGS.use_rounded,
                                  max_distance_mm=FLAGS.max_distance_mm)
  print(scoring.format_report(result), flush=True)
  if FLAGS.output:
    rundir.write_json(FLAGS.output, {**result.as_dict(), "predictions": os.path.abspath(FLAGS.predictions),
                                     "use_rounded": FLAGS.use_rounded, "max_distance_mm": FLAGS.max_distance_mm},
                      indent=1)


if __name__ == "__main__":
  cli.run(main, define_flags)
