"""CCF-Net on a plain ResNet50 (no MSC, full backbone, output stride 32; the paper's "ResNet50" row), batch 12."""

from configs import default


def get_config(arg: str | None = None):
  config = default.get_config()
  config.model.depth = 50
  config.model.msc = False
  config.batch_size = 12
  return default.apply_arg(config, arg)
