"""SimpleBaseline R18 (paper Table 1: 15.38 M parameters): full ResNet18 + 3 deconvolutions, stride-4 maps; batch 32."""

from configs import default


def get_config(arg: str | None = None):
  return default.model_variant(arg, name="simplebaseline", depth=18, msc=False, batch_size=32)
