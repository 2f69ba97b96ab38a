"""Per-record augmentations and normalisation (numpy only).

Random transforms take an explicit ``np.random.Generator``. The pipeline
hands them grain's per-record generator, seeded from (seed, epoch, position
in the epoch), so augmented batches are identical whatever the number of
reading threads or processes.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np


def random_crop_flip(
  image: np.ndarray,
  rng: np.random.Generator,
  *,
  pad: int = 4,
  flip: bool = True,
) -> np.ndarray:
  """Standard CIFAR augmentation: zero-pad, random crop back, random h-flip.

  Equivalent to ``np.pad(image, pad)[oy:oy+H, ox:ox+W]`` with ``oy, ox``
  uniform in ``[0, 2*pad]`` (then ``[:, ::-1]`` with probability 1/2), but
  copies only the overlapping window instead of materialising the padded
  image.

  Args:
    image: ``[H, W, C]`` array.
    rng: generator that decides the offsets and the flip.
    pad: zero padding on each side (4 in the ResNet-CIFAR recipe).
    flip: whether to flip horizontally with probability 1/2 (not for digits).

  Example:
    >>> x = np.arange(2 * 2 * 1, dtype=np.uint8).reshape(2, 2, 1) + 1
    >>> y = random_crop_flip(x, np.random.default_rng(0), pad=1)
    >>> y.shape, int(y.sum()) <= int(x.sum())
    ((2, 2, 1), True)
  """
  h, w = image.shape[:2]
  # Offsets in the padded image, minus pad: the shift of the window.
  dy, dx = rng.integers(0, 2 * pad + 1, size=2) - pad
  do_flip = flip and rng.random() < 0.5
  out = np.zeros_like(image)
  out[max(0, -dy) : h - max(0, dy), max(0, -dx) : w - max(0, dx)] = image[
    max(0, dy) : h + min(0, dy), max(0, dx) : w + min(0, dx)
  ]
  return out[:, ::-1] if do_flip else out


def resize_bilinear(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
  """Bilinear resize of ``[H, W, C]`` uint8 to ``size=(h, w)`` (half-pixel centres).

  No antialiasing (like ``jax.image.resize(..., antialias=False)``); fine for
  the moderate down-scaling of ImageNet crops, and free of PIL/TF.

  Example:
    >>> resize_bilinear(np.zeros((10, 20, 3), np.uint8), (4, 8)).shape
    (4, 8, 3)
  """
  in_h, in_w = image.shape[:2]
  out_h, out_w = size

  def coords(n_out: int, n_in: int):
    c = (np.arange(n_out, dtype=np.float32) + 0.5) * (n_in / n_out) - 0.5
    c = np.clip(c, 0, n_in - 1)
    lo = np.floor(c).astype(np.intp)
    hi = np.minimum(lo + 1, n_in - 1)
    return lo, hi, (c - lo).astype(np.float32)

  y0, y1, wy = coords(out_h, in_h)
  x0, x1, wx = coords(out_w, in_w)
  img = image.astype(np.float32)
  top, bottom = img[y0], img[y1]
  wx = wx[None, :, None]
  top = top[:, x0] * (1 - wx) + top[:, x1] * wx
  bottom = bottom[:, x0] * (1 - wx) + bottom[:, x1] * wx
  out = top * (1 - wy[:, None, None]) + bottom * wy[:, None, None]
  return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def random_resized_crop(
  image: np.ndarray,
  rng: np.random.Generator,
  *,
  size: int = 224,
  scale: tuple[float, float] = (0.08, 1.0),
  ratio: tuple[float, float] = (3 / 4, 4 / 3),
  flip: bool = True,
) -> np.ndarray:
  """Inception-style crop (ImageNet training): random area/aspect, resize, flip.

  Tries 10 random boxes covering ``scale`` of the area with aspect ratio in
  ``ratio`` (log-uniform); falls back to the largest central box.

  Example:
    >>> x = np.zeros((300, 400, 3), np.uint8)
    >>> random_resized_crop(x, np.random.default_rng(0)).shape
    (224, 224, 3)
  """
  h, w = image.shape[:2]
  area = h * w
  log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
  for _ in range(10):
    target = area * rng.uniform(*scale)
    aspect = math.exp(rng.uniform(*log_ratio))
    cw = int(round(math.sqrt(target * aspect)))
    ch = int(round(math.sqrt(target / aspect)))
    if 0 < cw <= w and 0 < ch <= h:
      y = int(rng.integers(0, h - ch + 1))
      x = int(rng.integers(0, w - cw + 1))
      break
  else:  # central crop with the aspect ratio clamped into `ratio`
    aspect = w / h
    if aspect < ratio[0]:
      cw, ch = w, int(round(w / ratio[0]))
    elif aspect > ratio[1]:
      ch, cw = h, int(round(h * ratio[1]))
    else:
      cw, ch = w, h
    y, x = (h - ch) // 2, (w - cw) // 2
  out = resize_bilinear(image[y : y + ch, x : x + cw], (size, size))
  if flip and rng.random() < 0.5:
    out = out[:, ::-1]
  return out


def resize_center_crop(image: np.ndarray, *, resize: int = 256, crop: int = 224) -> np.ndarray:
  """ImageNet evaluation: resize the shorter side to ``resize``, centre-crop ``crop``.

  Example:
    >>> resize_center_crop(np.zeros((300, 500, 3), np.uint8)).shape
    (224, 224, 3)
  """
  h, w = image.shape[:2]
  s = resize / min(h, w)
  nh, nw = max(crop, int(round(h * s))), max(crop, int(round(w * s)))
  image = resize_bilinear(image, (nh, nw))
  y, x = (nh - crop) // 2, (nw - crop) // 2
  return image[y : y + crop, x : x + crop]


def normalize(images: np.ndarray, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
  """uint8 ``[..., C]`` -> float32 ``(x / 255 - mean) / std`` (mean/std in [0, 1] units).

  Example:
    >>> normalize(np.full((1, 1, 1), 255, np.uint8), [0.5], [0.5]).item()
    1.0
  """
  std = np.asarray(std, np.float32)
  scale = 1.0 / (255.0 * std)
  shift = -np.asarray(mean, np.float32) / std
  # In place on the float copy: ~40% faster than `x * scale + shift`, which
  # allocates a second float32 batch.
  out = images.astype(np.float32)
  out *= scale
  out += shift
  return out
