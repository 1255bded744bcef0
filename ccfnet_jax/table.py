"""The paper's Table 1 in one command: parameters and MACs of every row we build, beside the paper's figures.

    python -m ccfnet_jax.table [--image_size=512] [--compiled]

Columns: our parameter count; the paper's (M); our MACs counted densely (`complexity.dense_macs`: every conv and
transposed-conv tap, thop's convention, which the paper's "GFLOPs" follow), then plus the reference's repeated
multi-dilation convs (`reference_repeat_macs`); the paper's GMACs; XLA's cost analysis
(`complexity.macs`, flops / 2; by default of the lowered HLO, which needs no compilation; `--compiled` compiles
each model, about a minute for HRNet-W32 at 512 px on 2 CPU cores). XLA skips the taps that fall on padding and on
a transposed conv's inserted zeros, so its figure is far below the dense one for the deconvolution heads.
Known differences: the paper's plain-R18 CCF-Net row swaps params and MACs (the code gives 11.20 M / 9.5 G; SPEC
§2, §7); the paper's MSC rows count the reference's repeated multi-dilation convs (CCF-Net R18-MSC 11.98 G there,
10.16 G with each conv computed once, as we do). SCN (Payer et al.) is not built.
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from typing import Any, Sequence

import jax
from flax import nnx

from ccfnet_jax import complexity
from ccfnet_jax.models import create_model
from ccfnet_jax.models.msc import MultiDilation


@dataclasses.dataclass(frozen=True)
class Row:
  """One row of Table 1: `model` is the `create_model` kwargs (None: not built); paper figures in M and G."""

  method: str
  backbone: str
  model: dict[str, Any] | None
  paper_params_m: float
  paper_gmacs: float
  config: str = ""
  note: str = ""


ROWS: tuple[Row, ...] = (
    Row("SimpleBaseline", "R18", dict(name="simplebaseline", depth=18, msc=False), 15.38, 33.23,
        "configs/simplebaseline_r18.py"),
    Row("SimpleBaseline", "R18-MSC", dict(name="simplebaseline", depth=18, msc=True), 6.86, 33.50,
        "configs/simplebaseline_r18_msc.py", "paper MACs count the reference's repeated MSC convs"),
    Row("SCN", "R18", None, 26.57, 42.73, note="not built"),
    Row("SCN", "R18-MSC", None, 11.62, 45.43, note="not built"),
    Row("CCF-Net", "R18", dict(name="ccfnet", depth=18, msc=False), 11.20, 9.51, "configs/r18.py",
        "paper swaps params and MACs (9.51 M / 11.20 G)"),
    Row("CCF-Net", "R18-MSC", dict(name="ccfnet", depth=18, msc=True), 4.83, 12.00, "configs/r18_msc.py",
        "paper MACs count the reference's repeated MSC convs"),
    Row("SimpleBaseline", "R50", dict(name="simplebaseline", depth=50, msc=False), 34.00, 51.64,
        "configs/simplebaseline_r50.py"),
    Row("SimpleBaseline", "R50-MSC", dict(name="simplebaseline", depth=50, msc=True), 45.33, 124.80,
        "configs/simplebaseline_r50_msc.py", "paper MACs count the reference's repeated MSC convs"),
    Row("HRNet", "W32", dict(name="hrnet", depth=32, msc=False), 28.54, 40.98, "configs/hrnet_w32.py"),
    Row("CCF-Net", "R50", dict(name="ccfnet", depth=50, msc=False), 23.60, 21.49, "configs/r50.py"),
    Row("CCF-Net", "R50-MSC", dict(name="ccfnet", depth=50, msc=True), 10.79, 22.09, "configs/r50_msc.py",
        "paper MACs count the reference's repeated MSC convs"),
)
"""Paper Table 1 (SPEC §7), in the paper's order. Paper params as printed (M), GMACs = the paper's "GFLOPs"."""


def _percent(ours: float, paper: float) -> str:
  return f"{100 * (ours - paper) / paper:+.1f} %"


def reference_repeat_macs(model: nnx.Module, image_size: int) -> float:
  """MACs the reference adds by recomputing multi-dilation convs (SPEC §2): `d1(x)` twice more, `d3(d1(x))` once
  more, i.e. 3 extra 3x3 C -> C convs per MSC module at the backbone's output stride (0 for models without MSC)."""
  side = image_size // model.backbone.stride if hasattr(model, "backbone") else 0
  total = 0
  for _, node in nnx.iter_graph(model):
    if isinstance(node, MultiDilation):
      k_h, k_w, c_in, c_out = node.dilate1.kernel.shape
      total += 3 * side * side * k_h * k_w * c_in * c_out
  return float(total)


def measure(row: Row, image_size: int, compiled: bool) -> dict[str, float]:
  """{'params', 'stride', 'dense_gmacs', 'reference_gmacs' (dense + the reference's repeated MSC convs),
  'xla_gmacs', 'seconds'} of `row`'s model (eval mode, 1 x S x S x 3)."""
  if row.model is None:
    raise ValueError(f"{row.method} {row.backbone} is not built")
  started = time.perf_counter()
  model = create_model(**row.model, rngs=nnx.Rngs(0))
  out = {"params": complexity.count_params(model), "stride": model.stride,
         "dense_gmacs": complexity.dense_macs(model, image_size) / 1e9,
         "xla_gmacs": complexity.macs(model, image_size, compiled=compiled) / 1e9}
  out["reference_gmacs"] = out["dense_gmacs"] + reference_repeat_macs(model, image_size) / 1e9
  out["seconds"] = time.perf_counter() - started
  return out


def table(rows: Sequence[Row] = ROWS, image_size: int = 512, compiled: bool = False) -> str:
  """Markdown table of `rows` at `1 x image_size x image_size x 3` beside the paper's figures (SPEC §7)."""
  xla = "XLA (compiled)" if compiled else "XLA (lowered)"
  lines = [f"| method | backbone | stride | params | params M (paper) | diff | GMACs dense @{image_size} | "
           f"with ref. repeats | GMACs (paper @512) | GMACs {xla} | config | note |",
           "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|---|"]
  for row in rows:
    if row.model is None:
      lines.append(f"| {row.method} | {row.backbone} | - | - | {row.paper_params_m:.2f} | - | - | - | "
                   f"{row.paper_gmacs:.2f} | - | - | {row.note} |")
      continue
    m = measure(row, image_size, compiled)
    lines.append(f"| {row.method} | {row.backbone} | {m['stride']} | {m['params']:,} | {row.paper_params_m:.2f} | "
                 f"{_percent(m['params'] / 1e6, row.paper_params_m)} | {m['dense_gmacs']:.2f} | "
                 f"{m['reference_gmacs']:.2f} | {row.paper_gmacs:.2f} | {m['xla_gmacs']:.2f} | {row.config} | "
                 f"{row.note} |")
  return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--image_size", type=int, default=512, help="input side in px (default 512, as the paper)")
  parser.add_argument("--compiled", action="store_true",
                      help="XLA cost analysis of the compiled HLO (slow) instead of the lowered one")
  parser.add_argument("--platform", default="cpu", help="JAX platform for the analysis (default cpu)")
  args = parser.parse_args(argv)
  jax.config.update("jax_platforms", args.platform)
  print(table(image_size=args.image_size, compiled=args.compiled), flush=True)


if __name__ == "__main__":
  main()
