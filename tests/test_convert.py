"""PyTorch state dict <-> NNX conversion: layouts, round trip, strictness, torchvision backbones."""

from __future__ import annotations

import functools
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from ccfnet_jax import convert
from ccfnet_jax.models import CCFNet

REFERENCE = pathlib.Path(__file__).resolve().parents[2] / "shared" / "reference"
forward = nnx.jit(lambda model, x: model(x))


def _abstract(depth: int = 18, msc: bool = True) -> CCFNet:
  return nnx.eval_shape(lambda: CCFNet(depth, msc, rngs=nnx.Rngs(0)))


def _read_tsv(name: str) -> dict[str, tuple[tuple[int, ...], str]]:
  """key -> (shape, dtype) from a reference TSV (dtype '' when the file has no dtype column)."""
  out = {}
  for row in (REFERENCE / name).read_text().splitlines()[1:]:
    key, shape, *dtype = row.split("\t")
    out[key] = (tuple(int(s) for s in shape.strip("[]").split(",") if s.strip()), dtype[0] if dtype else "")
  return out


def _random_dict(layout: dict[str, tuple[tuple[int, ...], str]], seed: int = 0) -> dict[str, np.ndarray]:
  """Random float32 values of the given shapes (positive where variances), int64 0 counters."""
  rng = np.random.default_rng(seed)
  out = {}
  for key, (shape, _) in layout.items():
    if key.endswith("num_batches_tracked"):
      out[key] = np.array(7, np.int64)
    elif key.endswith("running_var"):
      out[key] = rng.uniform(0.5, 1.5, shape).astype(np.float32)
    else:
      out[key] = rng.normal(0, 0.1, shape).astype(np.float32)
  return out


def _layout(model: nnx.Module) -> dict[str, tuple[tuple[int, ...], str]]:
  return {k: (shape, "") for k, shape in convert.torch_shapes(model).items()}


def _values(model: nnx.Module) -> dict[str, np.ndarray]:
  return {convert.torch_key(model, p): np.asarray(v[...])
          for p, v in nnx.to_flat_state(nnx.state(model, (nnx.Param, nnx.BatchStat)))}


needs_reference = pytest.mark.usefixtures("shared_dir")  # skipped locally without ../shared, a failure in CI


@needs_reference
@pytest.mark.parametrize("depth", [18, 50])
def test_export_layout_equals_reference_tsv(depth):
  expected = _read_tsv(f"ccfnet_pytorch_state_dict_r{depth}_msc.tsv")
  model = _abstract(depth)
  convert.load_torch_state_dict(model, _random_dict(expected))
  exported = convert.to_torch_state_dict(model)
  assert {k: (v.shape, v.dtype.name) for k, v in exported.items()} == expected
  assert convert.torch_shapes(model) == {k: shape for k, (shape, _) in expected.items()}


@needs_reference
def test_load_reference_dict_assigns_every_variable_with_oihw_to_hwio():
  layout = _read_tsv("ccfnet_pytorch_state_dict_r18_msc.tsv")
  sd = _random_dict(layout)
  model = _abstract()
  report = convert.load_torch_state_dict(model, sd)
  assert report.source == "reference" and report.kept == ()
  assert set(report.ignored) == {k for k in layout if k.endswith("num_batches_tracked")}
  assert set(report.loaded) == set(layout) - set(report.ignored)
  # Independent index check of the permutation, on square convs (where (2, 3, 0, 1) would fit the shape too).
  for key, module in (("layer1.0.conv1.weight", model.backbone.layer1[0].conv1),
                      ("stage1_headnet.feat.0.dilate2.weight", model.head.multi_dilation.dilate3),
                      ("conv1.weight", model.backbone.conv1)):
    w, k = sd[key], np.asarray(module.kernel[...])
    o, i, h, x = 5 % w.shape[0], 2, 0, 1
    assert k[h, x, i, o] == w[o, i, h, x]
    np.testing.assert_array_equal(k, w.transpose(2, 3, 1, 0))
  np.testing.assert_array_equal(model.head.fusion.downsample[1].var[...],
                                sd["stage1_headnet.feat.2.downsample.1.running_var"])
  np.testing.assert_array_equal(model.head.multi_stride.conv.bias[...], sd["stage1_headnet.feat.1.conv.bias"])


