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
    install_requires=[
        "jax>=0.10.2",
        "flax>=0.12.8",
        "optax>=0.2.8",
        "orbax-checkpoint>=0.12.8",
        "tensorflow-datasets>=4.9.10",
        "ml-collections>=1.1.0",
        "grain>=0.2.18",
        "tqdm>=4.67",
        "matplotlib>=3.9",
        "numpy>=2.0",
        "scipy>=1.13",
        "absl-py>=2.1",
    ],
    extras_require={
        "test": ["pytest>=8.0", "hypothesis>=6.100", "nbclient>=0.10", "nbformat>=5.10", "ipykernel>=6.29", "nbmake>=1.5"],
        "torch": ["torch==2.13.0"],
    },
)
