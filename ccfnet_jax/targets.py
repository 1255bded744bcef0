"""Training targets: ground-truth points -> target maps (docs/method.md#targets).

Pure jnp: no Flax, no I/O. Works under jit (with `image_hw`, `stride`, `sigma` static) and vmap, for any leading
dims (`[B, 11, 2]` batched, `[11, 2]` for one image).
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp

from ccfnet_jax import coords, decode, objects
from ccfnet_jax.maps import Maps

REFERENCE_MASK_THRESHOLD: float = 0.4
"""Offsets are trained where the target heatmap is >= this (the reference code: `H >= max(H) - 0.6`)."""

PAPER_MASK_THRESHOLD: float = 0.6
"""The paper's mask for offsets and disease logits: target heatmap >= this."""


class Targets(NamedTuple):
  """Encoded ground truth; leading dims `[...]` are those of the points (e.g. `[B]`)."""

  maps: Maps
  """Target maps, each `[..., h, w, 11]` float32:
  heatmap: Gaussian of sigma px around each present point, divided by its own maximum (peak exactly 1); 0 if absent.
  offset_y / offset_x: `(y - yc) / S`, `(x - xc) / S` (point minus cell centre, in cells) at EVERY cell; 0 if absent.
  logits: the binary disease label (1 / 0) broadcast over the map, -1 where unknown or absent."""
  offset_mask: jnp.ndarray
  """`[..., h, w, 11]` bool: the reference loss's offset mask, `heatmap >= REFERENCE_MASK_THRESHOLD` for present
  points (all False for absent ones)."""
  point_valid: jnp.ndarray
  """`[..., 11]` bool: the point is present."""
  peak_cell: jnp.ndarray
  """`[..., 11, 2]` int32 (row, col): the argmax of the target heatmap = the cell whose centre is nearest the point
  (clamped to the map for points outside it). Row-major first on exact ties, as `decode.argmax_cell`."""


def heatmap_mask(heatmap: jnp.ndarray, point_valid: jnp.ndarray, threshold: float) -> jnp.ndarray:
  """`[..., h, w, K]` bool: `heatmap >= threshold` at present points (`point_valid [..., K]`), False elsewhere."""
  return (heatmap >= threshold) & point_valid[..., None, None, :]


def _axis_gaussian(p: jnp.ndarray, n: int, stride: float, sigma: float) -> tuple[jnp.ndarray, jnp.ndarray]:
  """One axis of the separable Gaussian, divided by its maximum.

  Args:
    p: `[..., K]` coordinate (x or y) px.
  Returns:
    (`[..., n, K]` exp(-((t - p)^2 - (t_m - p)^2) / (2 sigma^2)) over cell centres t, with m the nearest cell,
    `[..., n, K]` (p - t) / stride).
  """
  centers = coords.cell_center_px(jnp.arange(n, dtype=jnp.float32), stride)[:, None]  # [n, 1]
  p = p[..., None, :]  # [..., 1, K]
  nearest = jnp.clip(jnp.floor(p / stride), 0, n - 1)  # cell containing p (nearest centre), clamped
  nearest_center = coords.cell_center_px(nearest, stride)
  # (t - p)^2 - (t_m - p)^2 factorised: exact at t = t_m and free of cancellation far from the point.
  d2_excess = (centers - nearest_center) * (centers + nearest_center - 2.0 * p)
  return jnp.exp(-d2_excess / (2.0 * sigma * sigma)), (p - centers) / stride


