"""The demo: CCF-Net R18-MSC trained from scratch on the synthetic phantom, a few minutes on 2 CPU cores.

    make demo      # = python run.py --config=configs/demo.py --workdir=runs/demo

Builds a phantom set of 192 studies on first use, trains on three folds (144 studies), prints the metrics of the
held-out fold (48 studies), then writes 16 new phantom studies as DICOM folders with their annotation JSON
(`runs/demo/phantom_dicom/`) and prints the predict / evaluate / report commands to run on them.

Chosen for the shortest run that still localises the points: 128 px (a quarter of the compute of 256 px), 400 steps
of batch 8, learning rate 2e-3 after 30 warm-up steps with one cosine to 5e-5, the paper's loss (its offsets and
disease terms cover every cell of the region H >= 0.6 rather than the peak alone, which sharpens the offsets that
set the precision at this coarse size), only the intensity augmentation (rotation, shift, zoom, flip, bias field and
point jitter slow such a short run down; `r18_msc.py` has them all), and one evaluation at the end. The phantom is
synthetic: its numbers show the code learns, not that a model knows real anatomy.
"""

from configs import default


def get_config(arg: str | None = None):
  config = default.get_config()
  config.dataset = "phantom"
  config.phantom_studies = 192
  config.phantom_dicom_studies = 16
  config.model.depth = 18
  config.model.msc = True
  config.image_size = 128
  config.batch_size = 8
  config.loss = "paper"
  config.learning_rate = 2e-3
  config.min_learning_rate = 5e-5
  config.warmup_steps = 30
  config.schedule = "cosine"
  config.num_steps = 400
  config.eval_every_steps = 400
  config.log_every_steps = 25
  for name in ("rotate_prob", "shift_prob", "zoom_prob", "flip_prob", "bias_prob"):
    config.augment[name] = 0.0
  config.augment.point_jitter = False
  return default.apply_arg(config, arg)
