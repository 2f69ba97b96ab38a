"""jaxprune: channel pruning for JAX/Flax NNX convolutional networks."""

from setuptools import find_packages, setup

setup(
  name="jaxprune",
  version="0.1.0",
  description="Trace, cost, mask and slim the channels of JAX/Flax networks; "
  "ChipNet, FTWT, ManiDP, EPI and PAGCP on one functional core.",
  python_requires=">=3.11",
  packages=find_packages(include=["jaxprune", "jaxprune.*", "experiments", "experiments.*"]),
  package_data={"jaxprune.data": ["assets/*", "assets/*/*", "assets/*/*/*"]},
  include_package_data=True,
  # Lower bounds are the versions the test suite runs with (CI installs them).
  install_requires=[
    "jax>=0.10.2",
    "flax>=0.12.8",
    "optax>=0.2.8",
    "orbax-checkpoint>=0.12.8",
    "tensorflow-datasets>=4.9.10",
    "ml-collections>=1.1.0",
    "grain>=0.2.18",
    "tqdm>=4.70",
    "matplotlib>=3.11",
    "numpy>=2.4",
    "scipy>=1.17",
    "absl-py>=2.5",
    "flatbuffers>=25.12.19",  # jax.export serialization (jaxprune.deploy)
  ],
  extras_require={
    "test": [
      "pytest>=9.2",
      "pytest-xdist>=3.8",
      "hypothesis>=6.170",
      "nbclient>=0.11",
      "nbformat>=5.11",
      "ipykernel>=7.4",
      "nbmake>=1.5.5",
      "ruff>=0.17.5",
    ],
    # benchmarks only: PyTorch and Torch-Pruning side by side (CPU build:
    # pip install "torch==2.13.0+cpu" first, or pip pulls the CUDA one)
    "torch": ["torch==2.13.0", "torch-pruning==1.6.1"],
  },
)