@pytest.mark.parametrize("msc", [True, False])
def test_round_trip_is_exact(msc):
  source = _abstract(18, msc)
  convert.load_torch_state_dict(source, _random_dict(_layout(_abstract(18, msc)), seed=1), source="reference")
  exported = convert.to_torch_state_dict(source)
  assert all(v.dtype == (np.int64 if k.endswith("num_batches_tracked") else np.float32) for k, v in exported.items())
  target = CCFNet(18, msc, rngs=nnx.Rngs(42)) if msc else _abstract(18, msc)
  convert.load_torch_state_dict(target, exported)
  want, got = _values(source), _values(target)
  assert want.keys() == got.keys()
  for key in want:
    np.testing.assert_array_equal(got[key], want[key], err_msg=key)
  if msc:
    source.eval()
    target.eval()
    x = jax.random.uniform(jax.random.key(0), (1, 128, 128, 3))
    for a, b in zip(forward(source, x), forward(target, x)):
      np.testing.assert_array_equal(a, b)


@functools.cache
def _exported_r18_cached() -> dict[str, np.ndarray]:
  model = _abstract()
  convert.load_torch_state_dict(model, _random_dict(_layout(_abstract())), source="reference")
  return convert.to_torch_state_dict(model)


def _exported_r18() -> dict[str, np.ndarray]:
  """A full R18-MSC reference-layout dict (a fresh copy for each caller to edit)."""
  return dict(_exported_r18_cached())


def test_missing_key_is_named_and_nothing_is_assigned():
  sd = _exported_r18()
  del sd["stage1_headnet.feat.1.conv.bias"]
  del sd["layer2.0.downsample.1.running_var"]
  model = CCFNet(18, True, rngs=nnx.Rngs(0))
  before = _values(model)
  with pytest.raises(convert.StateDictError, match=r"missing keys \(2\).*layer2\.0\.downsample\.1\.running_var, "
                                                   r"stage1_headnet\.feat\.1\.conv\.bias"):
    convert.load_torch_state_dict(model, sd)
  after = _values(model)
  for key in before:
    np.testing.assert_array_equal(after[key], before[key])


def test_unexpected_key_is_named():
  sd = _exported_r18()
  sd["stage1_headnet.feat.3.conv.weight"] = np.zeros((1, 1, 1, 1), np.float32)
  with pytest.raises(convert.StateDictError, match=r"unexpected keys \(1\): stage1_headnet\.feat\.3\.conv\.weight"):
    convert.load_torch_state_dict(_abstract(), sd)


def test_wrong_shape_is_named():
  sd = _exported_r18()
  sd["layer_conv1x1.weight"] = sd["layer_conv1x1.weight"][:128]
  sd["layer1.0.conv1.weight"] = sd["layer1.0.conv1.weight"].transpose(2, 3, 1, 0)  # HWIO given: (3, 3, 64, 64)
  with pytest.raises(convert.StateDictError) as info:
    convert.load_torch_state_dict(_abstract(), sd)
  message = str(info.value)
  assert "layer_conv1x1.weight: shape (128, 256, 1, 1)" in message and "needs (256, 256, 1, 1)" in message
  assert "layer1.0.conv1.weight: shape (3, 3, 64, 64)" in message


def test_module_prefix_and_missing_counters_are_accepted(tmp_path):
  sd = {"module." + k: v for k, v in _exported_r18().items() if not k.endswith("num_batches_tracked")}
  path = tmp_path / "weights.npz"
  np.savez(path, **sd)
  model = _abstract()
  report = convert.load_torch_state_dict(model, path)
  assert report.ignored == {} and len(report.loaded) == len(sd)
  np.testing.assert_array_equal(model.head.out.bias[...], sd["module.stage1_headnet.out.bias"])


