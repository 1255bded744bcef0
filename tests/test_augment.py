"""Tests of the on-device augmentations (ccfnet_jax.data.augment)."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ccfnet_jax import coords
from ccfnet_jax.data import augment

S = 128
B = 4
OFF = augment.AugmentConfig.none()
_augment = jax.jit(augment.augment_batch, static_argnames="cfg")


def _blob_batch(seed: int = 0, spread: float = 8.0):
  """Images whose channel k holds a Gaussian blob (sigma 2 px) centred on point k (k = 0, 1, 2) near the centre."""
  rng = np.random.default_rng(seed)
  points = rng.uniform(S / 2 - spread, S / 2 + spread, (B, 11, 2)).astype(np.float32)
  centres = np.arange(S) + 0.5
  dx = centres[None, None, :] - points[:, :3, 0, None, None]  # [B, 3, 1, W]
  dy = centres[None, :, None] - points[:, :3, 1, None, None]  # [B, 3, H, 1]
  blobs = np.exp(-(dx**2 + dy**2) / (2 * 2.0**2))  # [B, 3, H, W]
  return {
      "image": jnp.asarray(blobs.transpose(0, 2, 3, 1), jnp.float32),
      "points_xy": jnp.asarray(points),
      "point_valid": jnp.ones((B, 11), bool),
      "disease": jnp.asarray(rng.integers(0, 2, (B, 11)), jnp.int32),
      "pixel_spacing_mm": jnp.full((B, 2), 0.5, jnp.float32),
      "native_hw": jnp.full((B, 2), 2 * S, jnp.int32),
      "example_valid": jnp.ones((B,), bool),
  }


def _centroids(image: np.ndarray) -> np.ndarray:
  """Intensity-weighted centroid `[B, C, 2]` (x, y) in continuous px (pixel j's centre at j + 0.5)."""
  image = np.asarray(image, np.float64)
  centres = np.arange(S) + 0.5
  mass = image.sum(axis=(1, 2))
  x = (image * centres[None, None, :, None]).sum(axis=(1, 2)) / mass
  y = (image * centres[None, :, None, None]).sum(axis=(1, 2)) / mass
  return np.stack([x, y], axis=-1)


def _argmax_xy(image: np.ndarray) -> np.ndarray:
  """Centre `[B, C, 2]` (x, y) of the brightest pixel of each channel."""
  b, h, w, c = image.shape
  flat = np.asarray(image).transpose(0, 3, 1, 2).reshape(b, c, h * w).argmax(-1)
  return np.stack([flat % w + 0.5, flat // w + 0.5], axis=-1)


GEOMETRIC = {
    "rotate": dataclasses.replace(OFF, rotate_prob=1.0),
    "shift": dataclasses.replace(OFF, shift_prob=1.0),
    "zoom": dataclasses.replace(OFF, zoom_prob=1.0),
    "flip": dataclasses.replace(OFF, flip_prob=1.0),
    "composed": dataclasses.replace(OFF, rotate_prob=1.0, shift_prob=1.0, zoom_prob=1.0, flip_prob=0.5),
}


@pytest.mark.parametrize("name", sorted(GEOMETRIC))
def test_points_stay_on_the_anatomy(name):
  batch = _blob_batch()
  out = _augment(jax.random.key(1), batch, cfg=GEOMETRIC[name])
  moved = np.asarray(out["points_xy"][:, :3])
  assert not np.allclose(moved, np.asarray(batch["points_xy"][:, :3]), atol=0.5), "nothing moved"
  assert np.asarray(out["point_valid"]).all()
  np.testing.assert_allclose(_centroids(out["image"]), moved, atol=0.3)
  np.testing.assert_allclose(_argmax_xy(out["image"]), moved, atol=1.0)


def test_none_is_identity():
  batch = _blob_batch()
  out = _augment(jax.random.key(0), batch, cfg=OFF)
  for key in batch:
    np.testing.assert_array_equal(np.asarray(out[key]), np.asarray(batch[key]), err_msg=key)


def test_flip_maps_x_to_w_minus_x():
  batch = _blob_batch()
  out = _augment(jax.random.key(0), batch, cfg=GEOMETRIC["flip"])
  points = np.asarray(batch["points_xy"])
  np.testing.assert_allclose(np.asarray(out["points_xy"][..., 0]), S - points[..., 0], atol=1e-4)
  np.testing.assert_allclose(np.asarray(out["points_xy"][..., 1]), points[..., 1], atol=1e-4)
  np.testing.assert_allclose(np.asarray(out["points_xy"]), coords.flip_points_x(points, S), atol=1e-4)
  np.testing.assert_allclose(np.asarray(out["image"]), np.asarray(batch["image"])[:, :, ::-1], atol=1e-5)


def test_affine_matrix_hand_values():
  c = S / 2
  rotate = augment.affine_matrix((S, S), angle_deg=90.0)
  # Clockwise on screen (y down): a point right of the centre goes below it.
  np.testing.assert_allclose(augment.transform_points(rotate, jnp.array([c + 10.0, c])), [c, c + 10.0], atol=1e-4)
  zoom = augment.affine_matrix((S, S), zoom_y_frac=0.25, zoom_x_frac=-0.2)  # crop 1.25 H x 0.8 W resized back
  np.testing.assert_allclose(augment.transform_points(zoom, jnp.array([c + 10.0, c + 10.0])),
                             [c + 10.0 / 0.8, c + 10.0 / 1.25], atol=1e-4)
  shift = augment.affine_matrix((S, 2 * S), shift_y_frac=0.1, shift_x_frac=-0.25)
  np.testing.assert_allclose(augment.transform_points(shift, jnp.array([3.0, 4.0])), [3.0 - 0.5 * S, 4.0 + 0.1 * S],
                             atol=1e-4)
  flip = augment.affine_matrix((S, 2 * S), flip=True)
  np.testing.assert_allclose(augment.transform_points(flip, jnp.array([3.0, 4.0])), [2 * S - 3.0, 4.0], atol=1e-4)


def test_points_that_leave_become_invalid_and_unknown():
  batch = _blob_batch(spread=60.0)
  cfg = dataclasses.replace(OFF, shift_prob=1.0, shift_x_frac=(0.5, 0.5), shift_y_frac=(0.0, 0.0))
  out = _augment(jax.random.key(0), batch, cfg=cfg)
  x = np.asarray(batch["points_xy"][..., 0])
  stays = x + S / 2 < S
  assert stays.any() and (~stays).any()
  np.testing.assert_array_equal(np.asarray(out["point_valid"]), stays)
  np.testing.assert_array_equal(np.asarray(out["disease"]), np.where(stays, np.asarray(batch["disease"]), -1))
  np.testing.assert_allclose(np.asarray(out["points_xy"][..., 0]), x + S / 2, atol=1e-4)


def test_deterministic_given_key_and_vmappable():
  batch = _blob_batch()
  cfg = augment.AugmentConfig(noise_prob=1.0)
  a = _augment(jax.random.key(3), batch, cfg=cfg)
  b = _augment(jax.random.key(3), batch, cfg=cfg)
  c = _augment(jax.random.key(4), batch, cfg=cfg)
  for key in ("image", "points_xy", "point_valid", "disease"):
    np.testing.assert_array_equal(np.asarray(a[key]), np.asarray(b[key]), err_msg=key)
  assert not np.allclose(np.asarray(a["image"]), np.asarray(c["image"]))
  # Each image of the batch gets its own draw.
  assert not np.allclose(np.asarray(a["points_xy"][0] - batch["points_xy"][0]),
                         np.asarray(a["points_xy"][1] - batch["points_xy"][1]))
  # An outer vmap over (key, batch) pairs gives the same as separate calls.
  keys = jnp.stack([jax.random.key(3), jax.random.key(4)])
  stacked = jax.tree.map(lambda x: jnp.stack([x, x]), batch)
  both = jax.jit(jax.vmap(lambda k, bt: augment.augment_batch(k, bt, cfg)))(keys, stacked)
  for key in ("image", "points_xy", "point_valid", "disease"):
    np.testing.assert_allclose(np.asarray(both[key][0]), np.asarray(a[key]), atol=1e-5, err_msg=key)
    np.testing.assert_allclose(np.asarray(both[key][1]), np.asarray(c[key]), atol=1e-5, err_msg=key)


def test_photometric_clips_to_unit_range():
  batch = _blob_batch()
  ones = {**batch, "image": jnp.ones_like(batch["image"])}
  brighter = dataclasses.replace(OFF, intensity_prob=1.0, intensity_frac=(0.3, 0.3))
  np.testing.assert_array_equal(np.asarray(_augment(jax.random.key(0), ones, cfg=brighter)["image"]), 1.0)
  darker = dataclasses.replace(OFF, intensity_prob=1.0, intensity_frac=(-0.3, -0.3))
  np.testing.assert_allclose(np.asarray(_augment(jax.random.key(0), batch, cfg=darker)["image"]),
                             0.7 * np.asarray(batch["image"]), atol=1e-6)
  bias = dataclasses.replace(OFF, bias_prob=1.0, bias_coef=(0.5, 0.5))  # exp(0.5 * 10 monomials) >> 1 in places
  out = np.asarray(_augment(jax.random.key(0), ones, cfg=bias)["image"])
  assert out.min() >= 0.0 and out.max() <= 1.0 and out.min() < 0.5
  noise = dataclasses.replace(OFF, noise_prob=1.0, noise_mean_255=(-5.0, -5.0), noise_std_255=(0.0, 0.0))
  out = np.asarray(_augment(jax.random.key(0), batch, cfg=noise)["image"])
  np.testing.assert_allclose(out, np.clip(np.asarray(batch["image"]) - 5 / 255, 0, 1), atol=1e-6)


def test_bias_field_hand_values():
  coefs = jnp.zeros((4, 4)).at[1, 0].set(0.5).at[0, 3].set(-0.25).at[2, 2].set(9.0)  # (2, 2) has degree 4: ignored
  field = np.asarray(augment.bias_field(coefs, (5, 3)))
  y, x = np.meshgrid(np.linspace(-1, 1, 5), np.linspace(-1, 1, 3), indexing="ij")
  np.testing.assert_allclose(field, np.exp(0.5 * y - 0.25 * x**3), rtol=1e-5)


def test_point_jitter_is_bounded_in_mm():
  batch = _blob_batch()
  cfg = dataclasses.replace(OFF, point_jitter=True)
  out = _augment(jax.random.key(0), batch, cfg=cfg)
  delta = np.abs(np.asarray(out["points_xy"] - batch["points_xy"]))
  input_px_mm = 0.5 * 2 * S / S  # native spacing 0.5 mm, native size 2 S stretched to S
  assert delta.max() <= 1.5 / input_px_mm + 1e-5 and delta.max() > 0.5 / input_px_mm
  np.testing.assert_array_equal(np.asarray(out["image"]), np.asarray(batch["image"]))
  missing = {k: v for k, v in batch.items() if k != "native_hw"}
  with pytest.raises(KeyError, match="native_hw"):
    _augment(jax.random.key(0), missing, cfg=cfg)


def test_config_validation():
  with pytest.raises(ValueError, match="rotate_prob"):
    augment.AugmentConfig(rotate_prob=1.5)
  with pytest.raises(ValueError, match="shift_x_frac"):
    augment.AugmentConfig(shift_x_frac=(0.3, -0.3))
  with pytest.raises(ValueError, match="zoom_y_frac"):
    augment.AugmentConfig(zoom_y_frac=(-1.0, 0.2))
