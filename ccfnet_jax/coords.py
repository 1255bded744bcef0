"""Coordinate facts of the product in one place (docs/method.md#coordinates).

- Points are continuous (x, y) in pixels: pixel column i covers [i, i + 1), annotation coordinates are used as they are.
- Map cell (row r, col c) at output stride S has its centre at ((c + 0.5) * S, (r + 0.5) * S) input px.
- The slice is stretched (not letterboxed) to the input size: x_input = x_native * W_input / W_native (likewise y).
- A horizontal flip of an image W px wide maps x to W - x (y unchanged).

Every function here accepts numpy or JAX arrays and returns the same kind (numpy in -> numpy out, so host-side code
can use it without touching a device); the JAX path works under jit and vmap. No Flax.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

ArrayLike = Any


def _namespace(*arrays: ArrayLike):
  """jnp if any argument is a JAX array (or tracer), else numpy."""
  return jnp if any(isinstance(a, jax.Array) for a in arrays) else np


def cell_center_px(index: ArrayLike, stride: float) -> ArrayLike:
  """Input-pixel coordinate of a (possibly fractional) cell index along one axis: `(index + 0.5) * stride`.

  With `index = c + offset_x` this is also the decode rule `x = (c + offset_x + 0.5) * S` (docs/method.md#decode).
  """
  return (index + 0.5) * stride


def flip_points_x(points_xy: ArrayLike, width: ArrayLike) -> ArrayLike:
  """Mirrors points for a horizontal flip of the image: x -> W - x, y unchanged.

  Args:
    points_xy: `[..., N, 2]` (x, y) px.
    width: image width W in the same px: a scalar, or an array `[...]` matching the leading dims of `points_xy`.
  Returns:
    `[..., N, 2]` flipped points (an involution: flipping twice gives the input back).
  """
  xp = _namespace(points_xy, width)
  points_xy = xp.asarray(points_xy)
  width = xp.asarray(width, dtype=points_xy.dtype)[..., None, None]
  sign = xp.asarray([-1.0, 1.0], dtype=points_xy.dtype)
  shift = xp.asarray([1.0, 0.0], dtype=points_xy.dtype)
  return points_xy * sign + width * shift


def scale_points(points_xy: ArrayLike, from_hw: ArrayLike, to_hw: ArrayLike) -> ArrayLike:
  """Maps (x, y) points between two sizes of the same stretched image (e.g. native px <-> input px), as floats.

  Args:
    points_xy: `[..., N, 2]` (x, y) px in an image of size `from_hw`.
    from_hw: (H, W) of that image, or an int/float array `[..., 2]` (per example, e.g. a batch's `native_hw [B, 2]`).
    to_hw: (H, W) of the target image, same forms.
  Returns:
    `[..., N, 2]` (x * W_to / W_from, y * H_to / H_from).
  """
  xp = _namespace(points_xy, from_hw, to_hw)
  points_xy = xp.asarray(points_xy)
  dtype = points_xy.dtype if xp.issubdtype(points_xy.dtype, xp.floating) else xp.float32
  points_xy = points_xy.astype(dtype)
  from_hw = xp.asarray(from_hw, dtype=dtype)
  to_hw = xp.asarray(to_hw, dtype=dtype)
  for name, hw in (("from_hw", from_hw), ("to_hw", to_hw)):
    if hw.shape[-1:] != (2,):
      raise ValueError(f"{name} must be (H, W) or an array [..., 2], got shape {hw.shape}")
  return points_xy * (to_hw[..., None, ::-1] / from_hw[..., None, ::-1])
