"""Model complexity, the one place: parameter counts, multiply-accumulates (MACs) and the rows of Table 1.

Three MAC counts of one eval-mode forward pass at `[1, H, W, 3]`:
- `paper_macs`: the counter the paper's tables use (the PyTorch `thop` counter of 2020), which counts the calls of
  PyTorch modules: a conv or transposed conv `output elements x (C_in / groups x k^2, + 1 with a bias)`, a linear
  layer `output elements x C_in`, a BatchNorm `2 x its elements`, a bilinear upsampling module 11 per output
  element (the MSC pooling's three upsamplings are counted as such modules: 33,792 MACs per MSC module at 512 px,
  below the printed precision either way); activations, pooling, functional resizing, concatenation and
  element-wise arithmetic count 0; a module called twice counts twice. `reference_repeats=True` adds the
  multi-dilation convs the reference computes again (docs/method.md#model).
- `dense_macs`: the multiply-adds of the convs and matrix products only (every tap, padding included).
- `macs`: XLA's cost analysis (flops / 2), which skips taps on padding and on a transposed conv's inserted zeros.

`ROWS` are the rows of the paper's Table 1 with its printed figures; `table()` renders them beside ours (the
command is `python -m ccfnet_jax.table`).
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Any, Callable, Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ccfnet_jax.models import create_model, heads
from ccfnet_jax.models.msc import POOL_SIZES, MultiDilation, MultiStridePooling
from ccfnet_jax.models.simplebaseline import ConvTranspose

BILINEAR_UPSAMPLE_OPS = 11
"""The 2020 counter's ops per output element of a bilinear upsampling module."""
REFERENCE_REPEATS = 3
"""Extra 3x3 multi-dilation convs per MSC module in the reference: `d1(x)` twice more, `d3(d1(x))` once more."""


def count_params(tree_or_model: Any) -> int:
  """Number of trainable parameters of a model (its `nnx.Param` elements; BatchNorm statistics excluded), or the
  number of elements of every leaf of a pytree of arrays (e.g. a training state's `params`).

  Works on abstract models from `nnx.eval_shape` and on trees of `jax.ShapeDtypeStruct` too.
  """
  tree = nnx.state(tree_or_model, nnx.Param) if isinstance(tree_or_model, nnx.Module) else tree_or_model
  return sum(int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(tree))


def _image_shape(image_size: int | tuple[int, int], batch_size: int) -> jax.ShapeDtypeStruct:
  h, w = (image_size, image_size) if isinstance(image_size, int) else image_size
  return jax.ShapeDtypeStruct((batch_size, h, w, 3), jnp.float32)


def _eval_forward(graphdef: nnx.GraphDef) -> Callable[[nnx.State, jnp.ndarray], Any]:
  """`(state, x) -> outputs` of an eval-mode copy of the model (the caller's model is not touched)."""
  def forward(state: nnx.State, x: jnp.ndarray) -> Any:
    copy = nnx.merge(graphdef, state)
    copy.eval()
    return copy(x)
  return forward


# --- The paper's counter. -----------------------------------------------------------------------------------------


def _conv_ops(m: nnx.Conv | ConvTranspose, out_size: int) -> int:
  """HWIO kernel `[kh, kw, C_in / groups, C_out]`: `C_in / groups x kh x kw` multiply-adds per output (+1 bias)."""
  per_output = int(np.prod(m.kernel.shape[:-1])) + (1 if m.bias is not None else 0)
  return out_size * per_output


def _linear_ops(m: nnx.Linear, out_size: int) -> int:
  return out_size * m.kernel.shape[0]  # the 2020 counter leaves a linear layer's bias out


def _batch_norm_ops(m: nnx.BatchNorm, out_size: int) -> int:
  del m
  return 2 * out_size


def _upsample_ops(m: MultiStridePooling, out_size: int) -> int:
  """Its `len(POOL_SIZES)` one-channel maps upsampled to the input's side, as bilinear upsampling modules."""
  side_elements = out_size // (m.conv.kernel.shape[-2] + len(POOL_SIZES))
  return BILINEAR_UPSAMPLE_OPS * len(POOL_SIZES) * side_elements


def _repeat_ops(m: MultiDilation, out_size: int) -> int:
  """The reference's extra `dilate1` / `dilate3` calls: 3x3 C -> C convs with bias on maps of the module's shape."""
  return REFERENCE_REPEATS * _conv_ops(m.dilate1, out_size)


