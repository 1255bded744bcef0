"""Decoding CCF-Net's maps into points and probabilities, and the test-time augmentations' map arithmetic (flip:
docs/method.md#decode; shifts and the ordered decode: docs/recipe.md).

Pure jnp: no Flax, no I/O. Works under jit and vmap, on any device, for maps with any leading dims
(`[B, h, w, 11]` batched or `[h, w, 11]` for one image). Users may import this module into their own JAX code.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from ccfnet_jax import coords, objects
from ccfnet_jax.maps import Maps

DECODERS: tuple[str, ...] = ("argmax", "ordered")
"""`config.decode`: 11 independent argmaxes (the reference) or the anatomically ordered choice (`decode_ordered`)."""


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
  return _decode_at(maps, argmax_cell(maps.heatmap), stride)


def _decode_at(maps: Maps, cell: jnp.ndarray, stride: int) -> Decoded:
  """`Decoded` of the objects placed at `cell [..., 11, 2]`."""
  x = coords.cell_center_px(cell[..., 1] + value_at_cell(maps.offset_x, cell), stride)
  y = coords.cell_center_px(cell[..., 0] + value_at_cell(maps.offset_y, cell), stride)
  return Decoded(
      xy=jnp.stack([x, y], axis=-1),
      prob=jax.nn.sigmoid(value_at_cell(maps.logits, cell)),
      cell=cell,
      peak=value_at_cell(maps.heatmap, cell),
  )


def decode_ordered(maps: Maps, stride: int = 16, top_k: int = 8) -> Decoded:
  """Points that respect the anatomy: the 11 objects strictly top to bottom, so no two levels on one point.

  Each object keeps its `top_k` highest heatmap cells as candidates; among all choices of one candidate per object
  whose decoded y (offsets included) increases strictly along `objects.TOP_TO_BOTTOM`, the one with the largest sum
  of heatmap values is taken (dynamic programming along the chain, O(11 top_k^2)). Two neighbouring levels may
  share a cell when their offsets put them in order: a disc and a vertebra are often less than a cell apart. Where
  the independent argmaxes already respect the order they are the answer (the first candidate is the argmax);
  where no candidate chain does, the argmaxes are returned.

  Args:
    maps: `Maps [..., h, w, 11]`.
    stride: output stride in input px per cell.
    top_k: candidates per object (at most h * w).
  Returns:
    `Decoded`, as `decode`.
  """
  shapes = {name: jnp.shape(getattr(maps, name)) for name in Maps._fields}
  if len(set(shapes.values())) != 1:
    raise ValueError(f"the four maps must have the same shape, got {shapes}")
  _check_map(maps.heatmap, "heatmap")
  h, w = maps.heatmap.shape[-3:-1]
  if not 1 <= top_k <= h * w:
    raise ValueError(f"top_k must be in [1, h * w = {h * w}], got {top_k}")
  return _decode_ordered(Maps(*(jnp.asarray(m) for m in maps)), stride, top_k)


@functools.partial(jax.jit, static_argnames=("stride", "top_k"))
def _decode_ordered(maps: Maps, stride: int, top_k: int) -> Decoded:
  *lead, h, w, k = maps.heatmap.shape
  channels_first = lambda m: jnp.moveaxis(m.reshape(*lead, h * w, k), -1, -2)  # [..., 11, h*w]
  score, flat = jax.lax.top_k(channels_first(maps.heatmap), top_k)  # [..., 11, top_k], descending, argmax first
  offset_y = jnp.take_along_axis(channels_first(maps.offset_y), flat, axis=-1)
  y = coords.cell_center_px(flat // w + offset_y, stride)  # [..., 11, top_k] decoded y px of each candidate
  order = objects.TOP_TO_BOTTOM
  best = score[..., order[0], :]  # [..., top_k]: best chain score ending at each candidate of the object
  pointers = []
  for above, below in zip(order[:-1], order[1:]):
    allowed = y[..., below, None, :] > y[..., above, :, None]  # [..., top_k above, top_k below]
    chain = jnp.where(allowed, best[..., :, None], -jnp.inf)
    pointers.append(jnp.argmax(chain, axis=-2))  # [..., top_k below]: best candidate above
    best = jnp.max(chain, axis=-2) + score[..., below, :]
  current = jnp.argmax(best, axis=-1)  # candidate of the lowest object, then walk the pointers upwards
  picks = [current]
  for pointer in reversed(pointers):
    current = jnp.take_along_axis(pointer, current[..., None], axis=-1)[..., 0]
    picks.append(current)
  by_position = jnp.stack(picks[::-1], axis=-1)  # [..., 11] candidate index, in anatomical order
  chosen = by_position[..., np.argsort(order)]  # [..., 11] in channel order
  feasible = jnp.isfinite(jnp.max(best, axis=-1))[..., None]
  chosen = jnp.where(feasible, chosen, 0)
  flat_index = jnp.take_along_axis(flat, chosen[..., None], axis=-1)[..., 0]  # [..., 11]
  cell = jnp.stack([flat_index // w, flat_index % w], axis=-1).astype(jnp.int32)
  return _decode_at(maps, cell, stride)


def decode_with(name: str, maps: Maps, stride: int = 16, top_k: int = 8) -> Decoded:
  """The decoder `name` of `DECODERS` ('argmax': `decode`; 'ordered': `decode_ordered`)."""
  if name == "argmax":
    return decode(maps, stride)
  if name == "ordered":
    return decode_ordered(maps, stride, top_k)
  raise ValueError(f"decode must be one of {DECODERS}, got {name!r}")


def _moved(x: jnp.ndarray, dy: int, dx: int) -> tuple[jnp.ndarray, jnp.ndarray]:
  """`x [..., H, W, C]` with its content at (y, x) moved to (y + dy, x + dx), zeros moved in; and the `[H, W, 1]`
  bool mask of the positions that received content."""
  h, w = x.shape[-3:-1]
  rows = jnp.arange(h) - dy
  cols = jnp.arange(w) - dx
  inside = ((rows >= 0) & (rows < h))[:, None, None] & ((cols >= 0) & (cols < w))[None, :, None]
  moved = jnp.take(jnp.take(x, jnp.clip(rows, 0, h - 1), axis=-3), jnp.clip(cols, 0, w - 1), axis=-2)
  return jnp.where(inside, moved, jnp.zeros((), x.dtype)), inside


def shift_image(image: jnp.ndarray, dy: int, dx: int) -> jnp.ndarray:
  """`image [..., H, W, C]` moved by (dy, dx) px (content at (y, x) goes to (y + dy, x + dx)), zeros moved in."""
  return _moved(image, dy, dx)[0]


def unshift_maps(maps: Maps, dy: int, dx: int) -> tuple[Maps, jnp.ndarray]:
  """Maps of an image shifted by (dy, dx) CELLS, brought back onto the unshifted image's cells.

  Cell (r, c) of the image is cell (r + dy, c + dx) of the shifted one; offsets are in cells, so a whole-cell shift
  leaves them valid. Returns (maps `[..., h, w, 11]`, `[h, w, 1]` float: 1 where the shifted image saw the cell).
  """
  back = [_moved(m, -dy, -dx) for m in maps]
  return Maps(*(m for m, _ in back)), back[0][1].astype(jnp.float32)


def merge_views(views: list[tuple[Maps, jnp.ndarray]]) -> Maps:
  """Cell-wise mean of the maps of several test-time views, each weighted by its `[h, w, 1]` coverage."""
  total = sum(seen for _, seen in views)
  weight = 1.0 / jnp.maximum(total, 1.0)
  return Maps(*(sum(getattr(m, name) * seen for m, seen in views) * weight for name in Maps._fields))


def shift_views(shift_cells: int) -> tuple[tuple[int, int], ...]:
  """(dy, dx) cell shifts of shift TTA: the image itself, then +-`shift_cells` along each axis (0: the image only)."""
  if shift_cells < 0:
    raise ValueError(f"shift_cells must be >= 0, got {shift_cells}")
  if shift_cells == 0:
    return ((0, 0),)
  s = shift_cells
  return ((0, 0), (-s, 0), (s, 0), (0, -s), (0, s))


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
