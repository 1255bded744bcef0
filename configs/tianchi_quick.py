"""A short real-data run: R18-MSC at 256 px, batch 8, 3000 steps, one cosine from 3e-4 to 5e-5, reference augmentation.

    python run.py --config=configs/tianchi_quick.py --config.manual_dir=DIR --workdir=runs/tq

Trains on three folds of the Tianchi studies and evaluates on the fourth after every epoch (10 passes over the
training studies; fold 0 by default, `:fold=all` for all four).
From scratch (no ImageNet weights; the backbone at torchvision's init scale, `model.backbone_init="kaiming"`, the
default).
"""

from configs import default


def get_config(arg: str | None = None):
  config = default.get_config()
  config.dataset = "tianchi"
  config.model.depth = 18
  config.model.msc = True
  config.image_size = 256
  config.batch_size = 8
  config.num_steps = 3000
  config.schedule = "cosine"
  config.learning_rate = 3e-4
  config.min_learning_rate = 5e-5
  config.log_every_steps = 25
  return default.apply_arg(config, arg)
