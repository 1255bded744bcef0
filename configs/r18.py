"""CCF-Net on a plain ResNet18 (no MSC, full backbone, output stride 32; the paper's "ResNet18" row), batch 32."""

from configs import default


def get_config(arg: str | None = None):
  return default.model_variant(arg, depth=18, msc=False, batch_size=32)
