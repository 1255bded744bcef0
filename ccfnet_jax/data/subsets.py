"""Reproducible, label-stratified, nested subsets of a training set (the training-size experiment).

Every study gets a place in one order: studies are grouped into strata by their labels, ordered inside a stratum by
the SHA-256 of their studyUid (and a salt), and each is placed at `(rank + 0.5) / stratum size`, so the strata
interleave evenly. The subset of fraction f is the first `ceil(f N)` studies of that order: the same on every
machine and for any directory order, nested (the 25 % subset lies inside the 50 % one), and each stratum keeps about
its share.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from ccfnet_jax import objects


def stratum(disease: np.ndarray) -> tuple[int, int]:
  """A study's stratum: how many vertebrae and how many discs are diseased, each as 0 / 1-2 / 3+ (labels `[11]`)."""
  disease = np.asarray(disease)

  def bucket(indices):
    n = int(np.sum(disease[list(indices)] > 0))
    return 0 if n == 0 else (1 if n <= 2 else 2)

  return bucket(objects.VERTEBRA_INDICES), bucket(objects.DISC_INDICES)


def nested_order(study_uids: Sequence[str], disease: np.ndarray, salt: str = "") -> list[int]:
  """Indices of the studies in the order their subsets take them (module docstring).

  Args:
    study_uids: `[N]` study UIDs (distinct).
    disease: int `[N, 11]` binary labels (-1 unknown counts as not diseased).
    salt: changes the order (e.g. the config's seed), the same salt giving the same order.
  """
  if len(set(study_uids)) != len(study_uids):
    raise ValueError("nested_order: study UIDs must be distinct")
  digest = [hashlib.sha256(f"{salt}/{uid}".encode()).hexdigest() for uid in study_uids]
  groups: dict[tuple[int, int], list[int]] = {}
  for i, labels in enumerate(np.asarray(disease)):
    groups.setdefault(stratum(labels), []).append(i)
  place = {}
  for members in groups.values():
    members.sort(key=lambda i: digest[i])
    for rank, i in enumerate(members):
      place[i] = ((rank + 0.5) / len(members), digest[i])
  return sorted(range(len(study_uids)), key=lambda i: place[i])


def subset_size(fraction: float, total: int) -> int:
  """How many of `total` studies the fraction keeps (at least one)."""
  if not 0.0 < fraction <= 1.0:
    raise ValueError(f"train_fraction must be in (0, 1], got {fraction}")
  return max(1, math.ceil(fraction * total - 1e-9))


class Subset(Sequence):
  """A random-access view of some records of a source (in the given order)."""

  def __init__(self, source: Sequence[Any], indices: Sequence[int]):
    self.source = source
    self.indices = [int(i) for i in indices]

  def __len__(self) -> int:
    return len(self.indices)

  def __getitem__(self, i):
    if isinstance(i, slice):
      return [self.source[j] for j in self.indices[i]]
    return self.source[self.indices[i]]
