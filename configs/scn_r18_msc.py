"""SCN R18-MSC (paper Table 1: 11.62 M): SimpleBaseline R18-MSC times (1 + a second ResNet18 layer1-3 + MSC branch's
upsampled 1x1-conv maps), stride 4; batch 32."""

from configs import default


def get_config(arg: str | None = None):
  return default.model_variant(arg, name="scn", depth=18, msc=True, batch_size=32)
