"""SimpleBaseline R18-MSC (paper Table 1: 6.86 M): ResNet18 layer1-3 + MSC + 2 deconvolutions, stride 4; batch 32."""

from configs import default


def get_config(arg: str | None = None):
  return default.model_variant(arg, name="simplebaseline", depth=18, msc=True, batch_size=32)
