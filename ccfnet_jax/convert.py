"""PyTorch state dicts <-> NNX models: the reference CCFNet.pytorch layout and torchvision ImageNet ResNets.

Layouts: PyTorch convs are OIHW, Flax convs HWIO (axis permutation (2, 3, 1, 0));
BatchNorm `weight/bias/running_mean/running_var` are Flax `scale/bias/mean/var`; `num_batches_tracked` has no Flax
counterpart (optional on load, written as int64 0). Our module names map to the reference names through ONE table
(`NAME_TABLES`) used in both directions.

Loading is strict: every key of the dict must be used or explicitly ignored (with a reason, in the returned
`LoadReport`), every variable the source must provide must be provided, and every shape must match; otherwise a
`StateDictError` names the offending keys. Nothing is assigned unless the whole dict checks out.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import re
from typing import Any, Literal, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ccfnet_jax.models.ccfnet import CCFNet
from ccfnet_jax.models.resnet import ResNet

logger = logging.getLogger(__name__)

Source = Literal["auto", "reference", "torchvision"]

# (our module path prefix, PyTorch key prefix); first match wins; "" matches everything.
NAME_TABLES: dict[type, tuple[tuple[str, str], ...]] = {
    CCFNet: (
        ("backbone", ""),  # conv1, bn1, layer1..layer4 as in torchvision
        ("projection", "layer_conv1x1"),
        ("head.multi_dilation.dilate1", "stage1_headnet.feat.0.dilate1"),  # 3x3, dilation 1
        ("head.multi_dilation.dilate3", "stage1_headnet.feat.0.dilate2"),  # 3x3, dilation 3 (name = index)
        ("head.multi_dilation.dilate5", "stage1_headnet.feat.0.dilate3"),  # 3x3, dilation 5 (name = index)
        ("head.multi_dilation.pointwise", "stage1_headnet.feat.0.conv1x1"),
        ("head.multi_stride.conv", "stage1_headnet.feat.1.conv"),
        ("head.fusion", "stage1_headnet.feat.2"),
        ("head.out", "stage1_headnet.out"),
        ("out", "final_layer"),  # plain variant (reference class CCFNetResNet)
    ),
    ResNet: (("", ""),),
}
"""Per model class: how our module paths map to PyTorch key prefixes (the one place of this mapping)."""

LEAF_NAMES: dict[str, str] = {
    "kernel": "weight", "scale": "weight", "bias": "bias", "mean": "running_mean", "var": "running_var"}
"""Flax variable name -> PyTorch tensor name."""

OIHW_FROM_HWIO = (3, 2, 0, 1)
HWIO_FROM_OIHW = (2, 3, 1, 0)

BN_COUNTER = "num_batches_tracked"
BACKBONE_KEY = re.compile(r"^(conv1|bn1|layer[1-4])\.")
"""Keys a torchvision ImageNet ResNet shares with our backbones (what the reference copies from it)."""
STAGE_KEY = re.compile(r"^(layer[1-4])\.")
REFERENCE_HEAD_KEY = re.compile(r"^(layer_conv1x1|stage1_headnet|final_layer)\.")


class StateDictError(ValueError):
  """A state dict does not fit the model: missing keys, unexpected keys or wrong shapes (all named)."""


@dataclasses.dataclass(frozen=True)
class LoadReport:
  """What `load_torch_state_dict` did."""

  source: str
  """'reference' or 'torchvision'."""
  loaded: tuple[str, ...]
  """PyTorch keys assigned to model variables."""
  ignored: dict[str, str]
  """PyTorch keys present but not used -> why."""
  kept: tuple[str, ...]
  """PyTorch names of model variables the source does not provide (left as they were; torchvision: the head)."""


def _module_path(path: tuple[Any, ...]) -> str:
  return ".".join(str(p) for p in path)


def _table(model: nnx.Module) -> tuple[tuple[str, str], ...]:
  for cls, table in NAME_TABLES.items():
    if isinstance(model, cls):
      return table
  raise TypeError(f"no PyTorch name table for {type(model).__name__}; add one to NAME_TABLES")


def torch_key(model: nnx.Module, path: tuple[Any, ...]) -> str:
  """PyTorch key of the model variable at `path` (e.g. ('head', 'fusion', 'bn1', 'mean')
  -> 'stage1_headnet.feat.2.bn1.running_mean')."""
  *module, leaf = path
  if leaf not in LEAF_NAMES:
    raise KeyError(f"model variable {_module_path(path)!r}: no PyTorch name for a variable called {leaf!r}")
  module_path = _module_path(tuple(module))
  for ours, theirs in _table(model):
    if ours == "" or module_path == ours or module_path.startswith(ours + "."):
      rest = module_path[len(ours):].lstrip(".")
      return ".".join(p for p in (theirs, rest, LEAF_NAMES[leaf]) if p)
  raise KeyError(f"model variable {_module_path(path)!r} matches no entry of the PyTorch name table")


def _variables(model: nnx.Module) -> dict[str, tuple[tuple[Any, ...], nnx.Variable]]:
  """PyTorch key -> (our path, the model's variable), for every Param and BatchStat of the model."""
  out = {}
  for path, var in nnx.to_flat_state(nnx.state(model, (nnx.Param, nnx.BatchStat))):
    key = torch_key(model, path)
    if key in out:
      raise KeyError(f"two model variables map to PyTorch key {key!r}: {out[key][0]} and {path}")
    out[key] = (path, var)
  return out


def _batch_norm_prefixes(variables: Mapping[str, tuple[tuple[Any, ...], nnx.Variable]]) -> list[str]:
  return [key[:-len("running_mean")] for key in variables if key.endswith(".running_mean")]


def torch_shape(path: tuple[Any, ...], shape: tuple[int, ...]) -> tuple[int, ...]:
  """PyTorch shape of the model variable at `path` with Flax shape `shape` (kernels HWIO -> OIHW)."""
  return tuple(shape[i] for i in OIHW_FROM_HWIO) if path[-1] == "kernel" else tuple(shape)


def _read_state_dict(state_dict: Mapping[str, Any] | str | os.PathLike) -> tuple[dict[str, np.ndarray], str]:
  """A mapping of arrays / tensors, a `.npz` file or (with torch installed) a `.pth` file -> {key: numpy array}."""
  if isinstance(state_dict, (str, os.PathLike)):
    path = os.fspath(state_dict)
    if path.endswith(".npz"):
      with np.load(path) as data:
        return {k: np.asarray(data[k]) for k in data.files}, path
    try:
      import torch  # pylint: disable=import-outside-toplevel  # optional dependency
    except ImportError as e:
      raise ImportError(f"reading {path} needs PyTorch (pip install torch); or pass a dict of numpy arrays") from e
    loaded = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(loaded, Mapping) and isinstance(loaded.get("state_dict"), Mapping):
      loaded = loaded["state_dict"]
    if not isinstance(loaded, Mapping):
      raise StateDictError(f"{path}: expected a state dict (mapping key -> tensor), got {type(loaded).__name__}")
    def to_numpy(v: Any) -> np.ndarray:
      if isinstance(v, torch.Tensor):
        v = v.detach().cpu()
        return (v.float() if v.dtype == torch.bfloat16 else v).numpy()
      return np.asarray(v)
    return {k: to_numpy(v) for k, v in loaded.items()}, path
  return {k: np.asarray(v) for k, v in state_dict.items()}, "state dict"


def _list(keys: list[str], limit: int = 20) -> str:
  shown = ", ".join(keys[:limit])
  return shown + (f", ... ({len(keys) - limit} more)" if len(keys) > limit else "")


def load_torch_state_dict(model: nnx.Module, state_dict: Mapping[str, Any] | str | os.PathLike, *,
                          source: Source = "auto") -> LoadReport:
  """Loads PyTorch weights into `model` in place and returns a `LoadReport`.

  Args:
    model: a `CCFNet` (or a bare `ResNet`).
    state_dict: key -> array (numpy arrays or torch tensors), or a path to a `.npz` / `.pth` file (`.pth` needs
      torch). A `module.` key prefix (DataParallel) is removed; `num_batches_tracked` is optional and ignored.
    source: 'reference' = a CCFNet.pytorch state dict: every model variable must be provided (for the plain variant,
      the reference class's unused `layer_conv1x1.*` / `stage1_headnet.*` keys are ignored); 'torchvision' = an
      ImageNet ResNet: every backbone variable (stem, layer1..3, plus layer4 when the model has it) must be provided,
      `fc.*` and stages the model lacks are ignored, the rest of the model is kept; 'auto' = 'reference' if any key
      belongs to the reference's head (`layer_conv1x1`, `stage1_headnet`, `final_layer`), else 'torchvision'.
  Raises:
    StateDictError: naming every missing key, unexpected key and shape mismatch (nothing is assigned then).
  """
  arrays, origin = _read_state_dict(state_dict)
  arrays = {k[len("module."):] if k.startswith("module.") else k: v for k, v in arrays.items()}
  if source == "auto":
    source = "reference" if any(REFERENCE_HEAD_KEY.match(k) for k in arrays) else "torchvision"
  if source not in ("reference", "torchvision"):
    raise ValueError(f"source must be 'auto', 'reference' or 'torchvision', got {source!r}")

  variables = _variables(model)
  if source == "reference":
    required = set(variables)
  else:
    required = {k for k in variables if BACKBONE_KEY.match(k)}
  is_plain_ccfnet = isinstance(model, CCFNet) and not model.msc
  model_stages = {m.group(1) for k in variables if (m := STAGE_KEY.match(k))}

  ignored: dict[str, str] = {}
  unexpected: list[str] = []
  wrong: list[str] = []
  for key, value in arrays.items():
    if key.endswith("." + BN_COUNTER) and key[:-len(BN_COUNTER)] + "running_mean" in variables:
      ignored[key] = "BatchNorm step counter (unused)"
    elif key in required:
      path, var = variables[key]
      expected = torch_shape(path, var.shape)
      if tuple(value.shape) != expected:
        wrong.append(f"{key}: shape {tuple(value.shape)} in the {origin}, the model needs {expected}"
                     + (" (OIHW)" if path[-1] == "kernel" else ""))
      elif not (np.issubdtype(value.dtype, np.floating) or value.dtype.name == "bfloat16"):
        wrong.append(f"{key}: dtype {value.dtype} in the {origin}, expected floating point")
    elif source == "torchvision" and key.startswith("fc."):
      ignored[key] = "torchvision classifier (not part of this model)"
    elif source == "torchvision" and (stage := STAGE_KEY.match(key)) and stage.group(1) not in model_stages:
      ignored[key] = f"{stage.group(1)} is not part of this model"
    elif source == "reference" and is_plain_ccfnet and re.match(r"^(layer_conv1x1|stage1_headnet)\.", key):
      ignored[key] = "built but unused by the reference's plain variant (CCFNetResNet)"
    else:
      unexpected.append(key)
  missing = sorted(required - set(arrays))
  problems = []
  if missing:
    problems.append(f"missing keys ({len(missing)}): {_list(missing)}")
  if unexpected:
    problems.append(f"unexpected keys ({len(unexpected)}): {_list(sorted(unexpected))}")
  if wrong:
    problems.append(f"wrong shapes/dtypes ({len(wrong)}): {_list(wrong)}")
  if problems:
    raise StateDictError(f"{origin} does not fit {type(model).__name__} (source={source!r}): " + "; ".join(problems))

  loaded = []
  for key in required:
    path, var = variables[key]
    value = arrays[key]
    if path[-1] == "kernel":
      value = np.transpose(value, HWIO_FROM_OIHW)
    value = jnp.asarray(value, dtype=var.dtype)
    if isinstance(var.get_value(), jax.Array):
      var[...] = value  # keeps the variable's sharding
    else:
      var.set_value(value)  # an abstract model from nnx.eval_shape: load without initialising first
    loaded.append(key)
  kept = tuple(sorted(set(variables) - required))
  report = LoadReport(source=source, loaded=tuple(sorted(loaded)), ignored=ignored, kept=kept)
  not_counters = sorted(k for k in ignored if not k.endswith(BN_COUNTER))
  logger.info("loaded %d tensors from %s (source %s); ignored %d keys%s; kept %d model variables",
              len(loaded), origin, source, len(ignored),
              f" (besides {BN_COUNTER}: {_list(not_counters, 8)})" if not_counters else "", len(kept))
  return report


def torch_shapes(model: nnx.Module) -> dict[str, tuple[int, ...]]:
  """PyTorch key -> shape of everything `to_torch_state_dict` writes (works on abstract models from eval_shape)."""
  variables = _variables(model)
  out = {key: torch_shape(path, var.shape) for key, (path, var) in variables.items()}
  out.update({prefix + BN_COUNTER: () for prefix in _batch_norm_prefixes(variables)})
  return out


def to_torch_state_dict(model: nnx.Module) -> dict[str, np.ndarray]:
  """The model's parameters and BatchNorm statistics as a PyTorch-layout dict of numpy arrays.

  Conv kernels OIHW float32, BN `weight/bias/running_mean/running_var` float32 and `num_batches_tracked` an int64
  scalar 0; key names as the reference's state dicts.
  """
  variables = _variables(model)
  out: dict[str, np.ndarray] = {}
  for key, (path, var) in variables.items():
    value = np.asarray(var[...], dtype=np.float32)
    out[key] = np.ascontiguousarray(np.transpose(value, OIHW_FROM_HWIO)) if path[-1] == "kernel" else value
  for prefix in _batch_norm_prefixes(variables):
    out[prefix + BN_COUNTER] = np.array(0, dtype=np.int64)
  return out
