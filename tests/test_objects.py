import jax.numpy as jnp
import pytest

from ccfnet_jax import maps, objects


def test_order_and_kinds():
  assert objects.NAMES[:5] == ("L1", "L2", "L3", "L4", "L5")
  assert objects.NAMES[5] == "T12-L1" and objects.NAMES[-1] == "L5-S1"
  assert all(objects.is_disc_name(objects.NAMES[i]) for i in objects.DISC_INDICES)
  assert not any(objects.is_disc_name(objects.NAMES[i]) for i in objects.VERTEBRA_INDICES)
  assert objects.label_key("L4-L5") == "disc" and objects.label_key("L3") == "vertebra"


def test_aliases_and_unknown_names():
  assert objects.object_index("T11-T12") == objects.INDEX["T12-L1"] == 5
  assert objects.object_index(" L2 ") == 1
  assert objects.object_index("S1") is None


@pytest.mark.parametrize("tag, label", [
    ("v1", 0), ("v2", 1), ("v5", 1), ("v1,v5", 0), ("v5,v1", 0), ("v2,v5", 1), ("v5,v3", 1), ("", 0), ("V1", 0),
])
def test_binary_disease_label(tag, label):
  assert objects.binary_disease_label(tag) == label


def test_binary_disease_label_rejects_garbage():
  with pytest.raises(ValueError, match="not a comma list"):
    objects.binary_disease_label("normal")


def test_maps_channel_split_round_trip():
  x = jnp.arange(2 * 3 * 4 * 44, dtype=jnp.float32).reshape(2, 3, 4, 44)
  m = maps.from_channels(x)
  assert m.offset_y[0, 0, 0, 0] == 11 and m.offset_x[0, 0, 0, 0] == 22 and m.logits[0, 0, 0, 0] == 33
  assert jnp.array_equal(maps.to_channels(m), x)
  with pytest.raises(ValueError, match="44 channels"):
    maps.from_channels(x[..., :40])
