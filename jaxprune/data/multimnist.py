"""MultiMNIST: two MNIST digits overlaid in one 36x36 image, one task per digit.

The multitask construction of Sener & Koltun (2018, "Multi-Task Learning as
Multi-Objective Optimization") in its common 36x36 form: each source image is
the *left* digit once, paired with a *right* digit drawn at random from the
same split; the left 28x28 digit sits near the top-left corner, the right one
near the bottom-right, and where they overlap the brighter pixel wins
(pixel-wise max). Tasks: ``left`` (its digit), ``right`` (its digit) and
optionally ``sum`` (left + right, 19 classes).

Placement: with ``max_shift = s``, the left digit's top-left corner is at
``(dy, dx)`` with ``dy, dx`` uniform in ``{0..s}`` and the right digit's at
``(8 - dy', 8 - dx')`` with ``dy', dx'`` uniform in ``{0..s}``: 36 = 28 + 8,
so both stay inside the canvas, and for ``s < 4`` the left digit's column
offset is always smaller than the right one's.

Everything is a function of the source digits and the seed: the same seed
gives the same images, labels and pairs.

Example:
  >>> from jaxprune.data import multimnist
  >>> import jaxprune.data as jd
  >>> x, y = jd.load_arrays("mnist_subset", "test")
  >>> mm = multimnist.make(x, y, seed=0, tasks=("left", "right", "sum"))
  >>> mm.images.shape, mm.labels.shape
  ((1000, 36, 36, 1), (1000, 3))
  >>> jd.load_arrays("multimnist", "train")[1].shape   # registered: left, right
  (4000, 2)
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import numpy as np

CANVAS = 36
DIGIT = 28
SPAN = CANVAS - DIGIT  # 8: room for the two placements
#: Task name -> number of classes.
TASKS = {"left": 10, "right": 10, "sum": 19}


class MultiMNIST(NamedTuple):
  """Overlaid images, their labels and how each was made.

  images: uint8 ``[N, 36, 36, 1]``.
  labels: int32 ``[N, len(tasks)]``, column ``t`` for ``tasks[t]``.
  left_index, right_index: int ``[N]``, the source image of each digit.
  left_offset, right_offset: int ``[N, 2]``, (row, column) of each digit's
    top-left corner in the canvas.
  tasks: the task of each label column.
  """

  images: np.ndarray
  labels: np.ndarray
  left_index: np.ndarray
  right_index: np.ndarray
  left_offset: np.ndarray
  right_offset: np.ndarray
  tasks: tuple[str, ...]


def check_tasks(tasks: Sequence[str]) -> tuple[str, ...]:
  """The tasks as a tuple, or a ValueError saying which are valid."""
  tasks = tuple(tasks)
  unknown = [t for t in tasks if t not in TASKS]
  if not tasks or unknown or len(set(tasks)) != len(tasks):
    raise ValueError(f"tasks must be distinct names from {tuple(TASKS)}, got {tasks!r}")
  return tasks


def make(
  images: np.ndarray, labels: np.ndarray, *, seed: int, tasks: Sequence[str] = ("left", "right"), max_shift: int = 2
) -> MultiMNIST:
  """Builds MultiMNIST from 28x28 grey digits (one left digit per source image).

  Args:
    images: uint8 ``[N, 28, 28]`` or ``[N, 28, 28, 1]`` MNIST digits.
    labels: ``[N]`` digit labels 0..9.
    seed: seed of the right-digit partners and of both placements.
    tasks: label columns, from ``left``, ``right``, ``sum``.
    max_shift: jitter of each digit's corner, 0..8 pixels (see the module
      docstring); below 4 the left digit is always left of the right one.

  Raises:
    ValueError: images that are not 28x28 grey, labels outside 0..9, fewer
      than two source digits, an unknown task or a shift that leaves the
      canvas.
  """
  tasks = check_tasks(tasks)
  images = np.asarray(images)
  labels = np.asarray(labels)
  if images.ndim == 3:
    images = images[..., None]
  if images.ndim != 4 or images.shape[1:] != (DIGIT, DIGIT, 1):
    raise ValueError(f"MultiMNIST needs 28x28 grey digits [N, 28, 28(, 1)], got shape {images.shape}")
  if images.dtype != np.uint8:
    raise ValueError(f"MultiMNIST needs uint8 digits (0..255), got {images.dtype}")
  n = len(images)
  if labels.shape != (n,):
    raise ValueError(f"labels must have shape ({n},) like the images, got {labels.shape}")
  if n and (labels.min() < 0 or labels.max() > 9):
    raise ValueError(f"digit labels must be 0..9, got {labels.min()}..{labels.max()}")
  if n < 2:
    raise ValueError(f"MultiMNIST pairs distinct source digits: need >= 2 images, got {n}")
  if isinstance(max_shift, bool) or not isinstance(max_shift, (int, np.integer)) or not 0 <= max_shift <= SPAN:
    raise ValueError(
      f"max_shift must be an int in 0..{SPAN} (a 28x28 digit in a 36x36 "
      f"canvas moves at most {SPAN} pixels), got {max_shift!r}"
    )

  rng = np.random.default_rng(seed)
  left = np.arange(n)
  # A partner other than the image itself: shift by 1..n-1 modulo n.
  right = (left + rng.integers(1, n, size=n)) % n
  left_offset = rng.integers(0, max_shift + 1, size=(n, 2))
  right_offset = SPAN - rng.integers(0, max_shift + 1, size=(n, 2))

  # Scatter both digits into canvases with one fancy-index each (vectorised).
  rows = np.arange(DIGIT)
  out = np.zeros((n, CANVAS, CANVAS, 1), np.uint8)
  for idx, off in ((left, left_offset), (right, right_offset)):
    canvas = np.zeros_like(out)
    r = off[:, 0, None, None] + rows[None, :, None]
    c = off[:, 1, None, None] + rows[None, None, :]
    canvas[np.arange(n)[:, None, None], r, c] = images[idx]
    np.maximum(out, canvas, out=out)

  columns = {"left": labels[left], "right": labels[right], "sum": labels[left] + labels[right]}
  y = np.stack([columns[t] for t in tasks], axis=1).astype(np.int32)
  return MultiMNIST(out, y, left, right, left_offset, right_offset, tasks)


def split_seed(seed: int, split: str) -> int:
  """The construction seed of one split: train and test pair differently."""
  return int(np.random.SeedSequence([seed, ("train", "test").index(split)]).generate_state(1)[0])


def loader(tasks: Sequence[str] = ("left", "right"), *, seed: int = 0, max_shift: int = 2):
  """A registry loader ``(split, data_dir) -> ArraySource`` of MultiMNIST built from
  the MNIST IDX files in ``data_dir`` (default: the shipped ``mnist_subset``).

  Example (a variant with another seed, through the same pipelines):
    >>> import dataclasses, jaxprune.data as jd
    >>> from jaxprune.data import multimnist
    >>> jd.register(dataclasses.replace(jd.get_info("multimnist"), name="multimnist_s1"),
    ...             multimnist.loader(seed=1), "none")
  """
  tasks = check_tasks(tasks)
  make(
    np.zeros((2, DIGIT, DIGIT), np.uint8), np.zeros(2, int), seed=0, tasks=tasks, max_shift=max_shift
  )  # bad settings fail at registration, not at first read

  def load(split, data_dir):
    # Imported here: the registry imports this module.
    from jaxprune.data import assets, mnist_idx, registry  # pylint: disable=g-import-not-at-top

    d = assets.MNIST_SUBSET_DIR if data_dir is None else data_dir
    images, labels = mnist_idx.load_mnist_idx(d, split)
    mm = make(images, labels, seed=split_seed(seed, split), tasks=tasks, max_shift=max_shift)
    return registry.ArraySource(mm.images, mm.labels)

  return load
