"""The reference's own recipe on the real data: `tianchi_quick` with every conv drawn N(0, 0.001).

    python run.py --config=configs/tianchi_reference.py --config.manual_dir=DIR --workdir=runs/tr

Identical to `tianchi_quick` (R18-MSC at 256 px, batch 8, 3000 steps, one cosine from 3e-4 to 5e-5, the reference
augmentation and loss, BCE weight 0.001, flip TTA) except `model.backbone_init="reference"`: the reference's
initialisation, which it overwrites with ImageNet weights; trained from scratch here, as the side-by-side baseline.
"""

from configs import default, tianchi_quick


def get_config(arg: str | None = None):
  config = tianchi_quick.get_config()
  config.model.backbone_init = "reference"
  return default.apply_arg(config, arg)
