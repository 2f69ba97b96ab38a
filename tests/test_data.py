"""Tests for jaxprune.data on the real shipped CIFAR-10 / MNIST subsets.

Fake data is used only where real data cannot exist offline: the tfds and
ImageNet code paths, and a CIFAR-100 file assembled from real CIFAR-10 records.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import re
import subprocess
import sys

import numpy as np
import pytest

import jaxprune.data as jd
from jaxprune.data import assets, registry

CIFAR_BIN = assets.CIFAR10_SUBSET_DIR / "cifar-10-batches-bin"
ONE_HOST = {"shard_index": 0, "shard_count": 1}


def _to_uint8(batch_images: np.ndarray, name: str) -> np.ndarray:
  """Inverts the pipeline's normalisation (exact up to float rounding)."""
  info = jd.get_info(name)
  x = (batch_images * np.asarray(info.std) + np.asarray(info.mean)) * 255
  return np.rint(x).astype(np.uint8)


def _take(it, n):
  return [next(it) for _ in range(n)]


def _assert_same_batches(a, b):
  assert len(a) == len(b)
  for x, y in zip(a, b):
    np.testing.assert_array_equal(x["image"], y["image"])
    np.testing.assert_array_equal(x["label"], y["label"])


# ---------------------------------------------------------------- readers


def test_cifar10_subset_counts_labels_and_dtypes():
  x_tr, y_tr = jd.load_arrays("cifar10_subset", "train")
  x_te, y_te = jd.load_arrays("cifar10_subset", "test")
  assert x_tr.shape == (5085, 32, 32, 3) and x_te.shape == (1017, 32, 32, 3)
  assert x_tr.dtype == np.uint8 and y_tr.dtype == np.int32
  assert y_tr[:5].tolist() == [6, 9, 9, 4, 1]
  assert y_te[:5].tolist() == [3, 8, 8, 0, 6]
  assert set(np.unique(y_tr)) == set(range(10))
  # Roughly balanced per file, as the README states (86..114 per class).
  counts = np.bincount(y_tr[:1017], minlength=10)
  assert counts.min() >= 86 and counts.max() <= 114
  # The train split is data_batch_1..5 concatenated in order.
  x5, y5 = jd.read_cifar_binary_file(CIFAR_BIN / "data_batch_5.bin")
  np.testing.assert_array_equal(x_tr[-1017:], x5)
  np.testing.assert_array_equal(y_tr[-1017:], y5)


def test_shipped_files_match_readme_sha256():
  readme = (assets.ASSETS_DIR / "README.md").read_text()
  expected = dict((path, digest) for digest, path in re.findall(r"^([0-9a-f]{64})\s+(\S+)$", readme, re.M))
  assert len(expected) == 10
  for rel, digest in expected.items():
    data = (assets.ASSETS_DIR / rel).read_bytes()
    assert hashlib.sha256(data).hexdigest() == digest, rel
  shipped = {
    str(p.relative_to(assets.ASSETS_DIR))
    for p in assets.ASSETS_DIR.glob("*/**/*")
    if p.is_file() and p.suffix in (".bin", ".gz")
  }
  assert shipped == set(expected)


def test_cifar_binary_layout_by_hand():
  """Decodes test record 0 (and record 7) from raw byte offsets."""
  raw = (CIFAR_BIN / "test_batch.bin").read_bytes()
  assert len(raw) == 1017 * 3073
  images, labels = jd.read_cifar_binary_file(CIFAR_BIN / "test_batch.bin")
  for rec in (0, 7):
    base = rec * 3073
    assert raw[base] == labels[rec]
    for y, x in ((0, 0), (5, 17), (31, 30)):
      for c in range(3):  # 1024 R, then 1024 G, then 1024 B bytes
        offset = base + 1 + c * 1024 + y * 32 + x
        assert images[rec, y, x, c] == raw[offset], (rec, y, x, c)
  assert labels[0] == raw[0] == 3


