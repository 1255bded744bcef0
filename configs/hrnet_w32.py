"""HRNet-W32 (paper Table 1: 28.54 M parameters): the pose HRNet, stride-4 maps from its high-resolution branch.

For HRNet the registry's `model.depth` is the width W (see `ccfnet_jax.models.hrnet.create_hrnet`). Batch 32 (the
paper gives no HRNet batch size; the R18 rows' value).
"""

from configs import default


def get_config(arg: str | None = None):
  return default.model_variant(arg, name="hrnet", depth=32, msc=False, batch_size=32)
