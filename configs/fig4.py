"""The paper's Fig. 4: CCF-Net, SCN and SimpleBaseline (R18-MSC) trained on 25-100 % of each fold's training studies.

    python -m ccfnet_jax.sample_size --grid=configs/fig4.py --grid.overrides.manual_dir=DIR --workdir=runs/fig4
    python -m ccfnet_jax.sample_size --grid=configs/fig4.py:phantom --workdir=runs/fig4_phantom   # a small check

Every cell is a run of the model's own config with `overrides` (the small-budget protocol on real data by default:
256 px, batch 8, 3000 steps, one cosine from 3e-4 to 5e-5) and `train_fraction` set; the grid is resumable.
"""

import ml_collections

REAL = {"dataset": "tianchi", "manual_dir": "", "image_size": 256, "batch_size": 8, "num_steps": 3000,
        "schedule": "cosine", "learning_rate": 3e-4, "min_learning_rate": 5e-5, "log_every_steps": 50}
PHANTOM = {"dataset": "phantom", "phantom_studies": 32, "image_size": 128, "batch_size": 4, "eval_batch_size": 4,
           "num_steps": 4, "eval_every_steps": 4, "schedule": "constant", "learning_rate": 1e-3,
           "log_every_steps": 2}


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  preset = (arg or "real").strip()
  if preset not in ("real", "phantom"):
    raise ValueError(f"configs/fig4.py:{arg}: expected 'real' or 'phantom'")
  grid = ml_collections.ConfigDict()
  grid.models = ml_collections.ConfigDict({
      "CCF-Net R18-MSC": "configs/r18_msc.py",
      "SCN R18-MSC": "configs/scn_r18_msc.py",
      "SimpleBaseline R18-MSC": "configs/simplebaseline_r18_msc.py",
  })
  grid.fractions = (0.25, 0.5, 0.75, 1.0) if preset == "real" else (0.5, 1.0)
  grid.folds = (0, 1, 2, 3) if preset == "real" else (0, 1)
  grid.overrides = ml_collections.ConfigDict(REAL if preset == "real" else PHANTOM)
  return grid