def test_cifar_truncated_file_is_rejected(tmp_path):
  bad = tmp_path / "data_batch_1.bin"
  bad.write_bytes((CIFAR_BIN / "test_batch.bin").read_bytes()[:5000])
  with pytest.raises(jd.CorruptDataError, match="3073-byte records"):
    jd.read_cifar_binary_file(bad)


def test_mnist_counts_and_classes():
  x_tr, y_tr = jd.load_arrays("mnist_subset", "train")
  x_te, y_te = jd.load_arrays("mnist_subset", "test")
  assert x_tr.shape == (4000, 28, 28, 1) and x_te.shape == (1000, 28, 28, 1)
  assert x_tr.dtype == np.uint8 and y_tr.dtype == np.int32
  assert np.bincount(y_tr).tolist() == [400] * 10
  assert np.bincount(y_te).tolist() == [100] * 10
  assert x_tr.max() == 255 and x_tr.mean() < 60  # white digits on black


def test_mnist_32x3_variant():
  x, y = jd.load_arrays("mnist_subset", "test")
  x32, y32 = jd.load_arrays("mnist_subset_32x3", "test")
  assert x32.shape == (1000, 32, 32, 3)
  np.testing.assert_array_equal(y, y32)
  for c in range(3):
    np.testing.assert_array_equal(x32[:, 2:30, 2:30, c], x[..., 0])
  assert not x32[:, :2].any() and not x32[:, :, -2:].any()
  info = jd.get_info("mnist_subset_32x3")
  assert info.image_shape == (32, 32, 3) and len(info.mean) == 3


def test_mnist_bad_magic_and_bad_gzip(tmp_path):
  raw = gzip.open(assets.MNIST_SUBSET_DIR / "t10k-labels-idx1-ubyte.gz").read()
  assert raw[:4] == bytes([0, 0, 8, 1])
  # A label file where an image file is expected: wrong magic number.
  d = tmp_path / "mnist"
  d.mkdir()
  for name in ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"):
    with gzip.open(d / name, "wb") as f:
      f.write(raw)
  with pytest.raises(jd.CorruptDataError, match="magic number 0x00000801"):
    jd.load_mnist_idx(d, "test")
  # Corrupt magic bytes.
  with gzip.open(d / "t10k-images-idx3-ubyte.gz", "wb") as f:
    f.write(b"\x12\x34" + raw[2:])
  with pytest.raises(jd.CorruptDataError, match="magic"):
    jd.read_idx_file(d / "t10k-images-idx3-ubyte.gz")
  # Truncated payload.
  with gzip.open(d / "t10k-labels-idx1-ubyte.gz", "wb") as f:
    f.write(raw[:-10])
  with pytest.raises(jd.CorruptDataError, match="truncated"):
    jd.read_idx_file(d / "t10k-labels-idx1-ubyte.gz")
  # Not gzip at all.
  (d / "t10k-labels-idx1-ubyte.gz").write_bytes(b"not a gzip file")
  with pytest.raises(jd.CorruptDataError, match="gzip"):
    jd.read_idx_file(d / "t10k-labels-idx1-ubyte.gz")


