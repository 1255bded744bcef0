"""The one eval computation: model -> test-time augmentation (flip, shifts) -> decode -> native pixels.

Training's evaluations, `predict` and the exported artifact all run `predict`, so the points they give for the same
pixels are the same. Pure given the model (eval mode; nothing is updated), jit-able; no I/O, no training code.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from ccfnet_jax import coords, decode, parallel
from ccfnet_jax.maps import Maps


class Prediction(NamedTuple):
  """`xy [B, 11, 2]` (x, y) native px (floats), `prob [B, 11]` disease probabilities."""
  xy: jax.Array
  prob: jax.Array


@dataclasses.dataclass(frozen=True)
class EvalOptions:
  """How the model's maps become points (static, hashable; the defaults are the reference's).

  flip_tta: average with the pass over the mirrored image (docs/method.md#decode). shift_cells: shift TTA, the
  image also moved by +-N whole cells along each axis (0: off; docs/recipe.md#test-time-shifts). decode:
  `decode.DECODERS` ('argmax' or 'ordered'); decode_top_k: candidates per object of the ordered decode.
  """

  flip_tta: bool = True
  shift_cells: int = 0
  decode: str = "argmax"
  decode_top_k: int = 8


def eval_options(config: Any) -> EvalOptions:
  """The `EvalOptions` of a training config (`flip_tta`, `tta.shift_cells`, `decode`, `decode_top_k`); a field the
  config lacks keeps its default."""
  default = EvalOptions()
  tta = config.get("tta", None)
  return EvalOptions(flip_tta=bool(config.get("flip_tta", default.flip_tta)),
                     shift_cells=int(tta.get("shift_cells", default.shift_cells)) if tta is not None
                     else default.shift_cells,
                     decode=str(config.get("decode", default.decode)),
                     decode_top_k=int(config.get("decode_top_k", default.decode_top_k)))


def model_maps(model: nnx.Module, image: jax.Array, options: EvalOptions = EvalOptions()) -> Maps:
  """float32 `Maps` of `image [B, S, S, 3]` with the test-time augmentations of `options`, all views in one batch.

  Flip: heatmap and logits averaged with the mirrored pass, offsets from the plain one (`decode.merge_flip`).
  Shifts (`decode.shift_views`): each shifted view (after its own flip merge) moved back onto the image's cells and
  averaged, cell by cell, over the views that saw the cell.
  """
  n = image.shape[0]
  shifts = decode.shift_views(options.shift_cells)
  views = [image if (dy, dx) == (0, 0) else decode.shift_image(image, dy * model.stride, dx * model.stride)
           for dy, dx in shifts]
  if options.flip_tta:
    views += [v[:, :, ::-1, :] for v in views]
  out = model(jnp.concatenate(views, axis=0) if len(views) > 1 else image)
  out = Maps(*(m.astype(jnp.float32) for m in out))

  def view(i):
    return Maps(*(m[i * n:(i + 1) * n] for m in out))

  per_shift = []
  for i, (dy, dx) in enumerate(shifts):
    maps = decode.merge_flip(view(i), view(len(shifts) + i)) if options.flip_tta else view(i)
    if len(shifts) == 1:
      return maps
    per_shift.append(decode.unshift_maps(maps, dy, dx))
  return decode.merge_views(per_shift)


def predict(model: nnx.Module, image: jax.Array, native_hw: jax.Array,
            options: EvalOptions = EvalOptions()) -> Prediction:
  """Points in the native pixels of each slice and their disease probabilities.

  Args:
    model: an eval-mode model with `.stride` (`Maps` out).
    image: float32 `[B, S, S, 3]` in [0, 1], each slice stretched to S x S (docs/method.md#decode).
    native_hw: `[B, 2]` (H, W) of each native slice; pass S, S for input pixels.
    options: test-time augmentation and decoder (`EvalOptions`; default: flip TTA, argmax decode).
  """
  decoded = decode.decode_with(options.decode, model_maps(model, image, options), model.stride,
                               options.decode_top_k)
  input_hw = jnp.asarray(image.shape[1:3], jnp.float32)
  return Prediction(coords.scale_points(decoded.xy, input_hw, native_hw), decoded.prob)


def predict_from_state(graphdef: nnx.GraphDef, params: nnx.State, batch_stats: nnx.State, image: jax.Array,
                       native_hw: jax.Array, options: EvalOptions = EvalOptions()) -> Prediction:
  """`predict` of the model that (graphdef, params, batch_stats) describe (an eval-mode graphdef)."""
  return predict(nnx.merge(graphdef, params, batch_stats), image, native_hw, options)


@functools.lru_cache(maxsize=16)
def jit_predict(graphdef: nnx.GraphDef, mesh: jax.sharding.Mesh, options: EvalOptions = EvalOptions()
                ) -> Callable[[Any, Any, jax.Array, jax.Array], Prediction]:
  """`predict_from_state` jitted on `mesh` (weights replicated, batch split on "data"), built once per model."""
  replicated, data = parallel.replicated_sharding(mesh), parallel.data_sharding(mesh)
  return jax.jit(functools.partial(predict_from_state, graphdef, options=options),
                 in_shardings=(replicated, replicated, data, data), out_shardings=replicated)
