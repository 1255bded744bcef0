"""CCF-Net R50-MSC (the paper's Table 1 row, 10.79 M parameters): the paper's schedule, batch 12, 512 px."""

from configs import default


def get_config(arg: str | None = None):
  return default.model_variant(arg, depth=50, msc=True, batch_size=12)
