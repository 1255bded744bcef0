"""How a training run initialises its model: the reference's N(0, 0.001), torchvision's scale, or ImageNet weights."""

from __future__ import annotations

import jax
import numpy as np
import pytest
from flax import nnx

from ccfnet_jax import config as config_lib
from ccfnet_jax import convert
from ccfnet_jax.train import setup
from configs import default


def _config(**model):
  config = default.get_config()
  config.model.update(model)
  return config


def _conv_stds(module: nnx.Module) -> dict[str, tuple[float, float]]:
  """path -> (kernel std, kaiming fan-out std) of every conv inside `module`."""
  out = {}
  for path, m in nnx.iter_graph(module):
    if isinstance(m, nnx.Conv):
      shape = m.kernel.shape
      out["/".join(map(str, path))] = (float(np.std(m.kernel[...])), float(np.sqrt(2 / (np.prod(shape[:2]) * shape[3]))))
  return out


def test_kaiming_redraws_the_backbone_only():
  reference = setup.create_model(_config(backbone_init="reference"), jax.random.key(0))
  kaiming = setup.create_model(_config(backbone_init="kaiming"), jax.random.key(0))
  backbone = _conv_stds(kaiming.backbone)
  assert len(backbone) == 15  # stem + 3 stages x 2 blocks x 2 convs + the 2 projection shortcuts (no layer4)
  for path, (std, expected) in backbone.items():
    assert std == pytest.approx(expected, rel=0.15), path
  for path, (std, _) in _conv_stds(reference.backbone).items():
    assert std == pytest.approx(1e-3, rel=0.15), path
  # Everything after the backbone keeps the reference's init, bit for bit.
  for a, b in zip(jax.tree.leaves(nnx.state(reference.head)), jax.tree.leaves(nnx.state(kaiming.head))):
    np.testing.assert_array_equal(a, b)
  np.testing.assert_array_equal(reference.projection.kernel[...], kaiming.projection.kernel[...])


def test_unknown_backbone_init_is_refused():
  with pytest.raises(config_lib.ConfigError, match="backbone_init.*'xavier'"):
    config_lib.validate(_config(backbone_init="xavier"))


def _torchvision_file(tmp_path, source: nnx.Module, **replace) -> str:
  """A torchvision-layout ImageNet ResNet file made from `source`'s backbone (plus the classifier torchvision has)."""
  state = {k: v for k, v in convert.to_torch_state_dict(source).items() if convert.BACKBONE_KEY.match(k)}
  state.update({"fc.weight": np.zeros((1000, 512), np.float32), "fc.bias": np.zeros((1000,), np.float32)}, **replace)
  path = tmp_path / "resnet18_imagenet.npz"
  np.savez(path, **state)
  return str(path)


def test_pretrained_backbone_is_loaded(tmp_path):
  donor = setup.create_model(_config(backbone_init="kaiming"), jax.random.key(7))
  path = _torchvision_file(tmp_path, donor)
  model = setup.initial_model(_config(pretrained=path), jax.random.key(0))
  fresh = setup.create_model(_config(), jax.random.key(0))
  for a, b in zip(jax.tree.leaves(nnx.state(model.backbone)), jax.tree.leaves(nnx.state(donor.backbone))):
    np.testing.assert_array_equal(a, b)
  for a, b in zip(jax.tree.leaves(nnx.state(model.head)), jax.tree.leaves(nnx.state(fresh.head))):
    np.testing.assert_array_equal(a, b)


def test_pretrained_file_that_does_not_fit_is_named(tmp_path):
  donor = setup.create_model(_config(), jax.random.key(7))
  path = _torchvision_file(tmp_path, donor, **{"conv1.weight": np.zeros((64, 1, 7, 7), np.float32)})
  with pytest.raises(convert.StateDictError, match=r"(?s)resnet18_imagenet\.npz.*conv1\.weight"):
    setup.initial_model(_config(pretrained=path), jax.random.key(0))
