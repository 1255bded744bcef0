"""SimpleBaseline R50-MSC (paper Table 1: 45.33 M): ResNet50 layer1-3 + MSC at 1024 ch + 2 deconvolutions; batch 12."""

from configs import default


def get_config(arg: str | None = None):
  return default.model_variant(arg, name="simplebaseline", depth=50, msc=True, batch_size=12)
