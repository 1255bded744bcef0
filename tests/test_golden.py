"""Golden vectors of the reference PyTorch CCF-Net (../shared/reference/golden_r*_msc): load, run, decode, compare.

The reference-loss part of the golden files is checked in the losses' tests.
"""

from __future__ import annotations

import numpy as np
import pytest
from flax import nnx

from ccfnet_jax import convert
from ccfnet_jax.decode import decode
from ccfnet_jax.maps import MAP_NAMES
from ccfnet_jax.models import CCFNet

MAX_RELATIVE_ERROR = 1e-4  # float32 noise between two correct implementations is ~5e-6 (reference README)


@pytest.mark.parametrize("depth", [18, 50])
def test_golden_maps_and_decode(shared_dir, depth):
  golden = shared_dir / "reference" / f"golden_r{depth}_msc"
  io = dict(np.load(golden / "io.npz"))
  model = nnx.eval_shape(lambda: CCFNet(depth, msc=True, rngs=nnx.Rngs(0)))
  report = convert.load_torch_state_dict(model, golden / "state_dict.npz")
  assert report.source == "reference" and report.kept == ()
  assert all(k.endswith("num_batches_tracked") for k in report.ignored)
  model.eval()
  out = nnx.jit(lambda m, x: m(x))(model, io["case0_x_nhwc"])
  for name in MAP_NAMES:
    got, want = np.asarray(getattr(out, name)), io[f"case0_{name}"]
    assert got.shape == want.shape == (2, 16, 16, 11)
    error = np.abs(got - want).max() / np.abs(want).max()
    assert error < MAX_RELATIVE_ERROR, f"{name}: max|diff| / max|ref| = {error:.2e}"
  decoded = decode(out, stride=model.stride)
  np.testing.assert_array_equal(np.asarray(decoded.cell), io["case0_dec_rc"])
  np.testing.assert_allclose(np.asarray(decoded.xy), io["case0_dec_xy"], rtol=0, atol=0.01)
  np.testing.assert_allclose(np.asarray(decoded.prob), io["case0_dec_prob"], rtol=0, atol=1e-5)
