"""CCF-Net R18-MSC (the paper's Table 1 row, 4.83 M parameters): the defaults, the paper's schedule, batch 32, 512 px."""

from configs import default


def get_config(arg: str | None = None):
  return default.model_variant(arg, depth=18, msc=True, batch_size=32)