@needs_reference
@pytest.mark.parametrize("depth", [18, 50])
def test_torchvision_backbone_into_msc_model(depth):
  layout = _read_tsv(f"ccfnet_pytorch_torchvision_resnet{depth}_backbone_keys.tsv")
  c4 = 512 if depth == 18 else 2048
  sd = _random_dict(layout, seed=2)
  sd.update({"fc.weight": np.zeros((1000, c4), np.float32), "fc.bias": np.zeros(1000, np.float32),
             "layer4.0.conv1.weight": np.zeros((512, c4 // 2, 3, 3) if depth == 18 else (512, 1024, 1, 1)),
             "layer4.0.bn1.num_batches_tracked": np.array(0)})
  model = _abstract(depth)
  report = convert.load_torch_state_dict(model, sd)
  expected_loaded = {k for k in layout if not k.endswith("num_batches_tracked")}
  assert report.source == "torchvision"
  assert set(report.loaded) == expected_loaded
  assert len(expected_loaded) == {18: 75, 50: 215}[depth]  # reference README
  assert {"fc.weight", "fc.bias", "layer4.0.conv1.weight", "layer4.0.bn1.num_batches_tracked"} <= set(report.ignored)
  assert set(report.ignored) == set(sd) - expected_loaded
  assert all(k.startswith(("layer_conv1x1.", "stage1_headnet.")) for k in report.kept) and report.kept
  np.testing.assert_array_equal(model.backbone.layer3[-1].bn2.var[...], sd["layer3.%d.bn2.running_var" % (
      len(model.backbone.layer3) - 1)])
  # The head was not touched: still the abstract value eval_shape gave it (a load would have put an array).
  assert all(isinstance(v, jax.ShapeDtypeStruct) for v in jax.tree.leaves(nnx.state(model.head)))
  assert all(isinstance(v, jax.Array) for v in jax.tree.leaves(nnx.state(model.backbone)))


def test_torchvision_backbone_into_plain_model_needs_layer4():
  plain = _abstract(18, False)
  full = {k: v for k, v in _random_dict(_layout(plain)).items() if not k.startswith("final_layer.")}
  full.update({"fc.weight": np.zeros((1000, 512), np.float32), "fc.bias": np.zeros(1000, np.float32)})
  report = convert.load_torch_state_dict(plain, full)
  assert report.source == "torchvision"
  assert any(k.startswith("layer4.") for k in report.loaded) and report.kept == ("final_layer.bias",
                                                                                 "final_layer.weight")
  without_layer4 = {k: v for k, v in full.items() if not k.startswith("layer4.")}
  with pytest.raises(convert.StateDictError, match=r"missing keys .*layer4\.0\.bn1\.bias"):
    convert.load_torch_state_dict(_abstract(18, False), without_layer4)


def test_plain_reference_dict_ignores_unused_msc_modules():
  plain = _abstract(18, False)
  sd = _random_dict(_layout(plain))
  # The reference's plain class inherits the MSC model's (unused) projection and head.
  sd.update({"layer_conv1x1.weight": np.zeros((256, 256, 1, 1), np.float32),
             "stage1_headnet.out.bias": np.zeros(44, np.float32)})
  report = convert.load_torch_state_dict(plain, sd)
  assert report.source == "reference" and report.kept == ()
  assert {"layer_conv1x1.weight", "stage1_headnet.out.bias"} <= set(report.ignored)
  np.testing.assert_array_equal(plain.out.bias[...], sd["final_layer.bias"])
  with pytest.raises(convert.StateDictError, match=r"unexpected keys \(2\): final_layer\.bias, final_layer\.weight"):
    msc_sd = _exported_r18()
    msc_sd.update({"final_layer.weight": sd["final_layer.weight"], "final_layer.bias": sd["final_layer.bias"]})
    convert.load_torch_state_dict(_abstract(), msc_sd)


def test_non_float_values_are_rejected():
  sd = _exported_r18()
  sd["bn1.weight"] = np.ones(64, np.int64)
  with pytest.raises(convert.StateDictError, match="bn1.weight: dtype int64"):
    convert.load_torch_state_dict(_abstract(), sd)


def test_loaded_values_keep_float32_dtype():
  sd = {k: (v.astype(np.float64) if v.dtype == np.float32 else v) for k, v in _exported_r18().items()}
  model = _abstract()
  convert.load_torch_state_dict(model, sd)
  assert {v.dtype for v in jax.tree.leaves(nnx.state(model, (nnx.Param, nnx.BatchStat)))} == {jnp.dtype("float32")}


def test_torchvision_unknown_key_inside_a_present_stage_is_an_error():
  sd = {k: v for k, v in _exported_r18().items() if k.startswith(("conv1.", "bn1.", "layer1.", "layer2.", "layer3."))}
  sd["layer2.0.conv9.weight"] = np.zeros((1, 1, 1, 1), np.float32)
  sd["layer4.0.conv1.weight"] = np.zeros((512, 256, 3, 3), np.float32)  # a stage the MSC model lacks: ignored
  with pytest.raises(convert.StateDictError, match=r"unexpected keys \(1\): layer2\.0\.conv9\.weight"):
    convert.load_torch_state_dict(_abstract(), sd)
