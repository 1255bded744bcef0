"""Model complexity: parameter counts and multiply-accumulates (MACs), dense and from XLA's cost analysis.

`python -m ccfnet_jax.complexity` prints CCF-Net R18/R34/R50 with and without MSC beside SPEC's figures (§2, §7).
Works for any model from `ccfnet_jax.models.create_model` (add rows to `ROWS` for the baselines).
"""

from __future__ import annotations

import argparse
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ccfnet_jax.models import create_model


def count_params(model: nnx.Module) -> int:
  """Number of trainable parameters (`nnx.Param` elements; BatchNorm running statistics excluded).

  Works on abstract models from `nnx.eval_shape` too.
  """
  return sum(int(np.prod(p.shape)) for p in jax.tree.leaves(nnx.state(model, nnx.Param)))


def _cost_flops(cost: Any) -> float:
  if isinstance(cost, (list, tuple)):  # older jax returns one dict per computation
    cost = cost[0] if cost else {}
  if not cost or "flops" not in cost:
    raise RuntimeError("XLA's cost analysis reported no 'flops' for this backend")
  return float(cost["flops"])


def _eval_forward(graphdef: nnx.GraphDef) -> Any:
  """`(state, x) -> outputs` of an eval-mode copy of the model (the caller's model is not touched)."""
  def forward(state: nnx.State, x: jnp.ndarray) -> Any:
    copy = nnx.merge(graphdef, state)
    copy.eval()
    return copy(x)
  return forward


def macs(model: nnx.Module, image_size: int | tuple[int, int] = 512, batch_size: int = 1, *,
         compiled: bool = True) -> float:
  """Multiply-accumulates of one eval-mode forward pass at `[batch_size, H, W, 3]`: XLA's flop count / 2.

  XLA counts 2 flops per multiply-add of a conv but skips the taps that fall on zero padding (and adds elementwise
  work: BN, ReLU, adds), so this comes out a few % below the dense conv count of `dense_macs` (thop/ptflops style,
  SPEC's figures): e.g. 9.76 vs 10.16 G for R18-MSC at 512 px, where the dilated 3x3 convs on 32x32 maps pad a lot. The model itself is not changed (a copy is put in eval).
  `compiled=False` takes the cost analysis of the lowered (unoptimised) HLO: no compilation (seconds instead of
  about a minute for HRNet at 512 px on 2 CPU cores), within a few % of the compiled figure.
  """
  h, w = (image_size, image_size) if isinstance(image_size, int) else image_size
  graphdef, state = nnx.split(model)
  x = jax.ShapeDtypeStruct((batch_size, h, w, 3), jnp.float32)
  lowered = jax.jit(_eval_forward(graphdef)).lower(state, x)
  if not compiled:
    return _cost_flops(lowered.cost_analysis()) / 2
  try:
    flops = _cost_flops(lowered.compile().cost_analysis())
  except RuntimeError:
    flops = _cost_flops(lowered.cost_analysis())
  return flops / 2


def _jaxpr_macs(jaxpr: jax.extend.core.Jaxpr) -> int:
  total = 0
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == "conv_general_dilated":
      kernel = eqn.invars[1].aval.shape
      out_feature_axis = eqn.params["dimension_numbers"].rhs_spec[0]
      per_output = int(np.prod(kernel)) // kernel[out_feature_axis] // eqn.params["batch_group_count"]
      total += int(np.prod(eqn.outvars[0].aval.shape)) * per_output
    elif eqn.primitive.name == "dot_general":
      (lhs_contracting, _), _ = eqn.params["dimension_numbers"]
      lhs = eqn.invars[0].aval.shape
      total += int(np.prod(eqn.outvars[0].aval.shape)) * int(np.prod([lhs[i] for i in lhs_contracting]))
    for value in eqn.params.values():  # nested computations (jit, custom_jvp, ...)
      for sub in value if isinstance(value, (list, tuple)) else (value,):
        if isinstance(sub, jax.extend.core.ClosedJaxpr):
          total += _jaxpr_macs(sub.jaxpr)
        elif isinstance(sub, jax.extend.core.Jaxpr):
          total += _jaxpr_macs(sub)
  return total


def dense_macs(model: nnx.Module, image_size: int | tuple[int, int] = 512, batch_size: int = 1) -> float:
  """MACs of the convs and matmuls of one eval-mode forward, counted densely (padded taps included).

  This is the convention of PyTorch counters (thop, ptflops) and of SPEC's figures: `out elements x kernel taps x
  input channels` per conv. XLA's cost analysis (`macs`) instead skips taps that fall on padding.
  """
  h, w = (image_size, image_size) if isinstance(image_size, int) else image_size
  graphdef, state = nnx.split(model)
  jaxpr = jax.make_jaxpr(_eval_forward(graphdef))(state, jax.ShapeDtypeStruct((batch_size, h, w, 3), jnp.float32))
  return float(_jaxpr_macs(jaxpr.jaxpr))


# (label, create_model kwargs, SPEC params M, SPEC GMACs (the reference's own count; None where SPEC gives none)).
ROWS: tuple[tuple[str, dict[str, Any], float | None, float | None], ...] = (
    ("CCF-Net R18-MSC", dict(name="ccfnet", depth=18, msc=True), 4.833581, 10.16),
    ("CCF-Net R34-MSC", dict(name="ccfnet", depth=34, msc=True), None, None),
    ("CCF-Net R50-MSC", dict(name="ccfnet", depth=50, msc=True), 10.790701, 20.16),
    ("CCF-Net R18", dict(name="ccfnet", depth=18, msc=False), 11.20, 9.5),
    ("CCF-Net R34", dict(name="ccfnet", depth=34, msc=False), None, None),
    ("CCF-Net R50", dict(name="ccfnet", depth=50, msc=False), 23.60, 21.49),
)
"""SPEC §2: MSC MACs with each multi-dilation conv computed once (reference with repeats: 11.98 / 21.97 G;
paper: 12.00 / 22.09); plain rows from SPEC §7 (R18: 9.5 G per the code, the paper swaps params and MACs)."""


def table(rows: Sequence[tuple[str, dict[str, Any], float | None, float | None]] = ROWS,
          image_size: int = 512) -> str:
  """Markdown table at `1 x image_size x image_size x 3`: params, dense conv MACs and XLA's MACs, beside SPEC."""
  def fmt(v: float | None, digits: int) -> str:
    return "-" if v is None else f"{v:.{digits}f}"

  lines = [f"| model | params | params M (SPEC) | GMACs dense @{image_size} | GMACs (SPEC) | GMACs XLA cost analysis |",
           "|---|---:|---:|---:|---:|---:|"]
  for label, kwargs, spec_params, spec_macs in rows:
    model = create_model(**kwargs, rngs=nnx.Rngs(0))
    lines.append(f"| {label} | {count_params(model):,} | {fmt(spec_params, 2)} | "
                 f"{dense_macs(model, image_size) / 1e9:.2f} | {fmt(spec_macs, 2)} | "
                 f"{macs(model, image_size) / 1e9:.2f} |")
  return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__)
  parser.add_argument("--image_size", type=int, default=512)
  args = parser.parse_args(argv)
  print(table(image_size=args.image_size))


if __name__ == "__main__":
  main()
