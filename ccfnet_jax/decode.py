"""Decoding CCF-Net's maps into points and probabilities, and flip test-time augmentation (docs/method.md#decode).

Pure jnp: no Flax, no I/O. Works under jit and vmap, on any device, for maps with any leading dims
(`[B, h, w, 11]` batched or `[h, w, 11]` for one image). Users may import this module into their own JAX code.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp

from ccfnet_jax import coords
from ccfnet_jax.maps import Maps


class Decoded(NamedTuple):
  """Decoded objects; leading dims `[...]` are those of the maps (e.g. `[B]`)."""

  xy: jnp.ndarray
  """`[..., 11, 2]` float32 (x, y) in input px."""
  prob: jnp.ndarray
  """`[..., 11]` float32 disease probability: sigmoid of the logit at `cell`."""
  cell: jnp.ndarray
  """`[..., 11, 2]` int32 (row, col) of the heatmap maximum."""
  peak: jnp.ndarray
  """`[..., 11]` float32 heatmap value at `cell`."""


def _check_map(x: jnp.ndarray, name: str) -> None:
  if jnp.ndim(x) < 3:
    raise ValueError(f"{name} must be [..., h, w, K] (at least 3 dims), got shape {x.shape}")


def argmax_cell(heatmap: jnp.ndarray) -> jnp.ndarray:
  """Cell of each channel's maximum, row-major first maximum on ties (as numpy/torch argmax of the flattened map).

  Args:
    heatmap: `[..., h, w, K]`.
  Returns:
    `[..., K, 2]` int32 (row, col).
  """
  _check_map(heatmap, "heatmap")
  *lead, h, w, k = heatmap.shape
  flat_index = jnp.argmax(heatmap.reshape(*lead, h * w, k), axis=-2).astype(jnp.int32)  # [..., K]
  return jnp.stack([flat_index // w, flat_index % w], axis=-1)


def value_at_cell(values: jnp.ndarray, cell: jnp.ndarray) -> jnp.ndarray:
  """Each channel's value at its own cell: `out[..., k] = values[..., cell[..., k, 0], cell[..., k, 1], k]`.

  Args:
    values: `[..., h, w, K]` map.
    cell: `[..., K, 2]` int (row, col), inside the map.
  Returns:
    `[..., K]`. Differentiable with respect to `values`.
  """
  _check_map(values, "values")
  *lead, h, w, k = values.shape
  flat_index = cell[..., 0] * w + cell[..., 1]  # [..., K]
  return jnp.take_along_axis(values.reshape(*lead, h * w, k), flat_index[..., None, :], axis=-2)[..., 0, :]


def decode(maps: Maps, stride: int = 16) -> Decoded:
  """Points and probabilities from the four maps (docs/method.md#decode).

  Per object: the cell (r, c) of the heatmap maximum; `x = (c + offset_x[r, c] + 0.5) * S`,
  `y = (r + offset_y[r, c] + 0.5) * S` input px; `prob = sigmoid(logits[r, c])`.

  Args:
    maps: `Maps`, each `[..., h, w, 11]` (batched `[B, h, w, 11]` or a single `[h, w, 11]`).
    stride: output stride S in input px per cell (16 for CCF-Net with MSC, 32 without, 4 for SimpleBaseline).
  Returns:
    `Decoded` with `xy [..., 11, 2]`, `prob [..., 11]`, `cell [..., 11, 2]`, `peak [..., 11]`.
  """
  shapes = {name: jnp.shape(getattr(maps, name)) for name in Maps._fields}
  if len(set(shapes.values())) != 1:
    raise ValueError(f"the four maps must have the same shape, got {shapes}")
  _check_map(maps.heatmap, "heatmap")
  return _decode(Maps(*(jnp.asarray(m) for m in maps)), stride)


@functools.partial(jax.jit, static_argnames=("stride",))
def _decode(maps: Maps, stride: int) -> Decoded:
  """`decode` after argument checks, compiled once per shape (inlined inside a caller's jit)."""
  cell = argmax_cell(maps.heatmap)
  x = coords.cell_center_px(cell[..., 1] + value_at_cell(maps.offset_x, cell), stride)
  y = coords.cell_center_px(cell[..., 0] + value_at_cell(maps.offset_y, cell), stride)
  return Decoded(
      xy=jnp.stack([x, y], axis=-1),
      prob=jax.nn.sigmoid(value_at_cell(maps.logits, cell)),
      cell=cell,
      peak=value_at_cell(maps.heatmap, cell),
  )


def flip_maps_x(maps: Maps) -> Maps:
  """Mirrors every map along the width axis (axis -2), i.e. cell column c <-> w - 1 - c.

  A horizontal image flip of W = w * S px maps cell centre (c + 0.5) * S to (w - 1 - c + 0.5) * S, so this is the
  map-space counterpart of `coords.flip_points_x`. Offsets are flipped in position only (not negated).
  """
  return Maps(*(jnp.flip(m, axis=-2) for m in maps))


def merge_flip(maps: Maps, maps_of_flipped: Maps) -> Maps:
  """Flip test-time augmentation (docs/method.md#decode): average with the pass on the horizontally flipped image.

  Args:
    maps: `Maps [..., h, w, 11]` of the image.
    maps_of_flipped: `Maps [..., h, w, 11]` of the same image flipped horizontally (as the model returned them).
  Returns:
    `Maps`: heatmap and logits = mean of `maps` and `maps_of_flipped` flipped back; offsets from `maps` alone.
  """
  back = flip_maps_x(maps_of_flipped)
  return Maps(
      heatmap=0.5 * (maps.heatmap + back.heatmap),
      offset_y=maps.offset_y,
      offset_x=maps.offset_x,
      logits=0.5 * (maps.logits + back.logits),
  )


# Coordinate helpers re-exported for users of decode (the facts live in `ccfnet_jax.coords`).
flip_points_x = coords.flip_points_x
scale_points = coords.scale_points
