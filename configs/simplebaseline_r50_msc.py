"""SimpleBaseline R50-MSC (paper Table 1: 45.33 M): ResNet50 layer1-3 + MSC at 1024 ch + 2 deconvolutions; batch 12."""

from configs import default


def get_config(arg: str | None = None):
  config = default.get_config()
  config.model.name = "simplebaseline"
  config.model.depth = 50
  config.model.msc = True
  config.batch_size = 12
  return default.apply_arg(config, arg)
