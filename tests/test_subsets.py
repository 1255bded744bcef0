"""Training-size subsets: reproducible, nested, label-stratified; and a run trains on its fold's subset only."""

from __future__ import annotations

import collections

import numpy as np
import pytest

import tiny_training
from ccfnet_jax import losses
from ccfnet_jax.data import records, subsets
from ccfnet_jax.train import setup
from test_train import phantom_data_dir  # noqa: F401  (fixture)


def _studies(n: int, seed: int = 0):
  rng = np.random.default_rng(seed)
  uids = [f"1.2.3.{seed}.{i}" for i in range(n)]
  disease = (rng.uniform(size=(n, 11)) < rng.uniform(0.1, 0.9, size=(n, 1))).astype(np.int32)
  return uids, disease


def test_subsets_are_nested_reproducible_and_independent_of_input_order():
  uids, disease = _studies(120)
  order = subsets.nested_order(uids, disease, salt="seed0")
  chosen = {f: set(order[:subsets.subset_size(f, len(order))]) for f in (0.25, 0.5, 0.75, 1.0)}
  assert chosen[0.25] <= chosen[0.5] <= chosen[0.75] <= chosen[1.0] == set(range(120))
  assert [len(chosen[f]) for f in (0.25, 0.5, 0.75)] == [30, 60, 90]
  # The same studies whatever order they come in (another machine's directory order).
  perm = np.random.default_rng(5).permutation(120)
  shuffled = subsets.nested_order([uids[i] for i in perm], disease[perm], salt="seed0")
  assert {uids[perm[i]] for i in shuffled[:30]} == {uids[i] for i in order[:30]}
  assert subsets.nested_order(uids, disease, salt="seed1")[:30] != order[:30]


def test_each_stratum_keeps_its_share():
  uids, disease = _studies(200, seed=3)
  strata = [subsets.stratum(d) for d in disease]
  order = subsets.nested_order(uids, disease)
  total = collections.Counter(strata)
  for fraction in (0.25, 0.5):
    kept = collections.Counter(strata[i] for i in order[:subsets.subset_size(fraction, 200)])
    for key, n in total.items():
      assert abs(kept[key] - fraction * n) <= 1.0, (fraction, key, kept[key], n)


def test_stratum_buckets_the_diseased_counts():
  labels = np.zeros(11, np.int32)
  assert subsets.stratum(labels) == (0, 0)
  labels[[0, 1, 2, 5]] = 1  # three vertebrae, one disc
  assert subsets.stratum(labels) == (2, 1)
  with pytest.raises(ValueError, match=r"\(0, 1\]"):
    subsets.subset_size(0.0, 10)


def test_a_fold_trains_on_its_subset_with_the_subsets_pos_weight(tmp_path, phantom_data_dir):  # noqa: F811
  full = setup.open_fold(tiny_training.tiny_config(data_dir=phantom_data_dir), 1, str(tmp_path))
  half = setup.open_fold(tiny_training.tiny_config(data_dir=phantom_data_dir, train_fraction=0.5), 1, str(tmp_path))
  assert len(full.train_source) == 12 and len(half.train_source) == 6
  uids = lambda source: {source[i]["study_uid"] for i in range(len(source))}  # noqa: E731
  assert uids(half.train_source) < uids(full.train_source)
  assert uids(half.val_source) == uids(full.val_source)  # the held-out fold is untouched
  counts = losses.label_counts(records.disease_labels(half.train_source))
  assert half.label_counts == counts
  assert half.pos_weight == (losses.class_balanced_pos_weight(*counts["vertebra"]),
                             losses.class_balanced_pos_weight(*counts["disc"]))
