"""The experiment config: every value checked before any data is read, old run configs upgraded, and the fields that
change the trained model told apart from those that do not."""

from __future__ import annotations

import json

import pytest

import tiny_training
from ccfnet_jax import config as config_lib
from ccfnet_jax import forward, losses, train

BAD_VALUES = [
    ("num_steps", 0, "positive"), ("num_steps", -5, "positive"), ("schedule", "linear", "cosine_warm_restarts"),
    ("model.name", "resnet", "ccfnet"), ("model.depth", 101, "ResNet"), ("keep_checkpoints", 0, "positive"),
    ("augment.rotate_prob", 1.5, "probability"), ("augment.zoom_y_frac", (0.3, 0.1), "low <= high"),
    ("learning_rate", -1e-3, "positive"), ("batch_size", 0, "positive"), ("image_size", 200, "multiple of 128"),
    ("loss", "focal", "reference"), ("fold", "5", "distinct integers"), ("log_every_steps", 0, "positive"),
    ("eval_every_steps", -1, "positive"), ("dataset", "mnist", "phantom"), ("weight_decay", -1.0, ">= 0"),
    ("min_learning_rate", 1.0, "must not exceed learning_rate"), ("restart_mult", 0.5, ">= 1"),
    ("restart_epochs", 0.0, "positive"),
    ("warmup_steps", 50, "less than num_steps"), ("fold_batching", "pmap", "vmap"),
    ("model.backbone_init", "xavier", "kaiming"), ("phantom_studies", 2, "at least num_folds"),
    ("loss_weights.bce_disc", -1.0, ">= 0"), ("disease_region", "everywhere", "peak"), ("ema_decay", 1.0, "[0, 1)"),
    ("ema_decay", -0.5, "[0, 1)"), ("tta.shift_cells", -1, ">= 0"), ("decode", "beam", "ordered"),
    ("decode_top_k", 0, "positive"), ("model.init_from", "/no/such/run", "no such directory"),
]


def _set(config, field, value):
  *path, last = field.split(".")
  target = config
  for part in path:
    target = target[part]
  with config.unlocked():
    target[last] = value


@pytest.mark.parametrize("field,value,allowed", BAD_VALUES, ids=[f"{f}={v}" for f, v, _ in BAD_VALUES])
def test_a_bad_value_is_refused_naming_field_value_and_what_is_allowed(field, value, allowed, tmp_path):
  config = tiny_training.tiny_config(num_steps=10, data_dir=str(tmp_path / "tfds"))
  context = {"model.depth": {"model.name": "ccfnet"}, "min_learning_rate": {"schedule": "cosine"},
             "restart_mult": {"schedule": "cosine_warm_restarts"},
             "restart_epochs": {"schedule": "cosine_warm_restarts"}}
  for other, other_value in context.get(field, {}).items():  # the settings under which the field is read
    _set(config, other, other_value)
  _set(config, field, value)
  with pytest.raises(config_lib.ConfigError) as error:
    train.train_and_evaluate(config, str(tmp_path / "run"))
  message = str(error.value)
  assert field.split(".")[-1] in message and allowed in message, message
  assert not (tmp_path / "tfds").exists()  # refused before any data set was opened or built


def test_shift_and_candidates_are_bounded_by_the_models_maps():
  """At 256 px and stride 16 the maps are 16 x 16 cells: a shift of 16 cells sees nothing of the image, and the
  ordered decode has 256 cells to choose from."""
  config = tiny_training.tiny_config(image_size=256)
  config.tta.shift_cells = 15
  config.decode, config.decode_top_k = "ordered", 256
  config_lib.check_against_model(config, stride=16)  # the largest values that fit
  config.tta.shift_cells = 16
  with pytest.raises(config_lib.ConfigError, match=r"tta.shift_cells.*16 cells = image_size 256 / stride 16"):
    config_lib.check_against_model(config, stride=16)
  config.tta.shift_cells = 3
  config_lib.check_against_model(config, stride=4)  # 64 x 64 cells at stride 4
  config.decode_top_k = 257
  with pytest.raises(config_lib.ConfigError, match=r"decode_top_k.*16 x 16 = 256"):
    config_lib.check_against_model(config, stride=16)
  config.decode = "argmax"  # the argmax decode has no candidates to bound
  config_lib.check_against_model(config, stride=16)


