"""CCF-Net on a plain ResNet18 (no MSC, full backbone, output stride 32; the paper's "ResNet18" row), batch 32."""

from configs import default


def get_config(arg: str | None = None):
  config = default.get_config()
  config.model.depth = 18
  config.model.msc = False
  config.batch_size = 32
  return default.apply_arg(config, arg)
