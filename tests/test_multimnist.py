"""MultiMNIST built from the shipped MNIST subset: determinism, labels, errors, pipelines."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import jaxprune.data as jd
from jaxprune.data import multimnist

ONE_HOST = {"shard_index": 0, "shard_count": 1}


@pytest.fixture(scope="module")
def digits():
  x, y = jd.load_arrays("mnist_subset", "test")
  return x[:300], y[:300]


def _rebuild(x, pair_left, pair_right, off_l, off_r):
  """One canvas drawn pixel by pixel with plain loops (independent of make's indexing)."""
  canvas = np.zeros((36, 36), np.uint8)
  for img, (r0, c0) in ((x[pair_left, :, :, 0], off_l), (x[pair_right, :, :, 0], off_r)):
    for r in range(28):
      for c in range(28):
        canvas[r0 + r, c0 + c] = max(canvas[r0 + r, c0 + c], img[r, c])
  return canvas


def test_images_and_labels_match_the_source_digits(digits):
  x, y = digits
  mm = multimnist.make(x, y, seed=3, tasks=("sum", "left", "right"))
  assert mm.images.shape == (300, 36, 36, 1) and mm.images.dtype == np.uint8
  assert mm.labels.shape == (300, 3) and mm.labels.dtype == np.int32
  np.testing.assert_array_equal(mm.left_index, np.arange(300))  # each image is a left digit once
  assert np.all(mm.right_index != mm.left_index)
  for i in range(0, 300, 37):
    np.testing.assert_array_equal(
      mm.images[i, :, :, 0], _rebuild(x, mm.left_index[i], mm.right_index[i], mm.left_offset[i], mm.right_offset[i])
    )
    left, right = y[mm.left_index[i]], y[mm.right_index[i]]
    assert mm.labels[i].tolist() == [left + right, left, right]
  # Placement: left digit top-left, right digit bottom-right, within max_shift.
  assert mm.left_offset.min() >= 0 and mm.left_offset.max() <= 2
  assert mm.right_offset.min() >= 6 and mm.right_offset.max() <= 8
  assert np.all(mm.left_offset[:, 1] < mm.right_offset[:, 1])


def test_a_digit_alone_shows_where_it_was_put(digits):
  # A blank right digit leaves exactly the left one, shifted, on the canvas.
  x, y = digits
  x = x[:2].copy()
  x[1] = 0
  mm = multimnist.make(x, y[:2], seed=0, max_shift=8)
  r, c = mm.left_offset[0]
  np.testing.assert_array_equal(mm.images[0, r : r + 28, c : c + 28], x[0])
  assert mm.images[0].sum() == x[0].sum()


def test_same_seed_same_data_other_seed_other_pairs(digits):
  x, y = digits
  a = multimnist.make(x, y, seed=0)
  b = multimnist.make(x, y, seed=0)
  c = multimnist.make(x, y, seed=1)
  for u, v in zip(a[:-1], b[:-1]):
    np.testing.assert_array_equal(u, v)
  assert not np.array_equal(a.right_index, c.right_index)
  assert not np.array_equal(a.images, c.images)


@settings(max_examples=15, deadline=None)
@given(n=st.integers(2, 40), seed=st.integers(0, 2**31), shift=st.integers(0, 8))
def test_labels_and_canvas_for_any_settings(n, seed, shift):
  x, y = jd.load_arrays("mnist_subset", "train")
  mm = multimnist.make(x[:n], y[:n], seed=seed, max_shift=shift, tasks=("left", "right", "sum"))
  np.testing.assert_array_equal(mm.labels[:, 0], y[:n][mm.left_index])
  np.testing.assert_array_equal(mm.labels[:, 1], y[:n][mm.right_index])
  np.testing.assert_array_equal(mm.labels[:, 2], mm.labels[:, 0] + mm.labels[:, 1])
  # Ink is conserved up to the overlap: max(a, b) <= a + b and >= each digit.
  ink = mm.images.reshape(n, -1).astype(int).sum(1)
  a = x[:n][mm.left_index].reshape(n, -1).astype(int).sum(1)
  b = x[:n][mm.right_index].reshape(n, -1).astype(int).sum(1)
  assert np.all(ink <= a + b) and np.all(ink >= np.maximum(a, b))
  assert mm.left_offset.max() <= shift and mm.right_offset.min() >= 8 - shift


@pytest.mark.parametrize(
  "kwargs, match",
  [
    ({"max_shift": 9}, "max_shift"),
    ({"max_shift": -1}, "max_shift"),
    ({"tasks": ("left", "middle")}, "tasks"),
    ({"tasks": ()}, "tasks"),
    ({"tasks": ("left", "left")}, "tasks"),
  ],
)
def test_impossible_settings_are_clear_errors(digits, kwargs, match):
  x, y = digits
  with pytest.raises(ValueError, match=match):
    multimnist.make(x, y, seed=0, **kwargs)
  with pytest.raises(ValueError, match=match):  # at registration, not at first read
    multimnist.loader(**kwargs)


def test_bad_source_digits_are_clear_errors(digits):
  x, y = digits
  with pytest.raises(ValueError, match="28x28"):
    multimnist.make(np.zeros((4, 32, 32, 3), np.uint8), y[:4], seed=0)
  with pytest.raises(ValueError, match=">= 2 images"):
    multimnist.make(x[:1], y[:1], seed=0)
  with pytest.raises(ValueError, match="0..9"):
    multimnist.make(x[:3], np.array([1, 2, 10]), seed=0)
  with pytest.raises(ValueError, match="uint8"):
    multimnist.make(x[:3].astype(np.float32), y[:3], seed=0)


def test_registered_sets_through_the_grain_pipelines():
  info = jd.get_info("multimnist3")
  assert info.image_shape == (36, 36, 1)
  x, y = jd.load_arrays("multimnist3", "train")
  assert x.shape == (4000, 36, 36, 1) and y.shape == (4000, 3)
  # The stored normalisation constants are the measured ones.
  assert abs(x.mean() / 255 - info.mean[0]) < 1e-3 and abs(x.std() / 255 - info.std[0]) < 1e-3
  # Train and test pair differently; the two registered sets share pairs.
  xt, yt = jd.load_arrays("multimnist", "test")
  assert yt.shape == (1000, 2)
  np.testing.assert_array_equal(jd.load_arrays("multimnist", "train")[1], y[:, :2])
  src_y = jd.load_arrays("mnist_subset", "test")[1]
  np.testing.assert_array_equal(yt[:, 0], src_y)  # the left digit of pair i is test image i

  a = next(jd.train_iterator("multimnist3", batch_size=16, seed=5, **ONE_HOST))
  b = next(jd.train_iterator("multimnist3", batch_size=16, seed=5, **ONE_HOST))
  assert a["image"].shape == (16, 36, 36, 1) and a["label"].shape == (16, 3)
  np.testing.assert_array_equal(a["image"], b["image"])
  np.testing.assert_array_equal(a["label"], b["label"])
  # No augmentation: every train batch is made of the stored records.
  raw = np.rint(a["image"] * info.std[0] * 255 + info.mean[0] * 255).astype(np.uint8)
  stored = {x[i].tobytes(): y[i].tolist() for i in range(len(x))}
  for img, lab in zip(raw, a["label"]):
    assert stored[img.tobytes()] == lab.tolist()
  sizes = [len(b["label"]) for b in jd.eval_batches("multimnist", batch_size=300)]
  assert sizes == [300, 300, 300, 100]


def test_a_variant_registers_with_another_seed():
  name = "multimnist_test_seed7"
  jd.register(dataclasses.replace(jd.get_info("multimnist"), name=name), multimnist.loader(seed=7), "none")
  try:
    assert not np.array_equal(jd.load_arrays(name, "test")[0], jd.load_arrays("multimnist", "test")[0])
  finally:
    from jaxprune.data import registry

    registry._REGISTRY.pop(name)
