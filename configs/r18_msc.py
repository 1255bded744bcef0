"""CCF-Net R18-MSC (the paper's Table 1 row, 4.83 M parameters): the defaults, SPEC §9 schedule, batch 32, 512 px."""

from configs import default


def get_config(arg: str | None = None):
  config = default.get_config()
  config.model.depth = 18
  config.model.msc = True
  config.batch_size = 32
  return default.apply_arg(config, arg)
