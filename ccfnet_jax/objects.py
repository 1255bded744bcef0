"""The 11 objects CCF-Net locates: names, order and kinds.

This module is the single place where the object order, the vertebra/disc split and the binary disease-label rule
live (docs/method.md#task, #labels). Pure Python: no JAX, no Flax, no I/O.
"""

from __future__ import annotations

VERTEBRAE: tuple[str, ...] = ("L1", "L2", "L3", "L4", "L5")
DISCS: tuple[str, ...] = ("T12-L1", "L1-L2", "L2-L3", "L3-L4", "L4-L5", "L5-S1")
NAMES: tuple[str, ...] = VERTEBRAE + DISCS
"""Channel order of every map and every `[..., 11]` array: L1..L5 then T12-L1..L5-S1."""

NUM_OBJECTS: int = len(NAMES)
NUM_VERTEBRAE: int = len(VERTEBRAE)
NUM_DISCS: int = len(DISCS)

VERTEBRA_INDICES: tuple[int, ...] = tuple(range(NUM_VERTEBRAE))
DISC_INDICES: tuple[int, ...] = tuple(range(NUM_VERTEBRAE, NUM_OBJECTS))
GROUPS: dict[str, tuple[int, ...]] = {"vertebra": VERTEBRA_INDICES, "disc": DISC_INDICES}
"""The two groups that are scored, weighted and counted apart (metric, BCE pos_weight, label counts)."""

INDEX: dict[str, int] = {name: i for i, name in enumerate(NAMES)}

TOP_TO_BOTTOM: tuple[int, ...] = tuple(
    INDEX[name] for pair in zip(DISCS, VERTEBRAE + ("",)) for name in pair if name)
"""Channel indices in anatomical order, head to feet: T12-L1, L1, L1-L2, L2, ..., L5, L5-S1 (discs and vertebrae
alternate)."""

# Identifications seen in real annotation files that name one of our objects differently.
ALIASES: dict[str, str] = {"T11-T12": "T12-L1"}

# Unknown disease label (point absent from the annotation).
UNKNOWN = -1


def is_disc_name(identification: str) -> bool:
  """A name with '-' is a disc (docs/method.md#labels); otherwise a vertebra."""
  return "-" in identification


def label_key(identification: str) -> str:
  """The annotation tag key that carries the label of this object: 'disc' or 'vertebra'."""
  return "disc" if is_disc_name(identification) else "vertebra"


def canonical_name(identification: str) -> str | None:
  """Maps an annotation identification to one of NAMES (aliases applied); None when it names no object of ours."""
  name = ALIASES.get(identification.strip(), identification.strip())
  return name if name in INDEX else None


def object_index(identification: str) -> int | None:
  """Channel index of an identification, or None when unknown."""
  name = canonical_name(identification)
  return None if name is None else INDEX[name]


def binary_disease_label(tag: str) -> int:
  """The paper's evaluation rule (docs/method.md#labels): 0 if the tag contains 'v1', else 1; an empty tag means normal (0).

  Tags may be comma lists in either order ('v2,v5', 'v5,v2'). Raises ValueError for a tag that holds no 'vN' code.
  """
  codes = [c.strip().lower() for c in tag.split(",") if c.strip()]
  if not codes:
    return 0
  for code in codes:
    if len(code) < 2 or code[0] != "v" or not code[1:].isdigit():
      raise ValueError(f"disease tag {tag!r} is not a comma list of v<N> codes")
  return 0 if "v1" in codes else 1
