"""The four output maps of CCF-Net as a plain pytree (no Flax import), and the one place of their channel order."""

from __future__ import annotations

from typing import NamedTuple

import jax.numpy as jnp

from ccfnet_jax import objects

MAP_NAMES: tuple[str, ...] = ("heatmap", "offset_y", "offset_x", "logits")
"""Order of the four groups in the model's 4 * 11 output channels (offset y before x, as the reference)."""

NUM_CHANNELS: int = len(MAP_NAMES) * objects.NUM_OBJECTS


class Maps(NamedTuple):
  """Four maps, each `[B, h, w, 11]` in object order (see `ccfnet_jax.objects.NAMES`)."""

  heatmap: jnp.ndarray
  offset_y: jnp.ndarray
  offset_x: jnp.ndarray
  logits: jnp.ndarray


def from_channels(x: jnp.ndarray) -> Maps:
  """Splits a `[..., 44]` output into Maps along the last axis."""
  if x.shape[-1] != NUM_CHANNELS:
    raise ValueError(f"expected {NUM_CHANNELS} channels in the last axis, got shape {x.shape}")
  n = objects.NUM_OBJECTS
  return Maps(*(x[..., i * n:(i + 1) * n] for i in range(len(MAP_NAMES))))


def to_channels(maps: Maps) -> jnp.ndarray:
  """Inverse of `from_channels`: concatenates the four maps into `[..., 44]`."""
  return jnp.concatenate(list(maps), axis=-1)
