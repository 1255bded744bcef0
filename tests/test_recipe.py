"""Recipe options (docs/recipe.md): the defaults are the reference's; loss options reach the train step; the moving
average of the weights in the train step, in evaluation, in checkpoints (old ones still load) and in predict; a warm
start from another run; shift TTA and the decoder in the one eval computation; the reference config."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import tiny_training
from ccfnet_jax import checkpoint as checkpoint_lib
from ccfnet_jax import forward, losses, objects, parallel, train
from ccfnet_jax import maps as maps_lib
from ccfnet_jax.inference import loading
from ccfnet_jax.train import loop, setup, steps
from test_configs import load
from test_train import phantom_data_dir  # noqa: F401  (fixture)


def _host(tree):
  return [np.asarray(x) for x in jax.tree.leaves(tree)]


def test_default_recipe_is_the_reference():
  config = load("default")
  settings = setup.step_settings(config, 16)
  assert dict(settings.loss_weights) == dict(losses.LOSS_WEIGHTS)
  assert (settings.disease_region, settings.ema_decay) == ("peak", 0.0)
  assert forward.eval_options(config) == forward.EvalOptions()
  assert forward.EvalOptions() == forward.EvalOptions(flip_tta=True, shift_cells=0, decode="argmax")
  _, _, state = setup.init_state(tiny_training.TinyNet(rngs=nnx.Rngs(0)), 0.0, config.ema_decay)
  assert state.ema is None


def test_the_loss_options_reach_the_train_step():
  config = tiny_training.tiny_config(**{"loss_weights.bce_disc": 0.5, "disease_region": "region"})
  settings = setup.step_settings(config, 16)
  t = tiny_training.fake_batch(2)
  from ccfnet_jax import targets  # pylint: disable=g-import-not-at-top
  target = targets.encode(t["points_xy"], t["point_valid"], (128, 128), 16, disease=t["disease"])
  rng = np.random.default_rng(0)
  pred = maps_lib.Maps(*(rng.normal(size=target.maps.heatmap.shape).astype(np.float32) for _ in range(4)))
  total, parts = steps.loss_function(settings)(pred, target, t["disease"], (0.4, 0.9))
  expected, _ = losses.reference_loss(pred, target, t["disease"], (0.4, 0.9), disease_region="region",
                                      weights={**losses.LOSS_WEIGHTS, "bce_disc": 0.5})
  np.testing.assert_allclose(float(total), float(expected), rtol=1e-6)
  _, peak = losses.reference_loss(pred, target, t["disease"], (0.4, 0.9))
  assert abs(float(parts["bce_disc"]) - float(peak["bce_disc"])) > 1e-4  # the region, not the peak cell
  paper = setup.step_settings(tiny_training.tiny_config(loss="paper", disease_region="region"), 16)
  steps.loss_function(paper)(pred, target, t["disease"], (0.4, 0.9))  # the paper's loss takes no region option


def test_reference_config_differs_from_quick_only_in_the_init():
  reference, quick = load("tianchi_reference"), load("tianchi_quick")
  assert reference.model.backbone_init == "reference" and quick.model.backbone_init == "kaiming"
  reference.model.backbone_init = "kaiming"
  assert reference.to_dict() == quick.to_dict()


def test_tuned_config_sets_exactly_its_levers():
  tuned, quick = load("tianchi_tuned"), load("tianchi_quick")
  assert dict(tuned.loss_weights) == {**losses.LOSS_WEIGHTS, "bce_vertebra": 0.01, "bce_disc": 0.01}
  assert (tuned.disease_region, tuned.ema_decay, tuned.tta.shift_cells) == ("region", 0.998, 2)
  for name, value in (("loss_weights", quick.loss_weights), ("disease_region", "peak"), ("ema_decay", 0.0),
                      ("tta", quick.tta)):
    tuned[name] = value
  assert tuned.to_dict() == quick.to_dict()


def test_small_config_is_tuned_with_a_warmed_up_larger_peak():
  small, tuned = load("tianchi_small"), load("tianchi_tuned")
  assert (small.learning_rate, small.warmup_steps, small.min_learning_rate) == (1e-3, 50, 5e-5)
  assert (small.schedule, small.num_steps) == ("cosine", 3000)
  small.learning_rate, small.warmup_steps = tuned.learning_rate, tuned.warmup_steps
  assert small.to_dict() == tuned.to_dict()


def test_train_step_keeps_the_moving_average_and_evaluation_uses_it():
  decay = 0.9
  config = tiny_training.tiny_config(learning_rate=3e-3, ema_decay=decay)
  mesh = parallel.make_mesh()
  step, state, args, eval_graphdef = tiny_training.jit_step(config, mesh)
  trained = [_host(steps.unstack((state.params, state.batch_stats), 0))]
  for seed in range(4):
    state, _ = step(state, tiny_training.stacked_global([tiny_training.fake_batch(8, seed=seed)], mesh), args)
    trained.append(_host(steps.unstack((state.params, state.batch_stats), 0)))
  # a_0 = w_0; a_t = d_t a_(t-1) + (1 - d_t) w_t with d_t = min(decay, t / (9 + t)) after steps t = 1..4
  expected = trained[0]
  for t in range(1, 5):
    d = min(decay, t / (9 + t))
    expected = [d * a + (1 - d) * w for a, w in zip(expected, trained[t])]
  one = steps.unstack(state, 0)
  got = _host((one.ema["params"], one.ema["batch_stats"]))
  for a, b in zip(got, expected):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
  assert not np.allclose(got[0], trained[-1][0])
  # evaluation reads the averages: the same outputs as a state whose weights are the averages
  eval_fn = loop.jit_eval_step(mesh, eval_graphdef, forward.EvalOptions(flip_tta=False))
  batch = parallel.host_to_global({k: v for k, v in tiny_training.fake_batch(8, seed=9).items()
                                   if k in loop.EVAL_KEYS}, mesh)
  swapped = one.replace(params=one.ema["params"], batch_stats=one.ema["batch_stats"], ema=None)
  np.testing.assert_array_equal(loop.evaluate(eval_fn, one, [batch])["score"],
                                loop.evaluate(eval_fn, swapped, [batch])["score"])
  plain = one.replace(ema=None)
  assert _host(eval_fn(*steps.eval_weights(one), batch)["pred_prob"])[0].tolist() != \
      _host(eval_fn(*steps.eval_weights(plain), batch)["pred_prob"])[0].tolist()


def test_a_checkpoint_without_moving_averages_still_restores(tmp_path):
  """A state saved before `TrainState.ema` existed (the same tree without the field) restores into a state
  without averages, and `predict` loads its weights."""
  config = tiny_training.tiny_config()
  _, _, state = tiny_training.initial_state(config)
  old = {"step": state.step, "params": state.params, "batch_stats": state.batch_stats,
         "opt_state": state.opt_state}
  mesh = parallel.make_mesh(jax.devices()[:1])
  with checkpoint_lib.Checkpointer(tmp_path / "checkpoints", asynchronous=False) as ckpt:
    ckpt.save(5, old, {"evals": []})
    ckpt.save(6, state, {"evals": []})  # the same state saved with its empty `ema` field
  abstract = checkpoint_lib.abstract_like(state, parallel.replicated_sharding(mesh))
  with checkpoint_lib.Checkpointer(tmp_path / "checkpoints") as ckpt:
    for step in (5, 6):
      restored, _ = ckpt.restore(step, abstract)
      assert restored.ema is None
      for a, b in zip(_host(restored.params), _host(state.params)):
        np.testing.assert_array_equal(a, b)
  ref = loading.CheckpointRef(str(tmp_path / "checkpoints" / "5"), 5, "given", None)
  model = loading.restore_model(ref, config, mesh)
  for a, b in zip(_host(nnx.state(model, nnx.Param)), _host(state.params)):
    np.testing.assert_array_equal(a, b)


def test_a_run_with_ema_predicts_with_its_averages_and_starts_another(tmp_path, phantom_data_dir):  # noqa: F811
  first = tiny_training.tiny_config(data_dir=phantom_data_dir, num_steps=3, eval_every_steps=3, ema_decay=0.5,
                                    **{"tta.shift_cells": 1, "decode": "ordered"})
  train.train_and_evaluate(first, str(tmp_path / "phantom"))
  mesh = parallel.make_mesh(jax.devices()[:1])
  _, _, abstract = tiny_training.initial_state(first)
  with checkpoint_lib.Checkpointer(tmp_path / "phantom" / "fold_0" / "checkpoints") as ckpt:
    saved, _ = ckpt.restore(3, checkpoint_lib.abstract_like(abstract, parallel.replicated_sharding(mesh)))
  assert not np.array_equal(_host(saved.ema["params"])[0], _host(saved.params)[0])
  # predict restores the averages the run evaluated, and decodes as it did
  loaded = loading.load_model(tmp_path / "phantom", which="last", mesh=mesh)
  for a, b in zip(_host(nnx.state(loaded.model, nnx.Param)), _host(saved.ema["params"])):
    np.testing.assert_array_equal(a, b)
  assert loaded.eval_options == forward.EvalOptions(shift_cells=1, decode="ordered")
  # warm start: the trained weights (not the averages) of the newest checkpoint, from any level of the run
  for path in (tmp_path / "phantom", tmp_path / "phantom" / "fold_0" / "checkpoints"):
    second = tiny_training.tiny_config(**{"model.init_from": str(path)})
    model = setup.initial_model(second, jax.random.key(7), report=lambda _: None)
    for a, b in zip(_host(nnx.state(model, nnx.Param)), _host(saved.params)):
      np.testing.assert_array_equal(a, b)
    for a, b in zip(_host(nnx.state(model, nnx.BatchStat)), _host(saved.batch_stats)):
      np.testing.assert_array_equal(a, b)
  with pytest.raises(checkpoint_lib.CheckpointError, match="no checkpoint"):
    setup.initial_model(tiny_training.tiny_config(**{"model.init_from": str(tmp_path)}), jax.random.key(0))
  # a warm start from another model's run is refused before anything is read, naming the parameters
  other = tiny_training.tiny_config(**{"model.init_from": str(tmp_path / "phantom"), "model.name": "ccfnet",
                                       "model.depth": 18})
  with pytest.raises(checkpoint_lib.CheckpointMismatchError) as error:
    setup.initial_model(other, jax.random.key(0), report=lambda _: None)
  assert "ccfnet depth=18" in str(error.value) and "params/backbone/conv1/kernel" in str(error.value)
  assert str(tmp_path / "phantom" / "fold_0" / "checkpoints") in str(error.value)


class _PooledImage(nnx.Module):
  """Maps = per-cell means of the image (stride 16): equivariant to whole-cell shifts wherever a cell is seen."""

  def __init__(self):
    self.stride = 16
    self.unused = nnx.Param(jnp.zeros(()))

  def __call__(self, x):
    b, h, w, _ = x.shape
    cells = x.reshape(b, h // 16, 16, w // 16, 16, 3).mean(axis=(2, 4))  # [B, h, w, 3]
    channel = lambda i: jnp.tile(cells[..., i:i + 1], (1, 1, 1, objects.NUM_OBJECTS)) + self.unused[...]
    return maps_lib.Maps(channel(0), channel(1), channel(2), channel(0) - channel(1))


@pytest.mark.parametrize("flip", [False, True])
def test_shift_tta_returns_the_maps_of_a_shift_equivariant_model(flip):
  rng = np.random.default_rng(0)
  image = jnp.asarray(rng.uniform(size=(2, 128, 96, 3)).astype(np.float32))
  model = _PooledImage()
  plain = forward.model_maps(model, image, forward.EvalOptions(flip_tta=flip))
  for shift in (1, 2):
    shifted = forward.model_maps(model, image, forward.EvalOptions(flip_tta=flip, shift_cells=shift))
    for a, b in zip(shifted, plain):
      np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(np.asarray(plain.offset_x), np.asarray(model(image).offset_x), rtol=1e-6)


def test_shift_tta_averages_the_views_that_saw_each_cell():
  """A model whose maps are its input's cell means, so each view's contribution can be written down."""
  image = np.zeros((1, 64, 64, 3), np.float32)
  image[0, 16:32, 16:32] = 1.0  # one bright cell (1, 1) on a 4 x 4 grid
  maps = forward.model_maps(_PooledImage(), jnp.asarray(image), forward.EvalOptions(flip_tta=False, shift_cells=1))
  heat = np.asarray(maps.heatmap)[0, ..., 0]
  # the cell sits in every view: 1; the border cells that some views do not see average only the others
  np.testing.assert_allclose(heat, np.eye(4)[1][:, None] * np.eye(4)[1][None, :], atol=1e-6)
  bright = np.zeros_like(image)
  bright[0, :16] = 1.0  # the top row of cells bright: the view moved up by a cell loses it
  heat = np.asarray(forward.model_maps(_PooledImage(), jnp.asarray(bright),
                                       forward.EvalOptions(flip_tta=False, shift_cells=1)).heatmap)[0, ..., 0]
  np.testing.assert_allclose(heat[0], 1.0, atol=1e-6)  # the views that see row 0 all read 1 there
  np.testing.assert_allclose(heat[1:], 0.0, atol=1e-6)


def test_the_decoder_option_is_the_eval_computations():
  """`forward.predict` with decode='ordered' returns `decode.decode_ordered`'s points."""
  from ccfnet_jax import decode  # pylint: disable=g-import-not-at-top
  model = _PooledImage()
  rng = np.random.default_rng(2)
  image = jnp.asarray(rng.uniform(size=(2, 128, 128, 3)).astype(np.float32))
  hw = jnp.full((2, 2), 128.0)
  options = forward.EvalOptions(flip_tta=False, decode="ordered", decode_top_k=5)
  got = forward.predict(model, image, hw, options)
  want = decode.decode_ordered(model(image), 16, 5)
  np.testing.assert_allclose(np.asarray(got.xy), np.asarray(want.xy), rtol=1e-6)
  argmax = forward.predict(model, image, hw, forward.EvalOptions(flip_tta=False))
  np.testing.assert_allclose(np.asarray(argmax.xy), np.asarray(decode.decode(model(image), 16).xy), rtol=1e-6)
