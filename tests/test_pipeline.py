"""Tests of the host input pipeline (ccfnet_jax.data.pipeline), of reading a source's labels (records.disease_labels)
and of the sources of one fold (tfds_spine.open_fold)."""

import itertools

import jax
import numpy as np
import pytest

import tfds_spine
from ccfnet_jax import losses, objects, parallel
from ccfnet_jax.data import errors, pipeline
from ccfnet_jax.data import records as records_lib

S = 64
N_OBJ = objects.NUM_OBJECTS


def _record(index: int, hw=(96, 80)) -> dict:
  """A tiny study: a Gaussian dot (sigma 3 native px) at point 0 in every channel; uint16 like the real records."""
  rng = np.random.default_rng(index)
  h, w = hw
  points = np.stack([rng.uniform(0.3 * w, 0.7 * w, N_OBJ), rng.uniform(0.3 * h, 0.7 * h, N_OBJ)], -1)
  valid = rng.random(N_OBJ) > 0.2
  disease = np.where(valid, rng.integers(0, 2, N_OBJ), -1)
  ys, xs = np.meshgrid(np.arange(h) + 0.5, np.arange(w) + 0.5, indexing="ij")
  dot = np.exp(-((xs - points[0, 0]) ** 2 + (ys - points[0, 1]) ** 2) / (2 * 3.0**2))
  image = np.repeat((dot * 65535).round().astype(np.uint16)[..., None], 3, axis=-1)
  return {
      "image": image,
      "pixel_spacing_mm": np.asarray([0.7, 0.6], np.float32),
      "points_xy": points.astype(np.float32),
      "point_valid": valid,
      "disease": disease.astype(np.int32),
      "tags": np.asarray(np.where(valid, "v1", ""), np.str_),
      "study_uid": f"study{index}".encode(),
      "series_uid": b"series",
      "instance_uid": b"instance",
  }


@pytest.fixture(scope="module")
def records():
  return [_record(i, hw=(96, 80) if i % 2 else (120, 160)) for i in range(10)]


def _take(iterator, n):
  return list(itertools.islice(iterator, n))


def test_train_batch_contract(records):
  batch = next(iter(pipeline.train_dataset(records, batch_size=4, image_size=S, seed=0)))
  expected = {
      "image": ((4, S, S, 3), np.float32), "points_xy": ((4, N_OBJ, 2), np.float32),
      "points_xy_native": ((4, N_OBJ, 2), np.float32), "native_hw": ((4, 2), np.int32),
      "pixel_spacing_mm": ((4, 2), np.float32), "point_valid": ((4, N_OBJ), np.bool_),
      "disease": ((4, N_OBJ), np.int32), "example_valid": ((4,), np.bool_), "record_index": ((4,), np.int32),
  }
  assert set(batch) == set(expected) == set(pipeline.BATCH_KEYS)
  for key, (shape, dtype) in expected.items():
    assert batch[key].shape == shape and batch[key].dtype == dtype, key
  assert 0.0 <= batch["image"].min() and batch["image"].max() <= 1.0 and batch["image"].max() > 0.5
  assert batch["example_valid"].all()
  for row, index in enumerate(batch["record_index"]):
    record = records[index]
    np.testing.assert_array_equal(batch["disease"][row], record["disease"])
    np.testing.assert_array_equal(batch["native_hw"][row], record["image"].shape[:2])
    np.testing.assert_array_equal(batch["points_xy_native"][row], record["points_xy"])


