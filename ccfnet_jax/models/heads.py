"""Output widths of the heatmap heads and their reading as `Maps`.

Every registered model returns the four `Maps`. A head is 44 channels wide (heatmap, offset y, offset x, disease
logits: `maps.from_channels`) or, for the baselines' paper-count variant, 22 (heatmap and disease logits only; the
offsets are zero, so decode places each point at its cell centre). The published parameter and MAC counts of the
SimpleBaseline, SCN and HRNet rows of Table 1 work out only with 22-channel heads (see `models/complexity.py`).
"""

from __future__ import annotations

import jax.numpy as jnp

from ccfnet_jax import maps as maps_lib
from ccfnet_jax import objects

HEATMAP_AND_LOGITS = 2 * objects.NUM_OBJECTS
"""Width of a head without offset channels: 11 heatmaps then 11 disease logits."""

OUT_CHANNELS: tuple[int, ...] = (maps_lib.NUM_CHANNELS, HEATMAP_AND_LOGITS)
"""The head widths a baseline can be built with: 44 (the default, all four maps) or 22."""


def check_out_channels(out_channels: int, what: str) -> int:
  """`out_channels` if it is one of `OUT_CHANNELS`, else ValueError naming `what`."""
  if out_channels not in OUT_CHANNELS:
    raise ValueError(f"{what}: out_channels must be one of {OUT_CHANNELS}, got {out_channels}")
  return out_channels


def to_maps(channels: jnp.ndarray) -> maps_lib.Maps:
  """`[..., 44]` -> Maps as `maps.from_channels`; `[..., 22]` (heatmaps, logits) -> Maps with zero offsets."""
  if channels.shape[-1] != HEATMAP_AND_LOGITS:
    return maps_lib.from_channels(channels)
  n = objects.NUM_OBJECTS
  zeros = jnp.zeros_like(channels[..., :n])
  return maps_lib.Maps(channels[..., :n], zeros, zeros, channels[..., n:])
