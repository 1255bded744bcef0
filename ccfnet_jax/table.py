"""The paper's Table 1 in one command: parameters and MACs of every row, beside the paper's figures.

    python -m ccfnet_jax.table [--image_size=512] [--xla=lowered|compiled] [--rows=SCN,HRNet]

The rows, the counting rules and the notes are `ccfnet_jax.models.complexity` (`ROWS`, `paper_macs`, `NOTES`).
`--xla` adds XLA's cost analysis of each model (`compiled` compiles every model: minutes on a small CPU).
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
from absl import flags

from ccfnet_jax import cli
from ccfnet_jax.models import complexity

FLAGS = flags.FLAGS


def define_flags() -> None:
  """The command's flags (defined only when run as a program)."""
  flags.DEFINE_integer("image_size", 512, "Input side in px (the paper counts at 512).")
  flags.DEFINE_enum("xla", "none", complexity.XLA_MODES, "Add XLA's MAC count: of the lowered HLO or the compiled "
                    "one.")
  flags.DEFINE_list("rows", [], "Only the rows whose method or 'method backbone' is listed (default: all 11).")
  flags.DEFINE_string("platform", "cpu", "JAX platform for the analysis.")


def select_rows(names: Sequence[str]) -> tuple[complexity.Row, ...]:
  """The rows named by method ('SCN') or method and backbone ('SCN R18-MSC'), case-insensitive; all when empty."""
  if not names:
    return complexity.ROWS
  wanted = {n.strip().lower() for n in names}
  known = {r.method.lower() for r in complexity.ROWS} | {f"{r.method} {r.backbone}".lower() for r in complexity.ROWS}
  unknown = sorted(wanted - known)
  if unknown:
    raise ValueError(f"unknown rows {unknown}; known: {sorted(known)}")
  return tuple(r for r in complexity.ROWS if r.method.lower() in wanted or f"{r.method} {r.backbone}".lower() in wanted)


def main(argv: Sequence[str]) -> None:
  del argv
  jax.config.update("jax_platforms", FLAGS.platform)
  try:
    rows = select_rows(FLAGS.rows)
  except ValueError as e:
    raise cli.UserError(str(e)) from None
  print(complexity.table(rows, image_size=FLAGS.image_size, xla=FLAGS.xla), flush=True)


if __name__ == "__main__":
  cli.run(main, define_flags)
