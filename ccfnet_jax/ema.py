"""An exponential moving average of the weights (evaluated and saved beside the trained weights).

Pure jnp on pytrees: no Flax, no I/O; jit-able. After each optimizer step t (0-based, the step just taken),
`average = d_t * average + (1 - d_t) * weights`, started from the initial weights. With `warmup`, the decay is
`d_t = min(decay, (1 + t) / (10 + t))`, so the first steps, far from any useful average, are soon forgotten
(the initial weights keep a share of prod(d_t) instead of decay**t); docs/recipe.md#weight-averaging.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp


def decay_at(step: jax.Array | int, decay: float, warmup: bool = True) -> jax.Array:
  """The decay used after optimizer step `step` (0-based): `decay`, or `min(decay, (1 + t) / (10 + t))`."""
  if not 0.0 <= decay < 1.0:
    raise ValueError(f"the EMA decay must be in [0, 1), got {decay}")
  t = jnp.asarray(step, jnp.float32)
  if not warmup:
    return jnp.full_like(t, decay)
  return jnp.minimum(jnp.float32(decay), (1.0 + t) / (10.0 + t))


def update(average: Any, weights: Any, decay: jax.Array | float) -> Any:
  """`decay * average + (1 - decay) * weights`, leaf by leaf (the two pytrees have one structure)."""
  decay = jnp.asarray(decay, jnp.float32)
  return jax.tree.map(lambda a, w: (decay * a + (1.0 - decay) * w).astype(a.dtype), average, weights)
