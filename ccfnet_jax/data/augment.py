"""Training augmentations (docs/method.md#data) as pure JAX functions, run on device inside the jitted train step.

One affine matrix per image (rotation, shift, zoom, horizontal flip composed) is applied to the image with a single
bilinear resampling (zeros outside) and to the points with the same matrix; points that leave the image become
invalid and their disease label becomes -1. Then intensity scaling, a cubic bias field and (off by default) Gaussian
noise, and a clip to [0, 1]. Everything is vmapped over the batch and deterministic given the key. No Flax, no I/O.

Coordinate convention (docs/method.md#coordinates, facts in `ccfnet_jax.coords`): continuous (x, y) in input pixels,
pixel column j covers [j, j + 1) so its centre is at j + 0.5; a horizontal flip maps x to W - x
(`coords.flip_points_x`; here the flip is one factor of the composed matrix, and a test pins the two to agree).

Matrices are 3x3 homogeneous, acting on column vectors (x, y, 1), and map an input position to its output position.
Rotation: a positive angle turns the picture clockwise on screen (the y axis points down).

Data-level augmentation not done here: slice jitter (+-1 slice) needs the neighbouring slices of the
series; our records hold one 3-slice stack per study, so it is not available (it would belong in the reader).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from ccfnet_jax import coords

Batch = dict[str, Any]
Range = tuple[float, float]


@dataclasses.dataclass(frozen=True)
class AugmentConfig:
  """Probabilities and ranges of the training augmentations; defaults are the reference values
  (docs/method.md#data).

  Each `*_prob` is the probability that the transform is applied to one image; ranges are (low, high) of a uniform
  draw. Zoom: a centred crop of size `H * (1 + u_y)` x `W * (1 + u_x)` resized back to H x W (an anisotropic scale
  by 1 / (1 + u) about the centre). Shift fractions are of the image height (y) and width (x).
  Noise is given on the 0..255 scale and is off by default (the reference trains without it).
  Point jitter moves each valid point by U(point_jitter_mm) millimetres per axis before the affine warp (label
  noise; the image is not moved). It is on by default because the reference values include it without an exception;
  it needs the batch keys `pixel_spacing_mm` and `native_hw` to convert mm to input pixels.
  """

  rotate_prob: float = 0.8
  rotate_deg: Range = (-45.0, 45.0)
  shift_prob: float = 0.8
  shift_y_frac: Range = (-0.2, 0.2)
  shift_x_frac: Range = (-0.3, 0.3)
  zoom_prob: float = 0.8
  zoom_y_frac: Range = (-0.2, 0.2)
  zoom_x_frac: Range = (-0.3, 0.3)
  flip_prob: float = 0.5
  intensity_prob: float = 0.8
  intensity_frac: Range = (-0.3, 0.3)
  bias_prob: float = 0.8
  bias_coef: Range = (-0.5, 0.5)
  bias_degree: int = 3
  noise_prob: float = 0.0
  noise_mean_255: Range = (-5.0, 5.0)
  noise_std_255: Range = (0.0, 2.0)
  point_jitter: bool = True
  point_jitter_mm: Range = (-1.5, 1.5)

  def __post_init__(self):
    for field in dataclasses.fields(self):
      value = getattr(self, field.name)
      if field.name.endswith("_prob") and not 0.0 <= value <= 1.0:
        raise ValueError(f"AugmentConfig.{field.name} must be a probability in [0, 1], got {value}")
      if isinstance(value, tuple):
        if len(value) != 2 or value[0] > value[1]:
          raise ValueError(f"AugmentConfig.{field.name} must be a (low, high) pair with low <= high, got {value}")
    for name in ("zoom_y_frac", "zoom_x_frac"):
      if getattr(self, name)[0] <= -1.0:
        raise ValueError(f"AugmentConfig.{name} low must be > -1 (crop size H * (1 + u) > 0), "
                         f"got {getattr(self, name)}")
    if self.noise_std_255[0] < 0:
      raise ValueError(f"AugmentConfig.noise_std_255 must be >= 0, got {self.noise_std_255}")
    if self.bias_degree < 0:
      raise ValueError(f"AugmentConfig.bias_degree must be >= 0, got {self.bias_degree}")

  @classmethod
  def reference(cls) -> AugmentConfig:
    """The reference training augmentation (docs/method.md#data): the defaults."""
    return cls()

  @classmethod
  def none(cls) -> AugmentConfig:
    """Every augmentation disabled: `augment_batch` returns the batch unchanged."""
    return cls(rotate_prob=0.0, shift_prob=0.0, zoom_prob=0.0, flip_prob=0.0, intensity_prob=0.0, bias_prob=0.0,
               noise_prob=0.0, point_jitter=False)

  @property
  def affine(self) -> bool:
    """Whether any transform warps the image (rotation, shift, zoom, flip)."""
    return max(self.rotate_prob, self.shift_prob, self.zoom_prob, self.flip_prob) > 0.0

  @property
  def geometric(self) -> bool:
    """Whether any transform moves the points."""
    return self.affine or self.point_jitter

  @property
  def photometric(self) -> bool:
    """Whether any transform changes the intensities."""
    return max(self.intensity_prob, self.bias_prob, self.noise_prob) > 0.0


# ---------------------------------------------------------------------------------------------------------------
# Geometry.
# ---------------------------------------------------------------------------------------------------------------


def pixel_centres(n: int) -> jnp.ndarray:
  """Continuous coordinates `[n]` of the centres of pixels 0..n-1 (pixel j covers [j, j + 1))."""
  return coords.cell_center_px(jnp.arange(n, dtype=jnp.float32), 1)


def _translation(tx, ty) -> jnp.ndarray:
  one, zero = jnp.ones_like(tx), jnp.zeros_like(tx)
  return jnp.stack([jnp.stack([one, zero, tx]), jnp.stack([zero, one, ty]), jnp.stack([zero, zero, one])])


def affine_matrix(image_hw: tuple[int, int], angle_deg=0.0, shift_y_frac=0.0, shift_x_frac=0.0, zoom_y_frac=0.0,
                  zoom_x_frac=0.0, flip=False) -> jnp.ndarray:
  """The composed forward matrix `[3, 3]` (input px -> output px) of one image.

  Order: rotate about the centre by `angle_deg`, zoom about the centre by (1 / (1 + zoom_y_frac), 1 /
  (1 + zoom_x_frac)) (the centred crop resized back), shift by (shift_x_frac * W, shift_y_frac * H), then
  flip horizontally (x -> W - x) when `flip`. Scalars may be traced (jnp) values.
  """
  h, w = image_hw
  f32 = lambda v: jnp.asarray(v, jnp.float32)
  theta = jnp.deg2rad(f32(angle_deg))
  cos, sin = jnp.cos(theta), jnp.sin(theta)
  sx, sy = 1.0 / (1.0 + f32(zoom_x_frac)), 1.0 / (1.0 + f32(zoom_y_frac))
  zero, one = jnp.zeros_like(cos), jnp.ones_like(cos)
  # Linear part: zoom after rotation.
  linear = jnp.stack([jnp.stack([sx * cos, -sx * sin, zero]), jnp.stack([sy * sin, sy * cos, zero]),
                      jnp.stack([zero, zero, one])])
  cx, cy = f32(w / 2.0), f32(h / 2.0)
  centred = _translation(cx + f32(shift_x_frac) * w, cy + f32(shift_y_frac) * h) @ linear @ _translation(-cx, -cy)
  flip_matrix = jnp.where(jnp.asarray(flip), jnp.array([[-1.0, 0.0, w], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]]),
                          jnp.eye(3))
  return flip_matrix @ centred


def transform_points(matrix: jnp.ndarray, points_xy: jnp.ndarray) -> jnp.ndarray:
  """Applies a `[3, 3]` matrix to points `[..., 2]` (x, y) px."""
  return points_xy @ matrix[:2, :2].T + matrix[:2, 2]


def points_inside(points_xy: jnp.ndarray, image_hw: tuple[int, int]) -> jnp.ndarray:
  """Bool `[...]`: the point lies in the image, 0 <= x < W and 0 <= y < H (continuous px)."""
  h, w = image_hw
  x, y = points_xy[..., 0], points_xy[..., 1]
  return (x >= 0) & (x < w) & (y >= 0) & (y < h)


def warp_image(image: jnp.ndarray, matrix: jnp.ndarray) -> jnp.ndarray:
  """Resamples `image [H, W, C]` so that input position p lands at `matrix @ p`; bilinear, zeros outside.

  Each output pixel centre is mapped back through the inverse matrix and read by bilinear interpolation between the
  four nearest input pixel centres (one resampling for the whole composed transform).
  """
  h, w, c = image.shape
  inverse = jnp.linalg.inv(matrix)
  ys, xs = jnp.meshgrid(pixel_centres(h), pixel_centres(w), indexing="ij")
  source = transform_points(inverse, jnp.stack([xs, ys], axis=-1))  # [H, W, 2] continuous (x, y)
  # Array index of a continuous coordinate: the centre of pixel j (j + 0.5) is index j.
  u, v = source[..., 0] - 0.5, source[..., 1] - 0.5
  u0, v0 = jnp.floor(u), jnp.floor(v)
  wu, wv = u - u0, v - v0
  u0, v0 = u0.astype(jnp.int32), v0.astype(jnp.int32)
  flat = image.reshape(h * w, c)
  out = jnp.zeros((h, w, c), jnp.float32)
  for dv, dv_weight in ((0, 1.0 - wv), (1, wv)):
    for du, du_weight in ((0, 1.0 - wu), (1, wu)):
      row, col = v0 + dv, u0 + du
      inside = (row >= 0) & (row < h) & (col >= 0) & (col < w)
      index = jnp.clip(row, 0, h - 1) * w + jnp.clip(col, 0, w - 1)
      weight = jnp.where(inside, dv_weight * du_weight, 0.0)
      out = out + weight[..., None] * jnp.take(flat, index, axis=0).astype(jnp.float32)
  return out


# ---------------------------------------------------------------------------------------------------------------
# Intensity.
# ---------------------------------------------------------------------------------------------------------------


def bias_field(coefs: jnp.ndarray, image_hw: tuple[int, int]) -> jnp.ndarray:
  """`exp(sum_{i+j<=D} c_ij y^i x^j)` `[H, W]` with x, y running over [-1, 1] across the image.

  `coefs` is `[D + 1, D + 1]` indexed (i, j) = (power of y, power of x); entries with i + j > D are ignored.
  """
  h, w = image_hw
  degree = coefs.shape[0] - 1
  powers = jnp.arange(degree + 1)
  mask = (powers[:, None] + powers[None, :]) <= degree
  y = jnp.linspace(-1.0, 1.0, h)
  x = jnp.linspace(-1.0, 1.0, w)
  y_pow = y[None, :] ** powers[:, None]  # [D + 1, H]
  x_pow = x[None, :] ** powers[:, None]  # [D + 1, W]
  return jnp.exp(y_pow.T @ jnp.where(mask, coefs, 0.0) @ x_pow)


# ---------------------------------------------------------------------------------------------------------------
# One example, then the batch.
# ---------------------------------------------------------------------------------------------------------------


def _maybe(key, prob: float, value, identity):
  """`value` with probability `prob`, else `identity` (one Bernoulli draw)."""
  return jnp.where(jax.random.bernoulli(key, prob), value, identity)


def _uniform(key, value_range: Range, shape=()):
  return jax.random.uniform(key, shape, jnp.float32, value_range[0], value_range[1])


def sample_matrix(key: jax.Array, image_hw: tuple[int, int], cfg: AugmentConfig) -> jnp.ndarray:
  """Draws one image's affine matrix `[3, 3]` (identity for every transform not drawn)."""
  keys = [jax.random.fold_in(key, i) for i in range(8)]
  angle = _maybe(keys[0], cfg.rotate_prob, _uniform(keys[1], cfg.rotate_deg), 0.0)
  shift_on = jax.random.bernoulli(keys[2], cfg.shift_prob)
  shift = jnp.where(shift_on, jnp.stack([_uniform(jax.random.fold_in(keys[3], 0), cfg.shift_y_frac),
                                         _uniform(jax.random.fold_in(keys[3], 1), cfg.shift_x_frac)]), 0.0)
  zoom_on = jax.random.bernoulli(keys[4], cfg.zoom_prob)
  zoom = jnp.where(zoom_on, jnp.stack([_uniform(jax.random.fold_in(keys[5], 0), cfg.zoom_y_frac),
                                       _uniform(jax.random.fold_in(keys[5], 1), cfg.zoom_x_frac)]), 0.0)
  flip = jax.random.bernoulli(keys[6], cfg.flip_prob)
  return affine_matrix(image_hw, angle, shift[0], shift[1], zoom[0], zoom[1], flip)


def _augment_example(key, image, points_xy, point_valid, disease, input_spacing_mm, cfg: AugmentConfig):
  """One example: image [H, W, C], points_xy [N, 2], point_valid [N], disease [N], input_spacing_mm [2] (x, y)."""
  h, w = image.shape[:2]
  k_geom, k_jitter, k_int, k_bias, k_noise = (jax.random.fold_in(key, i) for i in range(5))
  out_image = image.astype(jnp.float32)
  if cfg.geometric:
    if cfg.point_jitter:
      jitter_mm = _uniform(k_jitter, cfg.point_jitter_mm, points_xy.shape)
      points_xy = jnp.where(point_valid[:, None], points_xy + jitter_mm / input_spacing_mm, points_xy)
    if cfg.affine:
      matrix = sample_matrix(k_geom, (h, w), cfg)
      out_image = warp_image(out_image, matrix)
      points_xy = transform_points(matrix, points_xy)
    point_valid = point_valid & points_inside(points_xy, (h, w))
    disease = jnp.where(point_valid, disease, jnp.asarray(-1, disease.dtype))
  if cfg.photometric:
    if cfg.intensity_prob > 0:
      k_on, k_val = jax.random.split(k_int)
      out_image = out_image * _maybe(k_on, cfg.intensity_prob, 1.0 + _uniform(k_val, cfg.intensity_frac), 1.0)
    if cfg.bias_prob > 0:
      k_on, k_val = jax.random.split(k_bias)
      d = cfg.bias_degree + 1
      coefs = _maybe(k_on, cfg.bias_prob, _uniform(k_val, cfg.bias_coef, (d, d)), 0.0)
      out_image = out_image * bias_field(coefs, (h, w))[..., None]
    if cfg.noise_prob > 0:
      k_on, k_mean, k_std, k_val = jax.random.split(k_noise, 4)
      on = jax.random.bernoulli(k_on, cfg.noise_prob)
      mean = _uniform(k_mean, cfg.noise_mean_255) / 255.0
      std = _uniform(k_std, cfg.noise_std_255) / 255.0
      out_image = out_image + jnp.where(on, mean + std * jax.random.normal(k_val, out_image.shape), 0.0)
    out_image = jnp.clip(out_image, 0.0, 1.0)
  return out_image.astype(image.dtype), points_xy, point_valid, disease


def input_spacing_mm(batch: Batch) -> jnp.ndarray:
  """Size `[B, 2]` (x, y) in mm of one input pixel: native spacing * native size / input size.

  Needs `pixel_spacing_mm [B, 2]` (row, col) and `native_hw [B, 2]` (H, W) in the batch.
  """
  for key in ("pixel_spacing_mm", "native_hw"):
    if key not in batch:
      raise KeyError(f"augment: point jitter needs batch[{key!r}] (disable it with AugmentConfig(point_jitter=False))")
  h, w = batch["image"].shape[1:3]
  spacing = jnp.asarray(batch["pixel_spacing_mm"], jnp.float32)
  native_hw = jnp.asarray(batch["native_hw"], jnp.float32)
  return jnp.stack([spacing[:, 1] * native_hw[:, 1] / w, spacing[:, 0] * native_hw[:, 0] / h], axis=-1)


def augment_batch(key: jax.Array, batch: Batch, cfg: AugmentConfig) -> Batch:
  """Augments a batch on device; deterministic given `key`; jit-able with `cfg` static.

  Args:
    key: a PRNG key; each image gets `fold_in`/`split` keys of its own.
    batch: `image [B, H, W, C]` float in [0, 1], `points_xy [B, N, 2]` (x, y) input px, `point_valid [B, N]` bool,
      `disease [B, N]` int (1, 0, -1 unknown); with point jitter also `pixel_spacing_mm [B, 2]`, `native_hw [B, 2]`.
      Other keys pass through unchanged (`points_xy_native` keeps the unaugmented native points).
    cfg: the augmentation settings.

  Returns:
    The batch with `image`, `points_xy`, `point_valid` and `disease` replaced: points that left the image are
    invalid with disease -1 (their moved coordinates are kept).
  """
  for name in ("image", "points_xy", "point_valid", "disease"):
    if name not in batch:
      raise KeyError(f"augment_batch: the batch has no {name!r} key (keys: {sorted(batch)})")
  image = batch["image"]
  if image.ndim != 4:
    raise ValueError(f"augment_batch: batch['image'] must be [B, H, W, C], got shape {image.shape}")
  b = image.shape[0]
  if cfg.geometric and cfg.point_jitter:
    spacing = input_spacing_mm(batch)
  else:
    spacing = jnp.ones((b, 2), jnp.float32)
  keys = jax.random.split(key, b)
  fn = lambda k, im, p, v, d, s: _augment_example(k, im, p, v, d, s, cfg)
  out_image, points_xy, point_valid, disease = jax.vmap(fn)(
      keys, image, jnp.asarray(batch["points_xy"], jnp.float32), jnp.asarray(batch["point_valid"], bool),
      jnp.asarray(batch["disease"]), spacing)
  return {**batch, "image": out_image, "points_xy": points_xy, "point_valid": point_valid, "disease": disease}
