"""SimpleBaseline R18-MSC (paper Table 1: 6.86 M): ResNet18 layer1-3 + MSC + 2 deconvolutions, stride 4; batch 32."""

from configs import default


def get_config(arg: str | None = None):
  config = default.get_config()
  config.model.name = "simplebaseline"
  config.model.depth = 18
  config.model.msc = True
  config.batch_size = 32
  return default.apply_arg(config, arg)
