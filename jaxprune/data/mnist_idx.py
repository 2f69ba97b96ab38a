"""Reader for the MNIST IDX format (gzip-compressed, as distributed).

IDX header: two zero bytes, a type code (0x08 = unsigned byte), the number of
dimensions, then one big-endian uint32 per dimension. MNIST uses magic
``0x00000803`` for images ``[N, 28, 28]`` and ``0x00000801`` for labels
``[N]``. Both the magic number and the payload size are checked so that a
truncated or wrong file fails loudly instead of yielding garbage digits.
"""

from __future__ import annotations

import gzip
import zlib
from pathlib import Path
from typing import Literal

import numpy as np

from jaxprune.data.errors import CorruptDataError, DataNotFoundError

IMAGES_MAGIC = 0x00000803
LABELS_MAGIC = 0x00000801

MNIST_FILES = {
  "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
  "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}


def parse_idx(raw: bytes, *, expected_magic: int | None = None, source: str = "<bytes>") -> np.ndarray:
  """Parses an uncompressed IDX byte string of unsigned bytes.

  Example:
    >>> parse_idx(bytes([0, 0, 8, 1, 0, 0, 0, 2, 7, 9])).tolist()
    [7, 9]
  """
  if len(raw) < 4:
    raise CorruptDataError(f"{source}: {len(raw)} bytes, too short for IDX")
  magic = int.from_bytes(raw[:4], "big")
  if expected_magic is not None and magic != expected_magic:
    raise CorruptDataError(
      f"{source}: bad IDX magic number 0x{magic:08x}, expected "
      f"0x{expected_magic:08x}; not an MNIST "
      f"{'image' if expected_magic == IMAGES_MAGIC else 'label'} file."
    )
  if raw[0] or raw[1] or raw[2] != 0x08:
    raise CorruptDataError(
      f"{source}: bad IDX magic number 0x{magic:08x} (only unsigned-byte IDX files, type code 0x08, are supported)."
    )
  ndim = raw[3]
  header = 4 + 4 * ndim
  if len(raw) < header:
    raise CorruptDataError(f"{source}: truncated IDX header")
  shape = tuple(int(d) for d in np.frombuffer(raw, ">u4", ndim, offset=4))
  if len(raw) - header != int(np.prod(shape)):
    raise CorruptDataError(
      f"{source}: IDX header declares shape {shape} "
      f"({int(np.prod(shape))} bytes) but the payload has "
      f"{len(raw) - header} bytes; the file is truncated or corrupt."
    )
  return np.frombuffer(raw, np.uint8, offset=header).reshape(shape)


def read_idx_file(path: str | Path, *, expected_magic: int | None = None) -> np.ndarray:
  """Reads an IDX file, gzip-compressed if the name ends in ``.gz``.

  Example:
    >>> from jaxprune.data.assets import MNIST_SUBSET_DIR
    >>> read_idx_file(MNIST_SUBSET_DIR / "t10k-labels-idx1-ubyte.gz").shape
    (1000,)
  """
  path = Path(path)
  if not path.is_file():
    raise DataNotFoundError(f"IDX file not found: {path}")
  try:
    if path.suffix == ".gz":
      with gzip.open(path, "rb") as f:
        raw = f.read()
    else:
      raw = path.read_bytes()
  except (OSError, EOFError, zlib.error) as e:  # gzip.BadGzipFile is an OSError
    raise CorruptDataError(f"{path}: not a valid gzip file ({e})") from None
  return parse_idx(raw, expected_magic=expected_magic, source=str(path))


def load_mnist_idx(data_dir: str | Path, split: Literal["train", "test"]) -> tuple[np.ndarray, np.ndarray]:
  """Loads an MNIST split from the four official ``*-idx?-ubyte.gz`` files.

  Uncompressed copies (same names without ``.gz``) are accepted too.

  Returns:
    uint8 images ``[N, 28, 28, 1]`` (NHWC) and int32 labels ``[N]``.

  Example:
    >>> from jaxprune.data.assets import MNIST_SUBSET_DIR
    >>> x, y = load_mnist_idx(MNIST_SUBSET_DIR, "train")
    >>> x.shape, y.shape
    ((4000, 28, 28, 1), (4000,))
  """
  if split not in MNIST_FILES:
    raise ValueError(f"split must be 'train' or 'test', got {split!r}")
  data_dir = Path(data_dir).expanduser()
  paths = []
  for name in MNIST_FILES[split]:
    path = data_dir / name
    if not path.is_file() and (data_dir / name[:-3]).is_file():
      path = data_dir / name[:-3]
    if not path.is_file():
      raise DataNotFoundError(
        f"MNIST file {path} not found. Put the official MNIST files "
        f"({', '.join(f for pair in MNIST_FILES.values() for f in pair)}) "
        f"in {data_dir}, or use name='mnist_subset' (shipped)."
      )
    paths.append(path)
  images = read_idx_file(paths[0], expected_magic=IMAGES_MAGIC)
  labels = read_idx_file(paths[1], expected_magic=LABELS_MAGIC)
  if len(images) != len(labels):
    raise CorruptDataError(f"{data_dir}: {len(images)} MNIST images but {len(labels)} labels")
  return images[..., None].copy(), labels.astype(np.int32)


def to_32x32x3(images: np.ndarray) -> np.ndarray:
  """Zero-pads 28x28 grey images to 32x32 and repeats them over 3 channels.

  Lets CIFAR-shaped models (3x32x32 input) consume MNIST, e.g. to transfer
  pruning masks between data sets. The 2-pixel zero border matches MNIST's
  own black background.

  Example:
    >>> to_32x32x3(np.zeros((5, 28, 28, 1), np.uint8)).shape
    (5, 32, 32, 3)
  """
  padded = np.pad(images, ((0, 0), (2, 2), (2, 2), (0, 0)))
  return np.ascontiguousarray(np.repeat(padded, 3, axis=-1))
