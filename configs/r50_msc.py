"""CCF-Net R50-MSC (the paper's Table 1 row, 10.79 M parameters): SPEC §9 schedule, batch 12, 512 px."""

from configs import default


def get_config(arg: str | None = None):
  config = default.get_config()
  config.model.depth = 50
  config.model.msc = True
  config.batch_size = 12
  return default.apply_arg(config, arg)
