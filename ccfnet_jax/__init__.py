"""ccfnet-jax: CCF-Net (ISBI 2022) lumbar spine localisation and disease classification in JAX/Flax NNX."""

__version__ = "0.1.0"
