"""Pretraining on the built-in phantom before real data (sim-to-real), for `model.init_from`.

    python run.py --config=configs/phantom_pretrain.py --workdir=runs/phantom_pre
    python run.py --config=configs/tianchi_quick.py --config.model.init_from=runs/phantom_pre ... --workdir=runs/tq_pre

The model of `tianchi_quick` (R18-MSC at 256 px, kaiming backbone init, batch 8) trained on 200 synthetic studies
(fold 0 held out) with the reference augmentation, one cosine from 1e-3 to 5e-5 over 1000 steps. The real-data run
then starts from its newest checkpoint's parameters and BatchNorm statistics (a fresh optimizer and schedule).
"""

from configs import default, tianchi_quick


def get_config(arg: str | None = None):
  config = tianchi_quick.get_config()
  config.dataset = "phantom"
  config.phantom_studies = 200
  config.learning_rate = 1e-3
  config.num_steps = 1000
  config.eval_every_steps = 500
  return default.apply_arg(config, arg)
