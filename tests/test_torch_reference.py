"""The PyTorch twin of the reference (benchmarks/torch_reference.py) computes what our model and train step compute,
and the side-by-side benchmark (benchmarks/compare_torch.py) runs. No timing is asserted.

Skipped where torch is missing, except under CI=true, where CI installs it (.ci/run) and its absence fails."""

from __future__ import annotations

import csv
import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from conftest import require

try:
  import torch
except ImportError:
  torch = None
require(torch is not None, "torch (pip install torch==2.13.0)")

from benchmarks import compare_torch, torch_reference  # noqa: E402
from ccfnet_jax import convert, maps  # noqa: E402
from ccfnet_jax.models import CCFNet, layers  # noqa: E402
from configs import r18_msc  # noqa: E402

SIZE = 128


def randomize(model: nnx.Module, seed: int = 0) -> nnx.Module:
  """Every variable at a scale where a wrong layout or formula shows: kaiming convs, non-zero biases, non-trivial
  BatchNorm statistics (the reference init would leave the maps near zero)."""
  layers.reinitialize_convs(model, jax.random.key(seed))
  rng = np.random.default_rng(seed)
  draws = {"bias": lambda s: rng.normal(0.0, 0.05, s), "scale": lambda s: rng.uniform(0.5, 1.5, s),
           "mean": lambda s: rng.normal(0.0, 0.1, s), "var": lambda s: rng.uniform(0.5, 1.5, s)}
  for path, var in nnx.to_flat_state(nnx.state(model, (nnx.Param, nnx.BatchStat))):
    if path[-1] in draws:
      var[...] = jnp.asarray(draws[path[-1]](var.shape), var.dtype)
  return model


def relative_errors(ours: maps.Maps, twin_nchw: torch.Tensor) -> dict[str, float]:
  twin = maps.from_channels(np.moveaxis(twin_nchw.detach().numpy(), 1, -1))
  return {name: float(np.max(np.abs(np.asarray(a) - b)) / np.max(np.abs(np.asarray(a))))
          for name, a, b in zip(maps.MAP_NAMES, ours, twin)}


def test_twin_state_dict_has_the_reference_keys_and_shapes(shared_dir):
  for depth in (18, 50):
    with open(shared_dir / "reference" / f"ccfnet_pytorch_state_dict_r{depth}_msc.tsv", encoding="utf-8") as f:
      expected = [(r["key"], tuple(json.loads(r["shape"])), r["dtype"]) for r in csv.DictReader(f, delimiter="\t")]
    twin = torch_reference.CCFNet(depth, msc=True)
    assert [(k, tuple(v.shape), str(v.dtype).removeprefix("torch.")) for k, v in twin.state_dict().items()] == expected


@pytest.mark.parametrize("depth,msc", [(18, True), (50, True), (18, False)])
def test_twin_maps_equal_ours_with_our_weights(depth, msc):
  model = randomize(CCFNet(depth, msc, rngs=nnx.Rngs(depth)), seed=depth)
  model.eval()
  image = np.random.default_rng(1).uniform(0.0, 1.0, (2, SIZE, SIZE, 3)).astype(np.float32)
  ours = nnx.jit(lambda m, x: m(x))(model, jnp.asarray(image))
  state_dict = convert.to_torch_state_dict(model)
  x = torch.from_numpy(np.ascontiguousarray(np.moveaxis(image, -1, 1)))
  for repeat in (True, False):
    twin = torch_reference.CCFNet(depth, msc, repeat_convs=repeat)
    torch_reference.load_numpy_state_dict(twin, state_dict)  # strict: every key used, every shape equal
    with torch.no_grad():
      out = twin.eval()(x)
    errors = relative_errors(ours, out)
    assert max(errors.values()) < 1e-4, (depth, msc, repeat, errors)


def test_twin_loss_matches_ours_and_the_benchmark_prints_both(capsys):
  config = r18_msc.get_config()
  model = randomize(CCFNet(18, True, rngs=nnx.Rngs(0)))
  pair = compare_torch.build_pair(config, batch_size=2, image_size=SIZE, num_devices=1, model=model)
  # First step: the loss of the initial weights (train-mode BatchNorm) before the update; each part on its own.
  ours = jax.device_get(pair.jax_step())
  step = pair.torch_step
  step.optimizer.zero_grad()
  total, parts = torch_reference.reference_loss(step.model(step.image), step.targets)
  for name, value in parts.items():
    assert float(value.detach()) == pytest.approx(float(ours[name]), rel=1e-4), name
  assert float(total.detach()) == pytest.approx(float(ours["loss"]), rel=1e-4)
  total.backward()
  step.optimizer.step()
  # Second step: after one AdamW update on each side, the same loss again.
  second_ours, second_twin = float(pair.jax_step()["loss"]), float(step())
  assert second_twin == pytest.approx(second_ours, rel=1e-3)
  assert abs(second_ours - float(ours["loss"])) > 1e-3 * abs(second_ours)  # the update changed something

  lines = compare_torch.compare(pair, rounds=1, steps=1, warmup=1)
  printed = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
  assert printed == lines
  by_metric = {line["metric"]: line for line in lines}
  assert set(by_metric) == {"first_step_loss", "jax_train_images_per_s", "torch_train_images_per_s",
                            "jax_over_torch"}
  assert by_metric["first_step_loss"]["relative_difference"] < 1e-3
  ratio = by_metric["jax_over_torch"]
  assert ratio["value"] == pytest.approx(ratio["jax_images_per_s"] / ratio["torch_images_per_s"])
  for name in ("jax", "torch"):
    line = by_metric[f"{name}_train_images_per_s"]
    assert line["n"] == 1 and math.isfinite(line["value"]) and line["value"] > 0
    assert line["value"] == pytest.approx(2 / line["median_s"]) and line["value"] == ratio[f"{name}_images_per_s"]
    assert line["cpu_images_per_s"] == pytest.approx(2 / line["cpu_median_s"]) and line["cpu_median_s"] > 0
  assert ratio["cpu_ratio"] == pytest.approx(by_metric["jax_train_images_per_s"]["cpu_images_per_s"]
                                             / by_metric["torch_train_images_per_s"]["cpu_images_per_s"])
  assert ratio["model"] == "R18-MSC" and ratio["batch"] == 2 and ratio["torch_convs"] == "repeated"


def test_the_twin_is_ccfnet_only():
  config = r18_msc.get_config()
  config.model.name = "simplebaseline"
  with pytest.raises(ValueError, match="CCF-Net only"):
    compare_torch.build_pair(config, batch_size=2, image_size=SIZE)