def test_resize_keeps_points_on_the_dot(records):
  ds = pipeline.eval_dataset(records, batch_size=10, image_size=S)
  (batch,) = list(ds)
  for row, record in enumerate(records):
    h, w = record["image"].shape[:2]
    expected = record["points_xy"][0] * np.asarray([S / w, S / h])  # stretched: x * S / W, y * S / H
    np.testing.assert_allclose(batch["points_xy"][row, 0], expected, rtol=1e-6)
    image = batch["image"][row, ..., 1].astype(np.float64)
    centres = np.arange(S) + 0.5
    centroid = [(image.sum(0) * centres).sum() / image.sum(), (image.sum(1) * centres).sum() / image.sum()]
    np.testing.assert_allclose(centroid, expected, atol=0.25)
    flat = image.argmax()
    np.testing.assert_allclose([flat % S + 0.5, flat // S + 0.5], expected, atol=1.0)


def test_shuffle_reproducible_and_epochs_complete(records):
  def order(seed, n_batches=5):
    ds = pipeline.train_dataset(records, batch_size=2, image_size=S, seed=seed)
    return np.concatenate([b["record_index"] for b in _take(iter(ds), n_batches)])

  first = order(0)
  np.testing.assert_array_equal(first, order(0))
  assert not np.array_equal(first, order(1))
  assert sorted(first) == list(range(10)), "one epoch (5 batches of 2) holds every record once"
  assert not np.array_equal(first, np.arange(10)), "shuffled"
  two_epochs = order(0, 10)
  assert sorted(two_epochs[10:]) == list(range(10)) and not np.array_equal(two_epochs[:10], two_epochs[10:])


def test_iterator_state_resumes_the_same_batches(records):
  ds = pipeline.train_dataset(records, batch_size=4, image_size=S, seed=3)
  it = iter(ds)
  _take(it, 3)
  state = it.get_state()
  following = _take(it, 3)
  resumed = iter(pipeline.train_dataset(records, batch_size=4, image_size=S, seed=3))
  resumed.set_state(state)
  for a, b in zip(following, _take(resumed, 3)):
    for key in a:
      np.testing.assert_array_equal(a[key], b[key], err_msg=key)


def test_eval_pads_last_batch(records):
  batches = list(pipeline.eval_dataset(records, batch_size=4, image_size=S))
  assert len(batches) == 3 == pipeline.num_eval_batches(10, 4)
  assert all(b["image"].shape == (4, S, S, 3) for b in batches)
  valid = np.concatenate([b["example_valid"] for b in batches])
  np.testing.assert_array_equal(valid, [True] * 10 + [False] * 2)
  index = np.concatenate([b["record_index"] for b in batches])
  np.testing.assert_array_equal(index, list(range(10)) + [-1, -1])
  last = batches[-1]
  assert (last["disease"][2:] == -1).all() and not last["point_valid"][2:].any() and (last["image"][2:] == 0).all()


def test_eval_shards_are_disjoint_and_equally_long(records):
  per_host = [list(pipeline.eval_dataset(records, batch_size=6, image_size=S, process_index=i, process_count=3))
              for i in range(3)]
  assert len({len(b) for b in per_host}) == 1  # every host runs the same number of steps
  seen = [np.concatenate([b["record_index"][b["example_valid"]] for b in host]) for host in per_host]
  assert sorted(np.concatenate(seen)) == list(range(10))
  with pytest.raises(ValueError, match="multiple of process_count"):
    pipeline.train_dataset(records, batch_size=3, image_size=S, seed=0, process_index=0, process_count=2)


def test_bad_records_are_named(records):
  missing = dict(records[0])
  del missing["disease"]
  with pytest.raises(errors.StudyError, match=r"record 0 \(study_uid study0\).*'disease'"):
    list(pipeline.eval_dataset([missing], batch_size=1, image_size=S))
  wrong = {**records[1], "image": records[1]["image"].astype(np.float32)}
  with pytest.raises(errors.StudyError, match="study1.*uint16"):
    pipeline.to_example(wrong, S, 1)
  with pytest.raises(ValueError, match="empty"):
    pipeline.eval_dataset([], batch_size=1, image_size=S)


def test_host_batches_shard_on_eight_devices(records):
  assert jax.device_count() == 8
  mesh = jax.sharding.Mesh(np.asarray(jax.devices()), ("data",))
  batch = next(iter(pipeline.train_dataset(records, batch_size=8, image_size=S, seed=0)))
  placed = parallel.host_to_global(batch, mesh)
  for key, value in batch.items():
    assert placed[key].shape == value.shape and placed[key].dtype == value.dtype, key
    assert placed[key].sharding.spec == jax.sharding.PartitionSpec("data")
    assert len(placed[key].addressable_shards) == 8
    np.testing.assert_array_equal(np.asarray(placed[key]), value, err_msg=key)
  assert placed["image"].addressable_shards[0].data.shape == (1, S, S, 3)
  with pytest.raises(ValueError, match="image"):
    parallel.host_to_global({"image": batch["image"][:6]}, mesh)


def test_label_counts(records):
  counts = losses.label_counts(records_lib.disease_labels(records))
  disease = np.stack([r["disease"] for r in records])
  vertebra, disc = disease[:, list(objects.VERTEBRA_INDICES)], disease[:, list(objects.DISC_INDICES)]
  assert counts == {"vertebra": (int((vertebra == 0).sum()), int((vertebra == 1).sum())),
                    "disc": (int((disc == 0).sum()), int((disc == 1).sum()))}
  assert sum(counts["vertebra"]) + sum(counts["disc"]) == int((disease >= 0).sum())


def test_worker_processes_give_the_same_batches_and_resume(records):
  def indices(iterator, n):
    return [np.asarray(b["record_index"]).tolist() for b in _take(iterator, n)]

  options = pipeline.PipelineOptions(worker_count=1)
  reference = indices(iter(pipeline.train_dataset(records, batch_size=2, image_size=S, seed=5)), 8)
  it = iter(pipeline.train_dataset(records, batch_size=2, image_size=S, seed=5, options=options))
  assert indices(it, 6) == reference[:6]
  state = it.get_state()
  assert indices(it, 2) == reference[6:]
  it.close()
  resumed = iter(pipeline.train_dataset(records, batch_size=2, image_size=S, seed=5, options=options))
  resumed.set_state(state)
  assert indices(resumed, 2) == reference[6:]
  resumed.close()


def test_open_fold_on_phantoms_feeds_the_pipeline(tmp_path):
  pytest.importorskip("ccfnet_jax.data.phantom")
  train, val = tfds_spine.open_fold("phantom", tmp_path, fold=1, num_studies=8)
  assert len(train) + len(val) == 8 and len(val) >= 1
  train_uids = {train[i]["study_uid"] for i in range(len(train))}
  val_uids = {val[i]["study_uid"] for i in range(len(val))}
  assert not train_uids & val_uids
  assert {int(val[i]["fold"]) for i in range(len(val))} == {1}
  assert 1 not in {int(train[i]["fold"]) for i in range(len(train))}
  (batch, *_) = list(pipeline.eval_dataset(val, batch_size=2, image_size=S))
  assert batch["image"].shape == (2, S, S, 3) and batch["example_valid"][0]
  counts = losses.label_counts(records_lib.disease_labels(train))
  assert sum(counts["vertebra"]) + sum(counts["disc"]) == sum(int((train[i]["disease"] >= 0).sum())
                                                               for i in range(len(train)))
  with pytest.raises(ValueError, match="fold"):
    tfds_spine.open_fold("phantom", tmp_path, fold=4)
  with pytest.raises(ValueError, match="manual_dir"):
    tfds_spine.open_fold("tianchi", tmp_path)


def test_augment_on_a_sharded_batch_equals_unsharded(records):
  from ccfnet_jax.data import augment  # pylint: disable=g-import-not-at-top

  mesh = jax.sharding.Mesh(np.asarray(jax.devices()), ("data",))
  batch = next(iter(pipeline.train_dataset(records, batch_size=8, image_size=S, seed=0)))
  fn = jax.jit(augment.augment_batch, static_argnames="cfg")
  cfg = augment.AugmentConfig.reference()
  sharded = fn(jax.random.key(0), parallel.host_to_global(batch, mesh), cfg=cfg)
  local = fn(jax.random.key(0), jax.device_put(batch, jax.devices()[0]), cfg=cfg)
  assert sharded["image"].sharding.spec == jax.sharding.PartitionSpec("data")
  for key in ("image", "points_xy", "point_valid", "disease"):
    np.testing.assert_allclose(np.asarray(sharded[key]), np.asarray(local[key]), atol=1e-5, err_msg=key)


@pytest.mark.parametrize("process_count", [2, 4])
def test_training_batches_do_not_depend_on_the_number_of_hosts(records, process_count):
  """The hosts' blocks, stacked in host order, are the batches one process reads: across epochs and after a resume."""
  def stream(process_index, count, state=None, steps=7):  # 7 batches of 4 = 2.8 epochs of the 10 records
    it = iter(pipeline.train_dataset(records, batch_size=4, image_size=S, seed=3, process_index=process_index,
                                     process_count=count))
    if state is not None:
      it.set_state(state)
    return [next(it) for _ in range(steps)], it.get_state()

  single, _ = stream(0, 1)
  hosts = [stream(p, process_count)[0] for p in range(process_count)]
  for step, batch in enumerate(single):
    for key in pipeline.BATCH_KEYS:
      np.testing.assert_array_equal(np.concatenate([host[step][key] for host in hosts]), batch[key], err_msg=key)
  order = np.concatenate([b["record_index"] for b in single])
  assert sorted(order[:8]) != list(order[:8]) or sorted(order[8:16]) != list(order[8:16])  # shuffled
  assert len(set(order[:10])) == 10 and len(set(order[10:20])) == 10  # each epoch sees every record once
  assert list(order[:10]) != list(order[10:20])  # reshuffled every epoch
  # A single-process checkpoint of the position resumes each host of a multi-host run at the same global batch.
  _, state = stream(0, 1, steps=3)
  resumed = [stream(p, process_count, state=state, steps=2)[0] for p in range(process_count)]
  for step in range(2):
    np.testing.assert_array_equal(np.concatenate([host[step]["record_index"] for host in resumed]),
                                  single[3 + step]["record_index"])


def test_calibration_batches_are_full_unpadded_in_order_and_split_by_host(records):
  single = list(pipeline.calibration_dataset(records, batch_size=4, image_size=S))
  assert len(single) == 2 and all(b["example_valid"].all() for b in single)  # 10 records: 2 full batches
  np.testing.assert_array_equal(np.concatenate([b["record_index"] for b in single]), np.arange(8))
  hosts = [list(pipeline.calibration_dataset(records, batch_size=4, image_size=S, process_index=p, process_count=2))
           for p in range(2)]
  for step, batch in enumerate(single):
    for key in pipeline.BATCH_KEYS:
      np.testing.assert_array_equal(np.concatenate([h[step][key] for h in hosts]), batch[key], err_msg=key)
  assert not list(pipeline.calibration_dataset(records[:3], batch_size=4, image_size=S))