def test_cifar10_and_cifar100_from_local_binary_dirs(tmp_path):
  # `cifar10` accepts any folder holding cifar-10-batches-bin.
  x, y = jd.load_arrays("cifar10", "test", data_dir=assets.CIFAR10_SUBSET_DIR)
  x_ref, y_ref = jd.load_arrays("cifar10_subset", "test")
  np.testing.assert_array_equal(x, x_ref)
  np.testing.assert_array_equal(y, y_ref)
  # CIFAR-100 layout (coarse byte, fine byte, 3072 pixels), built from real
  # CIFAR-10 records with coarse = fine // 2.
  root = tmp_path / "cifar-100-binary"
  root.mkdir()
  recs = np.frombuffer((CIFAR_BIN / "test_batch.bin").read_bytes(), np.uint8)
  recs = recs.reshape(-1, 3073)[:50]
  c100 = np.concatenate([recs[:, :1] // 2, recs], axis=1)
  (root / "train.bin").write_bytes(c100[:30].tobytes())
  (root / "test.bin").write_bytes(c100[30:].tobytes())
  x100, y100 = jd.load_arrays("cifar100", "test", data_dir=tmp_path)
  np.testing.assert_array_equal(x100, x_ref[30:50])
  np.testing.assert_array_equal(y100, y_ref[30:50])
  _, coarse = jd.load_cifar100_binary(root, "train", label="coarse")
  np.testing.assert_array_equal(coarse, y_ref[:30] // 2)
  assert jd.get_info("cifar100").num_classes == 100


# ---------------------------------------------------------------- registry


def test_info():
  info = jd.get_info("cifar10_subset")
  assert (info.num_classes, info.image_shape) == (10, (32, 32, 3))
  assert (info.train_size, info.test_size) == (5085, 1017)
  assert info.mean == (0.4914, 0.4822, 0.4465)
  assert info.std == (0.2470, 0.2435, 0.2616)
  assert jd.get_info("mnist_subset").image_shape == (28, 28, 1)
  assert jd.get_info("cifar10").train_size == 50000
  assert jd.get_info("imagenet2012").image_shape == (224, 224, 3)
  assert jd.DEFAULT_DATASET in jd.available_datasets()
  # Measured mean/std of the shipped CIFAR subset agree with the constants.
  x, _ = jd.load_arrays("cifar10_subset", "train")
  np.testing.assert_allclose(x.mean((0, 1, 2)) / 255, info.mean, atol=0.01)
  np.testing.assert_allclose(x.std((0, 1, 2)) / 255, info.std, atol=0.01)


def test_unknown_name_lists_valid_names():
  with pytest.raises(ValueError, match="cifar10_subset.*mnist_subset"):
    jd.get_info("cifar11")
  with pytest.raises(ValueError, match="valid names"):
    jd.train_iterator("svhn", batch_size=8, seed=0, **ONE_HOST)


def test_missing_cifar_dir_raises_helpful_error(tmp_path):
  missing = tmp_path / "nowhere"
  with pytest.raises(jd.DataNotFoundError) as e:
    jd.train_iterator("cifar10", batch_size=8, seed=0, data_dir=missing, **ONE_HOST)
  msg = str(e.value)
  assert isinstance(e.value, FileNotFoundError)
  assert str(missing) in msg
  assert "cifar-10-binary.tar.gz" in msg and "cifar-10-batches-bin" in msg
  assert "tfds build cifar10" in msg and "cifar10_subset" in msg
  # A binary folder with a missing batch names the exact file.
  partial = tmp_path / "partial" / "cifar-10-batches-bin"
  partial.mkdir(parents=True)
  (partial / "test_batch.bin").write_bytes((CIFAR_BIN / "test_batch.bin").read_bytes())
  assert len(jd.open_split("cifar10", "test", data_dir=partial.parent)) == 1017
  with pytest.raises(jd.DataNotFoundError, match="data_batch_1.bin"):
    jd.open_split("cifar10", "train", data_dir=partial.parent)


def test_tfds_path_with_missing_or_empty_data_dir(tmp_path):
  pytest.importorskip("tensorflow_datasets", reason="tfds not installed")
  with pytest.raises(jd.DataNotFoundError, match="does not exist.*tfds build"):
    jd.open_split("imagenet2012", "test", data_dir=tmp_path / "none")
  with pytest.raises(jd.DataNotFoundError, match="ILSVRC2012_img_train.tar"):
    jd.open_split("imagenet2012", "train", data_dir=tmp_path / "none")
  # An existing folder without the prepared data set (tfds is imported).
  (tmp_path / "cifar10").mkdir()
  with pytest.raises(jd.DataNotFoundError, match="not prepared"):
    jd.open_split("cifar10", "train", data_dir=tmp_path)
  assert list(tmp_path.iterdir()) == [tmp_path / "cifar10"]  # nothing written


def test_default_path_imports_neither_tfds_nor_tensorflow():
  code = (
    "import sys, jaxprune.data as jd\n"
    "it = jd.train_iterator(batch_size=64, seed=0, shard_index=0, shard_count=1)\n"
    "next(it); list(jd.eval_batches(batch_size=512))\n"
    "jd.load_arrays('mnist_subset_32x3')\n"
    "print(sorted(m for m in sys.modules if m.split('.')[0] in "
    "('tensorflow', 'tensorflow_datasets')))\n"
  )
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120)
  assert out.stdout.strip() == "[]", out.stdout


# ---------------------------------------------------------------- augmentation


def test_random_crop_flip_is_a_window_of_the_padded_image():
  rng = np.random.default_rng(0)
  image = rng.integers(1, 256, (32, 32, 3), dtype=np.uint8)  # no zeros
  padded = np.pad(image, ((4, 4), (4, 4), (0, 0)))
  windows = {}
  for oy in range(9):
    for ox in range(9):
      w = padded[oy : oy + 32, ox : ox + 32]
      windows[w.tobytes()] = (oy, ox, False)
      windows[w[:, ::-1].tobytes()] = (oy, ox, True)
  seen = set()
  for _ in range(400):
    out = jd.random_crop_flip(image, rng)
    assert out.shape == image.shape and out.dtype == image.dtype
    seen.add(windows[out.tobytes()])  # KeyError if not a shifted window
  assert len({s[2] for s in seen}) == 2  # both flipped and unflipped
  assert {s[0] for s in seen} == set(range(9))  # every vertical offset
  no_flip = jd.random_crop_flip(image, rng, pad=0, flip=False)
  np.testing.assert_array_equal(no_flip, image)


def test_pipeline_augmentation_is_crop_flip_of_the_same_records():
  kw = dict(batch_size=32, seed=3, **ONE_HOST)
  plain = next(jd.train_iterator("cifar10_subset", augment=False, **kw))
  augmented = next(jd.train_iterator("cifar10_subset", augment=True, **kw))
  np.testing.assert_array_equal(plain["label"], augmented["label"])
  raw = _to_uint8(plain["image"], "cifar10_subset")
  aug = _to_uint8(augmented["image"], "cifar10_subset")
  x, _ = jd.load_arrays("cifar10_subset", "train")
  known = {img.tobytes() for img in x}
  assert all(img.tobytes() in known for img in raw)  # exact normalisation
  for r, a in zip(raw, aug):
    padded = np.pad(r, ((4, 4), (4, 4), (0, 0)))
    assert any(
      np.array_equal(a, w) or np.array_equal(a, w[:, ::-1])
      for w in (padded[i : i + 32, j : j + 32] for i in range(9) for j in range(9))
    )
  assert not np.array_equal(raw, aug)


def test_train_batches_format_and_determinism():
  kw = dict(batch_size=64, **ONE_HOST)
  a = _take(jd.train_iterator("cifar10_subset", seed=1, **kw), 3)
  b = _take(jd.train_iterator("cifar10_subset", seed=1, num_threads=0, **kw), 3)
  c = _take(jd.train_iterator("cifar10_subset", seed=2, num_threads=4, **kw), 3)
  assert a[0]["image"].shape == (64, 32, 32, 3)
  assert a[0]["image"].dtype == np.float32 and a[0]["label"].dtype == np.int32
  _assert_same_batches(a, b)  # same seed, any thread count
  assert not np.array_equal(a[0]["label"], c[0]["label"])
  assert not np.array_equal(a[0]["image"], c[0]["image"])
  # Normalised statistics are roughly zero-mean, unit-std (unaugmented: the
  # zero padding of crops pulls the mean down by ~0.25).
  plain = _take(jd.train_iterator("cifar10_subset", seed=1, augment=False, **kw), 3)
  x = np.concatenate([t["image"] for t in plain])
  assert abs(x.mean()) < 0.15 and 0.85 < x.std() < 1.15


def test_epochs_are_permutations_and_reshuffled():
  it = jd.train_iterator("cifar10_subset", batch_size=1000, seed=0, augment=False, num_epochs=2, **ONE_HOST)
  batches = list(it)
  steps = jd.steps_per_epoch("cifar10_subset", 1000, shard_count=1)
  assert steps == 5 and len(batches) == 2 * steps
  x, _ = jd.load_arrays("cifar10_subset", "train")
  index = {img.tobytes(): i for i, img in enumerate(x)}
  assert len(index) == len(x)  # no duplicate images in the subset
  epochs = []
  for e in range(2):
    imgs = np.concatenate([_to_uint8(b["image"], "cifar10_subset") for b in batches[e * steps : (e + 1) * steps]])
    ids = [index[img.tobytes()] for img in imgs]
    assert len(set(ids)) == 5000  # no record twice within an epoch
    epochs.append(ids)
  assert epochs[0] != epochs[1]
  assert jd.steps_per_epoch("cifar10_subset", 128, shard_count=1) == 39


def test_resume_from_state():
  kw = dict(batch_size=128, seed=7, **ONE_HOST)
  it = jd.train_iterator("cifar10_subset", **kw)
  _take(it, 37)
  state = it.get_state()
  assert state == {"next_index": 37}
  state = json.loads(json.dumps(state))  # checkpointable as JSON
  expected = _take(it, 4)  # crosses the epoch boundary at batch 39
  fresh = jd.train_iterator("cifar10_subset", **kw)
  fresh.set_state(state)
  _assert_same_batches(_take(fresh, 4), expected)


def test_shards_partition_the_train_set():
  n = 5085
  s0, s1 = jd.shard_indices(n, 0, 2), jd.shard_indices(n, 1, 2)
  assert not set(s0) & set(s1) and set(s0) | set(s1) == set(range(n))
  # The iterators read from their own shard only; both run the same number
  # of steps (2542 records per host; one record of shard 0 left out per epoch).
  x, _ = jd.load_arrays("cifar10_subset", "train")
  index = {img.tobytes(): i for i, img in enumerate(x)}
  seen = []
  for shard in range(2):
    it = jd.train_iterator(
      "cifar10_subset", batch_size=1271, seed=0, augment=False, num_epochs=1, shard_index=shard, shard_count=2
    )
    imgs = np.concatenate([_to_uint8(b["image"], "cifar10_subset") for b in it])
    seen.append({index[img.tobytes()] for img in imgs})
  assert len(seen[0]) == len(seen[1]) == 2542
  assert seen[0] <= set(s0) and seen[1] <= set(s1)
  assert jd.steps_per_epoch("cifar10_subset", 1271, shard_count=2) == 2


def test_batch_larger_than_shard_is_rejected():
  with pytest.raises(ValueError, match="per-host batch_size"):
    jd.train_iterator("cifar10_subset", batch_size=4000, seed=0, shard_index=0, shard_count=2)


def test_mnist_train_iterator_shapes():
  b = next(jd.train_iterator("mnist_subset", batch_size=16, seed=0, **ONE_HOST))
  assert b["image"].shape == (16, 28, 28, 1)
  b = next(jd.train_iterator("mnist_subset_32x3", batch_size=16, seed=0, **ONE_HOST))
  assert b["image"].shape == (16, 32, 32, 3)


# ---------------------------------------------------------------- eval


def test_eval_batches_in_order_with_smaller_last_batch():
  batches = list(jd.eval_batches("cifar10_subset", batch_size=250))
  assert [len(b["label"]) for b in batches] == [250] * 4 + [17]
  x, y = jd.load_arrays("cifar10_subset", "test")
  np.testing.assert_array_equal(np.concatenate([b["label"] for b in batches]), y)
  imgs = np.concatenate([_to_uint8(b["image"], "cifar10_subset") for b in batches])
  np.testing.assert_array_equal(imgs, x)
  assert batches[0]["image"].dtype == np.float32
  train = list(jd.eval_batches("mnist_subset", "train", batch_size=1000))
  assert len(train) == 4 and train[0]["image"].shape == (1000, 28, 28, 1)
  halves = [
    np.concatenate(
      [b["label"] for b in jd.eval_batches("cifar10_subset", batch_size=100, shard_index=i, shard_count=2)]
    )
    for i in range(2)
  ]
  assert len(halves[0]) + len(halves[1]) == 1017


# ---------------------------------------------------------------- ImageNet logic (fake)


def test_imagenet_transforms_shapes():
  rng = np.random.default_rng(0)
  for h, w in ((300, 400), (500, 240), (230, 230), (60, 900)):
    img = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    assert jd.random_resized_crop(img, rng).shape == (224, 224, 3)
    assert jd.resize_center_crop(img).shape == (224, 224, 3)
  img = rng.integers(0, 256, (7, 9, 3), dtype=np.uint8)
  np.testing.assert_array_equal(jd.resize_bilinear(img, (7, 9)), img)
  flat = np.full((40, 50, 3), 77, np.uint8)
  assert (jd.resize_bilinear(flat, (13, 31)) == 77).all()
  # Centre crop of a resized image keeps the centre.
  marker = np.zeros((256, 512, 3), np.uint8)
  marker[118:138, 246:266] = 255
  out = jd.resize_center_crop(marker)
  assert out[112, 112].tolist() == [255, 255, 255] and out[0, 0].sum() == 0


def test_variable_size_source_through_the_pipeline(monkeypatch):
  """The tfds/ImageNet path, with an in-memory stand-in for the tfds source."""
  from jaxprune.data import tfds_source

  rng = np.random.default_rng(0)
  records = [{"image": rng.integers(0, 256, (40 + 7 * i, 60 - 3 * i, 3), dtype=np.uint8), "label": i} for i in range(6)]
  records.append({"image": np.zeros((50, 50, 1), np.uint8), "label": 6})
  source = tfds_source.TfdsRecordSource(records)
  info = registry.DatasetInfo("fake_imagenet", 1000, (224, 224, 3), 7, 7, registry.IMAGENET_MEAN, registry.IMAGENET_STD)
  monkeypatch.setitem(
    registry._REGISTRY, "fake_imagenet", registry._Spec(info, lambda split, data_dir: source, "imagenet")
  )
  b = next(jd.train_iterator("fake_imagenet", batch_size=4, seed=0, **ONE_HOST))
  assert b["image"].shape == (4, 224, 224, 3) and b["label"].dtype == np.int32
  evals = list(jd.eval_batches("fake_imagenet", batch_size=4))
  assert [e["image"].shape for e in evals] == [(4, 224, 224, 3), (3, 224, 224, 3)]
  assert np.concatenate([e["label"] for e in evals]).tolist() == list(range(7))
  registry._open_cached.cache_clear()


# ------------------------------------------------ bad data, caught on open


@pytest.mark.parametrize(
  "name,change,match",
  [
    ("empty", lambda x, y: (x[:0], y[:0]), "is empty"),
    ("float01", lambda x, y: (x / 255.0, y), r"dtype float64.*np.round\(x \* 255\)"),
    ("grey", lambda x, y: (x[..., 0], y), r"shape \(32, 32\).*\(32, 32, 3\).*x\[\.\.\., None\]"),
    ("labels1to10", lambda x, y: (x, y + 1), r"labels range over 1\.\.10.*\[0, 10\)"),
    ("floatlabels", lambda x, y: (x, y.astype(np.float32)), "labels have dtype float32"),
  ],
)
def test_bad_arrays_are_refused_when_a_data_set_is_opened(name, change, match):
  """A registered data set whose arrays the pipelines would use silently wrong
  (real CIFAR-10 subset records, changed one way each)."""
  x, y = jd.load_arrays("cifar10_subset", "test")

  def loader(split, data_dir):
    return jd.ArraySource(*change(np.array(x), np.array(y)))

  info = jd.get_info("cifar10_subset")
  bad = f"bad_{name}"
  registry.register(registry.dataclasses.replace(info, name=bad), loader, "cifar")
  try:
    with pytest.raises(ValueError, match=match):
      jd.train_iterator(bad, batch_size=8, seed=0, **ONE_HOST)
    with pytest.raises(ValueError, match=bad):
      list(jd.eval_batches(bad, "test", batch_size=8))
  finally:
    registry._REGISTRY.pop(bad)
  # the shipped data sets pass the same checks
  registry.check_arrays(info, "test", x, y)