def test_run_refuses_a_shift_the_maps_cannot_take_before_any_data(tmp_path):
  config = tiny_training.tiny_config(data_dir=str(tmp_path / "tfds"), **{"tta.shift_cells": 99})
  with pytest.raises(config_lib.ConfigError, match="tta.shift_cells"):
    train.train_and_evaluate(config, str(tmp_path / "run"))
  assert not list((tmp_path / "run").glob("fold_*/checkpoints/*"))
  assert not (tmp_path / "tfds").exists()  # refused before the phantom data set was built


def test_tianchi_needs_an_existing_manual_dir(tmp_path):
  config = tiny_training.tiny_config(dataset="tianchi", manual_dir=str(tmp_path / "nowhere"))
  with pytest.raises(config_lib.ConfigError, match="manual_dir.*no such directory"):
    config_lib.validate(config)
  config.manual_dir = ""
  with pytest.raises(config_lib.ConfigError, match="manual_dir"):
    config_lib.validate(config)


def test_every_shipped_config_is_valid():
  from configs import default  # pylint: disable=g-import-not-at-top
  config_lib.validate(default.get_config())
  config_lib.validate(tiny_training.tiny_config())


def test_an_older_run_config_gets_the_defaults_of_newer_fields(tmp_path):
  values = json.loads(config_lib.to_json(config_lib.default_config()))
  del values["recalibrate_bn"]
  del values["model"]["backbone_init"]
  path = tmp_path / "config.json"
  path.write_text(json.dumps(values))
  loaded, filled = config_lib.load_run_config(path)
  assert sorted(filled) == ["model.backbone_init", "recalibrate_bn"]
  assert loaded.recalibrate_bn is False and loaded.model.backbone_init == "kaiming"
  path.write_text("[1, 2]")
  with pytest.raises(config_lib.ConfigError, match="holds a list"):
    config_lib.load_run_config(path)
  with pytest.raises(config_lib.ConfigError, match="no such file"):
    config_lib.load_run_config(tmp_path / "missing.json")


def test_an_older_run_config_gets_the_reference_recipe(tmp_path):
  """A run written before the recipe options trains, evaluates and predicts as before: every option is off."""
  values = json.loads(config_lib.to_json(config_lib.default_config()))
  for name in ("loss_weights", "disease_region", "ema_decay", "tta", "decode", "decode_top_k"):
    del values[name]
  del values["model"]["init_from"]
  path = tmp_path / "config.json"
  path.write_text(json.dumps(values))
  loaded, filled = config_lib.load_run_config(path)
  assert "tta" in filled and "model.init_from" in filled
  config_lib.validate(loaded)
  assert dict(loaded.loss_weights) == dict(losses.LOSS_WEIGHTS) and loaded.disease_region == "peak"
  assert loaded.ema_decay == 0.0 and loaded.model.init_from == ""
  assert forward.eval_options(loaded) == forward.EvalOptions(flip_tta=True, shift_cells=0, decode="argmax")


def test_model_changes_ignore_only_the_fields_that_do_not_change_the_model():
  base = tiny_training.tiny_config()
  other = tiny_training.tiny_config()
  other.log_every_steps = 7
  other.data_dir = "/elsewhere"
  other.parallel_folds = True
  other.fold = "all"
  assert config_lib.model_changes(base, other) == []
  other.learning_rate = 5e-3
  other.augment.rotate_prob = 0.1
  assert config_lib.model_changes(base, other) == [("augment.rotate_prob", 0.8, 0.1),
                                                   ("learning_rate", base.learning_rate, 5e-3)]
