"""Models: CCF-Net and a small registry so that baselines can be created by name.

Every registered model is an NNX module with an attribute `stride` whose `__call__(x [B, H, W, 3]) -> Maps`.
"""

from __future__ import annotations

from typing import Any, Callable

import jax.numpy as jnp
from flax import nnx

from ccfnet_jax.models.ccfnet import CCFNet
from ccfnet_jax.models.hrnet import HRNet, create_hrnet
from ccfnet_jax.models.resnet import ResNet
from ccfnet_jax.models.scn import SCN
from ccfnet_jax.models.simplebaseline import SimpleBaseline

MODELS: dict[str, Callable[..., nnx.Module]] = {
    "ccfnet": CCFNet,
    "simplebaseline": SimpleBaseline,  # depth 18 / 34 / 50, msc True / False; stride 4
    "scn": SCN,  # depth 18 / 34 / 50, msc True / False; stride 4
    "hrnet": create_hrnet,  # depth = the width W (32 for HRNet-W32), msc False; stride 4
}
"""name -> constructor `(depth=..., msc=..., *, rngs, dtype, ...)`; baselines register here."""


def create_model(name: str = "ccfnet", *, depth: int = 18, msc: bool = True, rngs: nnx.Rngs,
                 dtype: Any = jnp.float32, **kwargs: Any) -> nnx.Module:
  """Builds the model registered under `name` (one of `MODELS`) with the given backbone depth and MSC switch."""
  if name not in MODELS:
    raise ValueError(f"unknown model {name!r}; known: {sorted(MODELS)}")
  return MODELS[name](depth=depth, msc=msc, rngs=rngs, dtype=dtype, **kwargs)


__all__ = ["CCFNet", "HRNet", "MODELS", "ResNet", "SCN", "SimpleBaseline", "create_model"]
