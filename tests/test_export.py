"""`ccfnet_jax.inference.artifact`: the exported artifact (symbolic batch) reloads and equals the live model with flip TTA and
decode, for two batch sizes, and runs in a process that has no model code."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import tiny_training
from ccfnet_jax import decode, objects
from ccfnet_jax.inference import artifact as export
from ccfnet_jax.maps import Maps

IMAGE_SIZE = 64


@pytest.fixture(scope="module")
def model():
  net = tiny_training.TinyNet(rngs=nnx.Rngs(3))
  # Non-trivial running statistics, so that eval mode (running stats) differs from train mode (batch stats).
  for i, norm in enumerate(net.norms):
    norm.mean[...] = 0.05 * (i + 1) * jnp.ones_like(norm.mean[...])
    norm.var[...] = (1.0 + 0.5 * i) * jnp.ones_like(norm.var[...])
  net.eval()
  return net


def _images(batch: int, seed: int) -> np.ndarray:
  return np.random.default_rng(seed).uniform(0, 1, (batch, IMAGE_SIZE, IMAGE_SIZE, 3)).astype(np.float32)


def _live(net, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """The model as docs/method.md#decode writes it, directly: two passes, flip-merged maps, decode (input px)."""
  net.eval()
  maps = net(jnp.asarray(images))
  maps_of_flipped = net(jnp.asarray(images[:, :, ::-1, :]))
  decoded = decode.decode(decode.merge_flip(Maps(*maps), Maps(*maps_of_flipped)), net.stride)
  return np.asarray(decoded.xy), np.asarray(decoded.prob)


@pytest.fixture(scope="module")
def artifact(model, tmp_path_factory):
  path = tmp_path_factory.mktemp("export") / "model.jaxexport"
  export.export_model(model, IMAGE_SIZE, path, extra={"note": "test"})
  return path


def test_reloaded_equals_live_model_for_two_batch_sizes(model, artifact):
  reloaded = export.load_exported(artifact)
  for batch, seed in ((1, 0), (3, 1)):
    images = _images(batch, seed)
    xy, prob = reloaded(images)
    live_xy, live_prob = _live(model, images)
    assert xy.shape == (batch, objects.NUM_OBJECTS, 2) and prob.shape == (batch, objects.NUM_OBJECTS)
    np.testing.assert_allclose(np.asarray(xy), live_xy, atol=1e-3, rtol=0)
    np.testing.assert_allclose(np.asarray(prob), live_prob, atol=1e-5, rtol=0)


def test_batch_size_is_symbolic_and_sidecar_describes_the_artifact(artifact):
  reloaded = export.load_exported(artifact)
  batch_dim = reloaded.exported.in_avals[0].shape[0]
  assert not isinstance(batch_dim, int)  # a symbolic dimension
  info = json.loads(open(export.sidecar_path(artifact), encoding="utf-8").read())
  assert info["image_size"] == IMAGE_SIZE and info["stride"] == 16 and info["flip_tta"] is True
  assert info["object_names"] == list(objects.NAMES) and info["format_version"] == export.FORMAT_VERSION
  assert info["note"] == "test"


def test_wrong_image_size_is_refused(artifact):
  reloaded = export.load_exported(artifact)
  with pytest.raises(ValueError, match=f"images must be \\[B, {IMAGE_SIZE}, {IMAGE_SIZE}, 3\\]"):
    reloaded(np.zeros((2, IMAGE_SIZE + 1, IMAGE_SIZE, 3), np.float32))


def test_missing_sidecar_is_refused(artifact, tmp_path):
  lonely = tmp_path / "copy.jaxexport"
  lonely.write_bytes(artifact.read_bytes())
  with pytest.raises(ValueError, match="cannot read the sidecar"):
    export.load_exported(lonely)


def test_runs_without_model_code(model, artifact, tmp_path):
  """A fresh interpreter with only jax and numpy (no ccfnet_jax import) runs the artifact: same numbers."""
  images = _images(2, 5)
  np.save(tmp_path / "images.npy", images)
  script = (
      "import sys, jax, numpy as np\n"
      "exported = jax.export.deserialize(bytearray(open(sys.argv[1], 'rb').read()))\n"
      "xy, prob = exported.call(np.load(sys.argv[2]))\n"
      "np.save(sys.argv[3], np.asarray(xy)); np.save(sys.argv[4], np.asarray(prob))\n"
      "assert 'ccfnet_jax' not in sys.modules and 'flax' not in sys.modules\n")
  done = subprocess.run([sys.executable, "-c", script, str(artifact), str(tmp_path / "images.npy"),
                         str(tmp_path / "xy.npy"), str(tmp_path / "prob.npy")], cwd=tmp_path, capture_output=True,
                        text=True, timeout=120, env={**os.environ, "JAX_PLATFORMS": "cpu"})
  assert done.returncode == 0, done.stderr
  live_xy, live_prob = _live(model, images)
  np.testing.assert_allclose(np.load(tmp_path / "xy.npy"), live_xy, atol=1e-3, rtol=0)
  np.testing.assert_allclose(np.load(tmp_path / "prob.npy"), live_prob, atol=1e-5, rtol=0)
