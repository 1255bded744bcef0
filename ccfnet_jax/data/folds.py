"""Patient-level cross-validation folds that are the same on every machine (docs/method.md#folds).

Sort the studies by the SHA-256 of their studyUid and deal them round-robin into folds 0..num_folds-1, so fold
sizes differ by at most one and nothing depends on directory order.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable


def study_hash(study_uid: str) -> str:
  """Hex SHA-256 of the UTF-8 studyUid: the sort key of the fold rule."""
  return hashlib.sha256(study_uid.encode("utf-8")).hexdigest()


def assign_folds(study_uids: Iterable[str], num_folds: int = 4) -> dict[str, int]:
  """Maps each studyUid to its fold in 0..num_folds-1.

  Raises:
    ValueError: num_folds < 1, or a studyUid given twice.
  """
  uids = list(study_uids)
  if num_folds < 1:
    raise ValueError(f"num_folds must be >= 1, got {num_folds}")
  if len(set(uids)) != len(uids):
    seen, repeated = set(), set()
    for u in uids:
      (repeated if u in seen else seen).add(u)
    raise ValueError(f"assign_folds: studyUids given more than once: {sorted(repeated)[:5]}")
  ordered = sorted(uids, key=lambda u: (study_hash(u), u))
  return {uid: i % num_folds for i, uid in enumerate(ordered)}
