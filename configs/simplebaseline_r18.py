"""SimpleBaseline R18 (paper Table 1: 15.38 M parameters): full ResNet18 + 3 deconvolutions, stride-4 maps; batch 32."""

from configs import default


def get_config(arg: str | None = None):
  config = default.get_config()
  config.model.name = "simplebaseline"
  config.model.depth = 18
  config.model.msc = False
  config.batch_size = 32
  return default.apply_arg(config, arg)
