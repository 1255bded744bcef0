"""SimpleBaseline R50 (paper Table 1: 34.00 M parameters): full ResNet50 + 3 deconvolutions, stride-4 maps; batch 12."""

from configs import default


def get_config(arg: str | None = None):
  return default.model_variant(arg, name="simplebaseline", depth=50, msc=False, batch_size=12)
