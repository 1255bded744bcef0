"""Ships a trained model as a `jax.export` artifact: model (eval mode, weights inside) + TTA + decode.

Written by `python -m ccfnet_jax.export`: `model.jaxexport` (the serialized `jax.export.Exported`) and
`model.jaxexport.json` (a small sidecar: format version, image size, output stride, object names, the
`forward.EvalOptions` (flip and shift TTA, decoder), platforms, checkpoint). The artifact needs neither this
package nor Flax to run, only `jax` (of a version that reads the serialization):

    exported = jax.export.deserialize(open("model.jaxexport", "rb").read())
    xy, prob = exported.call(images)   # images float32 [B, S, S, 3] in [0, 1], any B

Inputs: `images` float32 `[B, S, S, 3]` in [0, 1] with S the training `image_size`: three adjacent sagittal slices
(z-1, z, z+1), each min-max scaled, stretched to S x S (as `ccfnet_jax.data.pipeline.resize_image` does).
Outputs: `xy` float32 `[B, 11, 2]` (x, y) in INPUT pixels (map back to the native slice with x * W / S, y * H / S),
`prob` float32 `[B, 11]` disease probabilities; object order `ccfnet_jax.objects.NAMES` (also in the sidecar).
The batch size is symbolic (`jax.export.symbolic_shape("b, S, S, 3")`), so one artifact serves every batch size.
The computation is `forward.predict`, the one used by training's evaluations and by predict, with native size =
input size.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ccfnet_jax import __version__, forward, objects, rundir

FORMAT = "ccfnet_jax.export"
FORMAT_VERSION = 1
SIDECAR_SUFFIX = ".json"


def inference_fn(model: nnx.Module, image_size: int, options: forward.EvalOptions = forward.EvalOptions()
                 ) -> Callable[[jax.Array], tuple[jax.Array, jax.Array]]:
  """`f(images [B, S, S, 3]) -> (xy [B, 11, 2] input px, prob [B, 11])` with the model's weights closed over (host
  copies, so they become constants of the exported computation)."""
  model.eval()
  graphdef, params, batch_stats = nnx.split(model, nnx.Param, nnx.BatchStat)
  params, batch_stats = jax.device_get((params, batch_stats))

  def f(images: jax.Array) -> tuple[jax.Array, jax.Array]:
    native_hw = jnp.broadcast_to(jnp.asarray([image_size, image_size], jnp.int32), (images.shape[0], 2))
    pred = forward.predict_from_state(graphdef, params, batch_stats, images, native_hw, options)
    return pred.xy, pred.prob

  return f


def sidecar_path(path: str | os.PathLike) -> str:
  return os.fspath(path) + SIDECAR_SUFFIX


def export_model(model: nnx.Module, image_size: int, path: str | os.PathLike, *,
                 options: forward.EvalOptions = forward.EvalOptions(), platforms: Sequence[str] | None = None, extra: dict[str, Any] | None = None) -> jax.export.Exported:
  """Exports model + test-time augmentation + decode with a symbolic batch size; writes `path` and `path.json`.

  Args:
    model: an NNX model with `.stride` (put in eval mode here).
    image_size: the square input size S the model was trained at.
    path: the artifact file to write.
    options: test-time augmentation and decoder, as the run evaluated (`LoadedModel.eval_options`).
    platforms: e.g. ('cpu', 'cuda', 'tpu'); default: the current backend only.
    extra: more fields for the sidecar (e.g. the checkpoint).
  Returns:
    The `jax.export.Exported`.
  """
  images = jax.ShapeDtypeStruct(jax.export.symbolic_shape(f"b, {image_size}, {image_size}, 3"), jnp.float32)
  exported = jax.export.export(jax.jit(inference_fn(model, image_size, options)),
                               platforms=tuple(platforms) if platforms else None)(images)
  path = os.fspath(path)
  rundir.write_bytes(path, bytes(exported.serialize()))
  sidecar = {
      "format": FORMAT, "format_version": FORMAT_VERSION, "ccfnet_jax_version": __version__,
      "jax_version": jax.__version__, "image_size": int(image_size), "stride": int(model.stride),
      "object_names": list(objects.NAMES), **dataclasses.asdict(options), "platforms": list(exported.platforms),
      "inputs": {"images": f"float32 [B, {image_size}, {image_size}, 3] in [0, 1]"},
      "outputs": {"xy": "float32 [B, 11, 2] (x, y) input px", "prob": "float32 [B, 11] disease probability"},
      **dict(extra or {}),
  }
  rundir.write_json(sidecar_path(path), sidecar, indent=1)
  return exported


class ExportedModel:
  """A reloaded artifact: `__call__(images [B, S, S, 3]) -> (xy [B, 11, 2] input px, prob [B, 11])`."""

  def __init__(self, exported: jax.export.Exported, info: dict[str, Any], path: str):
    self.exported = exported
    self.info = info
    self.path = path
    self.image_size = int(info["image_size"])

  def __call__(self, images: Any) -> tuple[jax.Array, jax.Array]:
    shape = tuple(np.shape(images))
    expected = (self.image_size, self.image_size, 3)
    if len(shape) != 4 or shape[1:] != expected:
      raise ValueError(f"{self.path}: images must be [B, {self.image_size}, {self.image_size}, 3], got {shape}")
    return self.exported.call(jnp.asarray(images, jnp.float32))


def load_exported(path: str | os.PathLike) -> ExportedModel:
  """Reads an artifact written by `export_model` (and its sidecar). Needs no model code.

  Raises:
    ValueError: the sidecar is missing, of another format or version, or disagrees with the artifact.
  """
  path = os.fspath(path)
  try:
    with open(sidecar_path(path), encoding="utf-8") as f:
      info = json.load(f)
  except (OSError, json.JSONDecodeError) as e:
    raise ValueError(f"cannot read the sidecar {sidecar_path(path)} of {path}: {e}") from e
  if info.get("format") != FORMAT or info.get("format_version") != FORMAT_VERSION:
    raise ValueError(f"{sidecar_path(path)}: format {info.get('format')!r} version {info.get('format_version')!r}, "
                     f"expected {FORMAT!r} version {FORMAT_VERSION}")
  with open(path, "rb") as f:
    exported = jax.export.deserialize(bytearray(f.read()))
  size = int(info["image_size"])
  if tuple(exported.in_avals[0].shape[1:]) != (size, size, 3):
    raise ValueError(f"{path}: the artifact takes {exported.in_avals[0].shape}, the sidecar says image_size {size}")
  return ExportedModel(exported, info, path)