_LAYERS: tuple[tuple[type, Callable[[Any, int], int]], ...] = (
    (nnx.Conv, _conv_ops), (ConvTranspose, _conv_ops), (nnx.Linear, _linear_ops), (nnx.BatchNorm, _batch_norm_ops))
"""Layer type -> its ops per call (every module with parameters of its own must be one of these)."""
_BLOCKS: tuple[tuple[type, Callable[[Any, int], int]], ...] = ((MultiStridePooling, _upsample_ops),)
"""Block type -> the ops it adds to those of the layers it calls; every other module counts only through those."""


def _rule(module: nnx.Module, rules: Sequence[tuple[type, Callable[[Any, int], int]]]) -> Callable | None:
  return next((rule for cls, rule in rules if isinstance(module, cls)), None)


@contextlib.contextmanager
def _recording_calls(classes: set[type], calls: list[tuple[nnx.Module, int]]) -> Iterator[None]:
  """Within the block, every call of an instance of `classes` appends `(instance, output elements)` to `calls`.

  A call a recorded layer makes to its own base class's `__call__` (e.g. a BatchNorm subclass) is recorded once.
  """
  active: set[int] = set()
  saved = {cls: cls.__dict__.get("__call__") for cls in classes}

  def recording(call: Callable) -> Callable:
    def wrapper(self, *args, **kwargs):
      if id(self) in active:
        return call(self, *args, **kwargs)
      active.add(id(self))
      try:
        out = call(self, *args, **kwargs)
      finally:
        active.discard(id(self))
      calls.append((self, int(np.prod(out.shape))))
      return out
    return wrapper

  try:
    for cls in classes:
      cls.__call__ = recording(cls.__call__)
    yield
  finally:
    for cls, original in saved.items():
      if original is None:
        del cls.__call__
      else:
        cls.__call__ = original


def paper_macs(model: nnx.Module, image_size: int | tuple[int, int] = 512, batch_size: int = 1, *,
               reference_repeats: bool = False) -> int:
  """MACs of one eval-mode forward pass under the paper's counting rules (see the module docstring).

  `reference_repeats` adds, for every multi-dilation block that runs, the 3 convs the reference computes again.
  Raises ValueError when a module that holds parameters of its own is of a type the rules do not know.
  """
  rules = _LAYERS + _BLOCKS + (((MultiDilation, _repeat_ops),) if reference_repeats else ())
  for path, module in nnx.iter_modules(model):
    own = [v for v in vars(module).values() if isinstance(v, nnx.Param)]
    if own and _rule(module, _LAYERS) is None:
      raise ValueError(f"no counting rule for {type(module).__name__} at {'.'.join(map(str, path))}")
  classes = {type(m) for _, m in nnx.iter_modules(model) if _rule(m, rules) is not None}
  calls: list[tuple[nnx.Module, int]] = []
  graphdef, state = nnx.split(model)
  with _recording_calls(classes, calls):
    jax.eval_shape(_eval_forward(graphdef), state, _image_shape(image_size, batch_size))
  total = 0
  for module, out_size in calls:
    for cls, rule in rules:  # a block's own ops (upsampling, repeats) add to those of the convs it calls
      if isinstance(module, cls):
        total += rule(module, out_size)
  return total


# --- Dense conv MACs and XLA's count. -----------------------------------------------------------------------------


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
  """MACs of the convs and matrix products of one eval-mode forward, counted densely (padded taps included):
  `output elements x kernel taps x input channels` per conv; no bias, BatchNorm or element-wise work."""
  graphdef, state = nnx.split(model)
  jaxpr = jax.make_jaxpr(_eval_forward(graphdef))(state, _image_shape(image_size, batch_size))
  return float(_jaxpr_macs(jaxpr.jaxpr))


def _cost_flops(cost: Any) -> float:
  if isinstance(cost, (list, tuple)):  # older jax returns one dict per computation
    cost = cost[0] if cost else {}
  if not cost or "flops" not in cost:
    raise RuntimeError("XLA's cost analysis reported no 'flops' for this backend")
  return float(cost["flops"])


