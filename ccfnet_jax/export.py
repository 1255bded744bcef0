"""Ships a trained model as a `jax.export` artifact: model (eval mode, weights inside) + TTA + decode.

    python -m ccfnet_jax.export --workdir=runs/r18 --output=model.jaxexport [--which=best|last] [--fold=K]
        [--platforms=cpu,cuda]

Writes the artifact and its sidecar `OUTPUT.json`; how to run it without this package:
`ccfnet_jax.inference.artifact`.
"""

from __future__ import annotations

import os

import jax
from absl import flags

from ccfnet_jax import cli, config, parallel, rundir
from ccfnet_jax.inference import artifact

FLAGS = flags.FLAGS


def define_flags() -> None:
  cli.define_checkpoint_flags()
  flags.DEFINE_string("output", None, "Artifact to write (its sidecar goes to OUTPUT.json).", required=True)
  flags.DEFINE_list("platforms", None, "Platforms to lower for, e.g. cpu,cuda,tpu (default: this backend).")


def main(argv: list[str]) -> None:
  del argv
  rundir.check_writable(FLAGS.output)
  loaded = cli.load_model_from_flags(parallel.make_mesh(jax.devices()[:1]))
  ref = loaded.checkpoint
  described = config.describe_model(loaded.config)
  exported = artifact.export_model(loaded.model, loaded.image_size, FLAGS.output, options=loaded.eval_options,
                                   platforms=FLAGS.platforms,
                                   extra={"checkpoint": ref.step_dir, "step": ref.step, "which": ref.which,
                                          "model": described})
  size = os.path.getsize(FLAGS.output)
  print(f"exported {described} ({ref.which}, step {ref.step}) at {loaded.image_size} px for "
        f"{', '.join(exported.platforms)} -> {FLAGS.output} ({size / 1e6:.1f} MB) + "
        f"{artifact.sidecar_path(FLAGS.output)}", flush=True)


if __name__ == "__main__":
  cli.run(main, define_flags)
