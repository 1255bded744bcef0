"""The one eval computation: model -> flip TTA -> decode -> native pixels.

Training's evaluations, `predict` and the exported artifact all run `predict`, so the points they give for the same
pixels are the same. Pure given the model (eval mode; nothing is updated), jit-able; no I/O, no training code.
"""

from __future__ import annotations

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


def model_maps(model: nnx.Module, image: jax.Array, *, flip_tta: bool = True) -> Maps:
  """float32 `Maps` of `image [B, S, S, 3]`; with `flip_tta`, merged with the pass over the mirrored images."""
  if flip_tta:
    n = image.shape[0]
    both = model(jnp.concatenate([image, image[:, :, ::-1, :]], axis=0))
    maps = decode.merge_flip(Maps(*(m[:n] for m in both)), Maps(*(m[n:] for m in both)))
  else:
    maps = model(image)
  return Maps(*(m.astype(jnp.float32) for m in maps))


def predict(model: nnx.Module, image: jax.Array, native_hw: jax.Array, *, flip_tta: bool = True) -> Prediction:
  """Points in the native pixels of each slice and their disease probabilities.

  Args:
    model: an eval-mode model with `.stride` (`Maps` out).
    image: float32 `[B, S, S, 3]` in [0, 1], each slice stretched to S x S (docs/method.md#decode).
    native_hw: `[B, 2]` (H, W) of each native slice; pass S, S for input pixels.
    flip_tta: average with the mirrored pass (heatmap and logits; offsets from the plain pass).
  """
  decoded = decode.decode(model_maps(model, image, flip_tta=flip_tta), model.stride)
  input_hw = jnp.asarray(image.shape[1:3], jnp.float32)
  return Prediction(coords.scale_points(decoded.xy, input_hw, native_hw), decoded.prob)


def predict_from_state(graphdef: nnx.GraphDef, params: nnx.State, batch_stats: nnx.State, image: jax.Array,
                       native_hw: jax.Array, *, flip_tta: bool = True) -> Prediction:
  """`predict` of the model that (graphdef, params, batch_stats) describe (an eval-mode graphdef)."""
  return predict(nnx.merge(graphdef, params, batch_stats), image, native_hw, flip_tta=flip_tta)


@functools.lru_cache(maxsize=16)
def jit_predict(graphdef: nnx.GraphDef, mesh: jax.sharding.Mesh, flip_tta: bool = True
                ) -> Callable[[Any, Any, jax.Array, jax.Array], Prediction]:
  """`predict_from_state` jitted on `mesh` (weights replicated, batch split on "data"), built once per model."""
  replicated, data = parallel.replicated_sharding(mesh), parallel.data_sharding(mesh)
  return jax.jit(functools.partial(predict_from_state, graphdef, flip_tta=flip_tta),
                 in_shardings=(replicated, replicated, data, data), out_shardings=replicated)