def macs(model: nnx.Module, image_size: int | tuple[int, int] = 512, batch_size: int = 1, *,
         compiled: bool = True) -> float:
  """Multiply-accumulates of one eval-mode forward pass: XLA's flop count / 2.

  XLA counts 2 flops per multiply-add of a conv but skips the taps that fall on zero padding (and adds element-wise
  work: BN, ReLU, adds), so this comes out below `dense_macs` where convs pad a lot (the dilated 3x3 convs on small
  maps, a transposed conv's inserted zeros). The model itself is not changed (a copy is put in eval).
  `compiled=False` takes the cost analysis of the lowered (unoptimised) HLO: no compilation, within a few % of the
  compiled figure.
  """
  graphdef, state = nnx.split(model)
  lowered = jax.jit(_eval_forward(graphdef)).lower(state, _image_shape(image_size, batch_size))
  if not compiled:
    return _cost_flops(lowered.cost_analysis()) / 2
  try:
    flops = _cost_flops(lowered.compile().cost_analysis())
  except RuntimeError:
    flops = _cost_flops(lowered.cost_analysis())
  return flops / 2


# --- Table 1. -----------------------------------------------------------------------------------------------------

PAPER_COUNT_HEAD = {"out_channels": heads.HEATMAP_AND_LOGITS}
"""The baselines as the paper's counts imply them: 22-channel heads (heatmaps and disease logits, no offsets)."""


@dataclasses.dataclass(frozen=True)
class Row:
  """One row of Table 1: `model` = the `create_model` kwargs of the model we train (its config's), `paper_model` =
  the extra kwargs of the construction the paper counted; the paper's printed figures in M and G."""

  method: str
  backbone: str
  model: dict[str, Any]
  paper_params_m: float
  paper_gmacs: float
  config: str
  paper_model: dict[str, Any] = dataclasses.field(default_factory=dict)
  note: str = ""


_REPEATS = "repeated MSC convs"
_HEAD = "22-channel head"

ROWS: tuple[Row, ...] = (
    Row("SimpleBaseline", "R18", dict(name="simplebaseline", depth=18, msc=False), 15.38, 33.23,
        "configs/simplebaseline_r18.py", PAPER_COUNT_HEAD, _HEAD),
    Row("SimpleBaseline", "R18-MSC", dict(name="simplebaseline", depth=18, msc=True), 6.86, 33.50,
        "configs/simplebaseline_r18_msc.py", PAPER_COUNT_HEAD, f"{_HEAD}; {_REPEATS}"),
    Row("SCN", "R18", dict(name="scn", depth=18, msc=False), 26.57, 42.73, "configs/scn_r18.py", PAPER_COUNT_HEAD,
        _HEAD),
    Row("SCN", "R18-MSC", dict(name="scn", depth=18, msc=True), 11.62, 45.43, "configs/scn_r18_msc.py",
        PAPER_COUNT_HEAD, f"{_HEAD}; {_REPEATS}"),
    Row("CCF-Net", "R18", dict(name="ccfnet", depth=18, msc=False), 11.20, 9.51, "configs/r18.py",
        note="paper: swapped"),
    Row("CCF-Net", "R18-MSC", dict(name="ccfnet", depth=18, msc=True), 4.83, 12.00, "configs/r18_msc.py",
        note=_REPEATS),
    Row("SimpleBaseline", "R50", dict(name="simplebaseline", depth=50, msc=False), 34.00, 51.64,
        "configs/simplebaseline_r50.py", PAPER_COUNT_HEAD, _HEAD),
    Row("SimpleBaseline", "R50-MSC", dict(name="simplebaseline", depth=50, msc=True), 45.33, 124.80,
        "configs/simplebaseline_r50_msc.py", PAPER_COUNT_HEAD, f"{_HEAD}; {_REPEATS}"),
    Row("HRNet", "W32", dict(name="hrnet", depth=32, msc=False), 28.54, 40.98, "configs/hrnet_w32.py",
        PAPER_COUNT_HEAD, _HEAD),
    Row("CCF-Net", "R50", dict(name="ccfnet", depth=50, msc=False), 23.60, 21.49, "configs/r50.py"),
    Row("CCF-Net", "R50-MSC", dict(name="ccfnet", depth=50, msc=True), 10.79, 22.09, "configs/r50_msc.py",
        note=_REPEATS),
)
"""The paper's Table 1 in its order: params (M) as printed, GMACs = its "GFLOPs" (MACs at 512 x 512); CCF-Net R18
un-swapped."""

