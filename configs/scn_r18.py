"""SCN R18 (paper Table 1: 26.57 M parameters): SimpleBaseline R18 times (1 + a second ResNet18's upsampled 1x1-conv
maps), stride-4 maps; batch 32."""

from configs import default


def get_config(arg: str | None = None):
  return default.model_variant(arg, name="scn", depth=18, msc=False, batch_size=32)
