"""CCF-Net on a plain ResNet50 (no MSC, full backbone, output stride 32; the paper's "ResNet50" row), batch 12."""

from configs import default


def get_config(arg: str | None = None):
  return default.model_variant(arg, depth=50, msc=False, batch_size=12)