NOTES = """\
- params, GMACs: the model each config trains (44 output channels: heatmap, offset y, offset x, disease logits),
  MACs under the paper's counter (`models/complexity.paper_macs`, each multi-dilation conv once).
- paper-count: the same counter on the construction the paper counted: the reference's repeated multi-dilation
  convs in every MSC module, and for SimpleBaseline, SCN and HRNet a 22-channel head (11 heatmaps + 11 disease
  logits, `out_channels=22`). The baselines' printed figures come out only with 22 channels (with 44: SimpleBaseline
  R18-MSC, SCN R18 and R18-MSC have 6.87 / 26.58 / 11.63 M parameters, and every baseline's GMACs are 0.01-0.10
  above the print); CCF-Net's printed figures are those of its 44-channel head. The configs train the 44-channel
  baselines, so that every row shares targets, loss and decode; a 22-channel one is built with
  `create_model(..., out_channels=22)` and trains as well (its offsets are zero: points at stride-4 cell centres).
- SCN: the paper gives no layers; the construction whose counts give the printed digits is a SimpleBaseline whose
  maps are multiplied by (1 + a second ResNet's 1x1-conv maps, upsampled): `ccfnet_jax/models/scn.py`. Its
  upsampling counts 0 (a functional resize); counted as a bilinear module (11 per output element) the R18 row
  would still print 42.73 G, the R18-MSC row 45.44 G instead of 45.43.
- CCF-Net R18: the paper prints its params and MACs swapped (9.51 M / 11.20 G)."""


XLA_MODES = ("none", "lowered", "compiled")
"""`measure`'s `xla`: no XLA count, the cost analysis of the lowered HLO (no compilation), or of the compiled one."""


def build(row: Row, paper_count: bool = False) -> nnx.Module:
  """The abstract model (shapes, no arrays) of `row`: the trained one, or with `paper_count` the counted one."""
  kwargs = {**row.model, **(row.paper_model if paper_count else {})}
  return nnx.eval_shape(lambda: create_model(**kwargs, rngs=nnx.Rngs(0)))


def measure(row: Row, image_size: int = 512, xla: str = "none") -> dict[str, float]:
  """{'stride', 'params', 'gmacs', 'paper_count_params', 'paper_count_gmacs'} of `row` (see `NOTES`) at
  `1 x image_size x image_size x 3`, plus 'xla_gmacs' when `xla` is 'lowered' or 'compiled'."""
  if xla not in XLA_MODES:
    raise ValueError(f"xla must be one of {XLA_MODES}, got {xla!r}")
  model = build(row)
  counted = build(row, paper_count=True) if row.paper_model else model
  out = {"stride": model.stride, "params": count_params(model), "gmacs": paper_macs(model, image_size) / 1e9,
         "paper_count_params": count_params(counted),
         "paper_count_gmacs": paper_macs(counted, image_size, reference_repeats=True) / 1e9}
  if xla != "none":
    out["xla_gmacs"] = macs(model, image_size, compiled=xla == "compiled") / 1e9
  return out


def _percent(ours: float, paper: float) -> str:
  return f"{100 * (ours - paper) / paper:+.2f} %"


def table(rows: Sequence[Row] = ROWS, image_size: int = 512, xla: str = "none") -> str:
  """Markdown table of `rows` beside the paper's figures, then `NOTES`; `xla` adds XLA's count (see `measure`)."""
  head = (f"| method | backbone | stride | params | GMACs @{image_size} | paper-count params | "
          f"paper-count GMACs | paper params M | paper GMACs | diff params | diff GMACs |")
  rule = "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
  if xla != "none":
    head += f" GMACs XLA ({xla}) |"
    rule += "---:|"
  lines = [head + " config | note |", rule + "---|---|"]
  for row in rows:
    m = measure(row, image_size, xla)
    line = (f"| {row.method} | {row.backbone} | {m['stride']} | {m['params']:,} | {m['gmacs']:.2f} | "
            f"{m['paper_count_params']:,} | {m['paper_count_gmacs']:.2f} | {row.paper_params_m:.2f} | "
            f"{row.paper_gmacs:.2f} | {_percent(m['paper_count_params'] / 1e6, row.paper_params_m)} | "
            f"{_percent(m['paper_count_gmacs'], row.paper_gmacs)} |")
    if xla != "none":
      line += f" {m['xla_gmacs']:.2f} |"
    lines.append(line + f" {row.config} | {row.note} |")
  if image_size != 512:
    lines.append(f"\n(our counts at {image_size} px; the paper's at 512 px)")
  return "\n".join(lines) + "\n\n" + NOTES
