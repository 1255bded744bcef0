"""SimpleBaseline R50 (paper Table 1: 34.00 M parameters): full ResNet50 + 3 deconvolutions, stride-4 maps; batch 12."""

from configs import default


def get_config(arg: str | None = None):
  config = default.get_config()
  config.model.name = "simplebaseline"
  config.model.depth = 50
  config.model.msc = False
  config.batch_size = 12
  return default.apply_arg(config, arg)