def encode(points_xy: jnp.ndarray,
           valid: jnp.ndarray,
           image_hw: tuple[int, int],
           stride: int = 16,
           sigma: float | None = None,
           disease: jnp.ndarray | None = None) -> Targets:
  """Encodes ground-truth points as target maps at output stride S (docs/method.md#targets).

  Cell (r, c) has its centre at ((c + 0.5) S, (r + 0.5) S) input px. For a present point k at (x, y):
  `heatmap = exp(-((xc - x)^2 + (yc - y)^2) / (2 sigma^2)) / max(...)`, `offset_x = (x - xc) / S`,
  `offset_y = (y - yc) / S`. Exact for points anywhere (between cells, at centres, near or beyond the borders).

  Args:
    points_xy: `[..., 11, 2]` float (x, y) input px. Values of absent points are ignored (may be 0 or NaN).
    valid: `[..., 11]` bool, True where the point is present.
    image_hw: (H, W) input px, static ints, multiples of `stride`; the maps are `[H / S, W / S]`.
    stride: S, input px per cell (16 with MSC, 32 without, 4 for SimpleBaseline).
    sigma: Gaussian sigma px; None means one cell (= stride), as the reference.
    disease: optional `[..., 11]` int binary disease label (1 / 0, -1 unknown; any value > 0 counts as 1);
      None means all unknown.
  Returns:
    `Targets` with maps `[..., H / S, W / S, 11]`.
  """
  height, width = (int(v) for v in image_hw)
  stride = int(stride)
  if stride <= 0 or height % stride or width % stride or height <= 0 or width <= 0:
    raise ValueError(f"image_hw {tuple(image_hw)} must be positive multiples of stride {stride}")
  sigma = float(stride if sigma is None else sigma)
  if sigma <= 0:
    raise ValueError(f"sigma must be positive, got {sigma}")
  points_xy = jnp.asarray(points_xy, dtype=jnp.float32)
  valid = jnp.asarray(valid).astype(bool)
  if points_xy.ndim < 2 or points_xy.shape[-1] != 2 or valid.shape != points_xy.shape[:-1]:
    raise ValueError(f"points_xy must be [..., K, 2] and valid [..., K]; got {points_xy.shape} and {valid.shape}")
  if points_xy.shape[-2] != objects.NUM_OBJECTS:
    raise ValueError(f"expected {objects.NUM_OBJECTS} objects in points_xy [..., K, 2], got {points_xy.shape}")
  if disease is not None:
    disease = jnp.asarray(disease)
    if disease.shape != valid.shape:
      raise ValueError(f"disease must have the shape of valid {valid.shape}, got {disease.shape}")
  return _encode(points_xy, valid, disease, height // stride, width // stride, stride, sigma)


@functools.partial(jax.jit, static_argnames=("h", "w", "stride", "sigma"))
def _encode(points_xy: jnp.ndarray, valid: jnp.ndarray, disease: jnp.ndarray | None, h: int, w: int, stride: int,
            sigma: float) -> Targets:
  """`encode` after argument checks, compiled once per shape (nested inside a caller's jit it is simply inlined)."""
  points_xy = jnp.where(valid[..., None], points_xy, 0.0)  # absent points: no NaN/inf can leak into maps or grads
  gauss_x, offset_x = _axis_gaussian(points_xy[..., 0], w, stride, sigma)  # [..., w, K]
  gauss_y, offset_y = _axis_gaussian(points_xy[..., 1], h, stride, sigma)  # [..., h, K]
  heatmap = gauss_y[..., :, None, :] * gauss_x[..., None, :, :]  # [..., h, w, K]
  # The peak is already exactly 1; dividing by the maximum also keeps it so in any floating-point edge case.
  heatmap = heatmap / jnp.max(heatmap, axis=(-3, -2), keepdims=True)
  present = valid[..., None, None, :]
  zeros = jnp.zeros(heatmap.shape, jnp.float32)
  heatmap = jnp.where(present, heatmap, 0.0)
  offset_x = jnp.where(present, offset_x[..., None, :, :] + zeros, 0.0)
  offset_y = jnp.where(present, offset_y[..., :, None, :] + zeros, 0.0)
  if disease is None:
    label = jnp.full(valid.shape, objects.UNKNOWN, jnp.float32)
  else:
    label = jnp.where(valid & (disease >= 0), (disease > 0).astype(jnp.float32), float(objects.UNKNOWN))
  logits = label[..., None, None, :] + zeros
  return Targets(
      maps=Maps(heatmap=heatmap, offset_y=offset_y, offset_x=offset_x, logits=logits),
      offset_mask=heatmap_mask(heatmap, valid, REFERENCE_MASK_THRESHOLD),
      point_valid=valid,
      peak_cell=decode.argmax_cell(heatmap),
  )
