"""Config files: the paper's training values, the `:fold=...,steps=...` argument, and `--config.x=...` overrides through absl."""

from __future__ import annotations

import importlib.util
import pathlib

import pytest
from absl import flags
from ml_collections import config_flags

from ccfnet_jax import config as config_lib
from ccfnet_jax import losses
from ccfnet_jax.data.augment import AugmentConfig

CONFIGS = pathlib.Path(__file__).resolve().parents[1] / "configs"
NAMES = ("default", "r18", "r18_msc", "r50", "r50_msc", "demo", "tianchi_quick", "tianchi_reference", "tianchi_tuned",
         "tianchi_small", "phantom_pretrain")


def load(name: str, arg: str | None = None):
  spec = importlib.util.spec_from_file_location(f"config_{name}", CONFIGS / f"{name}.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg)


def parse_flags(*argv: str):
  """Parses `--config=...` flags the way run.py does (a private FlagValues)."""
  values = flags.FlagValues()
  config_flags.DEFINE_config_file("config", flag_values=values, lock_config=True, sys_argv=["run.py", *argv])
  values(["run.py", *argv])
  return values.config


@pytest.mark.parametrize("name", NAMES)
def test_every_config_loads_and_is_consistent(name):
  config = load(name)
  assert config.dataset in ("phantom", "tianchi")
  assert config.image_size % 128 == 0  # MSC needs map sides divisible by 8 at stride 16
  assert config.loss in losses.LOSSES
  config_lib.parse_folds(config.fold, config.num_folds)
  augment = config_lib.augment_config(config)
  assert augment is None or isinstance(augment, AugmentConfig)


@pytest.mark.parametrize("name,depth,msc,batch", [("r18", 18, False, 32), ("r18_msc", 18, True, 32),
                                                   ("r50", 50, False, 12), ("r50_msc", 50, True, 12)])
def test_paper_configs_have_the_spec_training_values(name, depth, msc, batch):
  config = load(name)
  assert (config.model.name, config.model.depth, config.model.msc) == ("ccfnet", depth, msc)
  assert config.batch_size == batch and config.image_size == 512
  assert config.learning_rate == 3e-4 and config.weight_decay == 5e-4 and config.min_learning_rate == 5e-5
  assert config.schedule == "cosine_warm_restarts" and config.restart_epochs == 20 and config.restart_mult == 2
  assert config.num_epochs == 60 and config.passes_per_epoch == 10 and config.num_steps is None
  assert config.loss == "reference" and config.flip_tta
  assert config_lib.augment_config(config) == AugmentConfig.reference()


def test_demo_and_quick_configs():
  demo = load("demo")
  assert demo.dataset == "phantom" and demo.model.msc and demo.model.depth == 18 and demo.phantom_dicom_studies > 0
  assert demo.image_size % 128 == 0 and demo.eval_every_steps == demo.num_steps  # MSC sides; one evaluation
  quick = load("tianchi_quick")
  assert quick.dataset == "tianchi" and quick.image_size == 256 and quick.batch_size == 8
  assert quick.num_steps == 3000 and quick.schedule == "cosine" and quick.min_learning_rate == 5e-5
  assert config_lib.augment_config(quick) == AugmentConfig.reference()


def test_config_argument_string():
  assert load("r50_msc", "fold=2").fold == "2"
  assert config_lib.parse_folds(load("r50_msc", "fold=2").fold, 4) == [2]
  assert config_lib.parse_folds(load("default", "fold=all").fold, 4) == [0, 1, 2, 3]
  assert load("default", "3").fold == "3"  # a lone value is the fold
  short = load("r18_msc", "fold=1,steps=100,dataset=tianchi")
  assert (short.fold, short.num_steps, short.dataset) == ("1", 100, "tianchi")
  assert load("demo", "fold=all").num_steps == load("demo").num_steps  # unset keys keep the file's values
  for bad in ("folds=2", "steps=ten", "fold=2,bogus=1"):
    with pytest.raises(ValueError, match="config argument"):
      load("default", bad)


def test_command_line_overrides():
  config = parse_flags(f"--config={CONFIGS / 'r18_msc.py'}:fold=all", "--config.num_steps=7",
                       "--config.dataset=tianchi", "--config.manual_dir=../shared/data/tianchi",
                       "--config.augment.rotate_prob=0.25", "--config.mixed_precision=True")
  assert config.fold == "all" and config.num_steps == 7 and config.dataset == "tianchi"
  assert config.manual_dir == "../shared/data/tianchi" and config.mixed_precision is True
  assert config_lib.augment_config(config).rotate_prob == 0.25
  assert parse_flags(f"--config={CONFIGS / 'default.py'}", "--config.fold=2").fold == "2"
  with pytest.raises(flags.IllegalFlagValueError):
    parse_flags(f"--config={CONFIGS / 'default.py'}", "--config.num_steps=lots")
