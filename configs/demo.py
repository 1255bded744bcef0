"""The demo: CCF-Net R18-MSC trained from scratch on the synthetic phantom at 256 px, minutes on 2 CPU cores.

    make demo      # = python run.py --config=configs/demo.py --workdir=runs/demo

Builds a phantom set of 96 studies on first use, trains on three folds (72 studies) and prints the metrics of the
held-out fold (24 studies). Short-schedule choices, so that a model without ImageNet weights localises the points
within a few hundred steps: 350 steps, learning rate 1e-3 with one cosine to 5e-5, and only the intensity
augmentation (the reference's rotation, shift, zoom, flip, bias field and point jitter slow such a short run down;
`r18_msc.py` has them all). About 5.5 minutes on two idle CPU cores. The phantom is synthetic: its numbers show the code learns, not that a model knows real anatomy.
"""

from configs import default


def get_config(arg: str | None = None):
  config = default.get_config()
  config.dataset = "phantom"
  config.phantom_studies = 96
  config.model.depth = 18
  config.model.msc = True
  config.image_size = 256
  config.batch_size = 8
  config.learning_rate = 1e-3
  config.min_learning_rate = 5e-5
  config.schedule = "cosine"
  config.num_steps = 350
  config.eval_every_steps = 175
  config.log_every_steps = 25
  for name in ("rotate_prob", "shift_prob", "zoom_prob", "flip_prob", "bias_prob"):
    config.augment[name] = 0.0
  config.augment.point_jitter = False
  return default.apply_arg(config, arg)
