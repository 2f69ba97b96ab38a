"""Location of the real data subsets shipped inside the package.

The subsets live in ``jaxprune/data/assets`` so that a fresh clone or an
installed wheel trains and tests offline; see ``assets/README.md``.
"""

from __future__ import annotations

from pathlib import Path

# Path(__file__) rather than importlib.resources.files(): the readers need real
# filesystem paths (np.fromfile / gzip.open), and the package is always
# installed unzipped (editable or wheel), so the two are equivalent here.
ASSETS_DIR: Path = Path(__file__).resolve().parent / "assets"

#: Folder that contains ``cifar-10-batches-bin`` (same layout as the official
#: tarball once extracted), i.e. a valid ``data_dir`` for the CIFAR-10 reader.
CIFAR10_SUBSET_DIR: Path = ASSETS_DIR / "cifar10_subset"

#: Folder holding the four gzip-compressed MNIST IDX files.
MNIST_SUBSET_DIR: Path = ASSETS_DIR / "mnist_subset"
