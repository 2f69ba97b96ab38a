"""Load a deploy directory and run it: no model code, only jax (and orbax for the weights).

Example:
  >>> info = jaxprune.data.get_info("cifar10_subset")
  >>> card = jaxprune.deploy.export_module(small_model, "out/resnet20_50", input_shape=(32, 32, 3),
  ...     card={"model": "resnet20"}, normalisation={"mean": info.mean, "std": info.std})
  >>> net = jaxprune.deploy.load("out/resnet20_50")   # no model code needed
  >>> net.card["model"], net.input_shape
  ('resnet20', (32, 32, 3))
  >>> images_uint8 = np.zeros((2, 32, 32, 3), np.uint8)
  >>> net(net.preprocess(images_uint8)).shape   # any batch size
  (2, 10)
"""

from __future__ import annotations

import json
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxprune.deploy.export import CARD_FILE, FORMAT, FORMAT_VERSION, MODEL_FILE, WEIGHTS_DIR


class IncompatibleArtifactError(ValueError):
  """The artifact was written by a format or jax version this one cannot read."""


def check_card(card: dict, path: str = "") -> None:
  """Raises `IncompatibleArtifactError` unless this jaxprune and jax can read the artifact."""
  where = f" ({path})" if path else ""
  if card.get("format") != FORMAT:
    raise IncompatibleArtifactError(
      f"not a jaxprune deploy artifact{where}: card format is {card.get('format')!r}, "
      f"expected {FORMAT!r}. Write one with jaxprune.deploy.export."
    )
  version = card.get("format_version")
  if version != FORMAT_VERSION:
    newer = isinstance(version, int) and version > FORMAT_VERSION
    raise IncompatibleArtifactError(
      f"artifact{where} has deploy format version {version!r} (written by jaxprune "
      f"{card.get('jaxprune_version', '?')}); this jaxprune reads version {FORMAT_VERSION}. "
      + ("Upgrade jaxprune to load it." if newer else "Export it again with this jaxprune (jaxprune.deploy.export).")
    )
  cc = card.get("calling_convention_version")
  lo = jax.export.minimum_supported_calling_convention_version
  hi = jax.export.maximum_supported_calling_convention_version
  if not isinstance(cc, int) or not lo <= cc <= hi:
    raise IncompatibleArtifactError(
      f"artifact{where} was serialized by jax {card.get('jax_version', '?')} with calling "
      f"convention {cc!r}; jax {jax.__version__} runs {lo}..{hi}. "
      + ("Upgrade jax." if isinstance(cc, int) and cc > hi else "Export it again with a newer jax.")
    )


class Deployed:
  """A loaded artifact: `net(x)` runs it on a batch shaped like `card["input"]`.

  Attributes: `card` (dict), `exported` (`jax.export.Exported`), `weights`
  (list of arrays in the artifact's order), `input_shape`, `input_dtype`.
  """

  def __init__(self, card: dict, exported: jax.export.Exported, weights: list):
    self.card, self.exported, self.weights = card, exported, weights
    spec = card["input"]
    self.input_shape = tuple(spec["shape"][1:])
    self.input_dtype = np.dtype(spec["dtype"])
    self.batch_size = spec["shape"][0]
    self._call = jax.jit(exported.call)

  def check_input(self, x: Any) -> None:
    """Raises ValueError unless `x` is a batch the artifact takes."""
    shape, dtype = np.shape(x), getattr(x, "dtype", None)
    want = ("batch",) + self.input_shape if self.batch_size is None else ((self.batch_size,) + self.input_shape)
    if (
      len(shape) != len(want)
      or tuple(shape[1:]) != self.input_shape
      or (self.batch_size is not None and shape[0] != self.batch_size)
      or shape[0] < 1
    ):
      hint, c = "", self.input_shape
      if len(c) == 3 and len(shape) == 4 and tuple(shape[1:]) == (c[2], c[0], c[1]):
        hint = " It looks channels-first (NCHW): pass x.transpose(0, 2, 3, 1)."
      elif tuple(shape) == c:
        hint = " Add the batch axis: x[None]."
      raise ValueError(
        f"input has shape {tuple(shape)}; this network takes "
        f"{want} ({self.card['input'].get('layout') or 'as exported'}).{hint}"
      )
    if dtype is None or np.dtype(dtype) != self.input_dtype:
      hint = (
        " For uint8 images use net.preprocess(images), which scales and normalises them as the card says."
        if dtype is not None and np.dtype(dtype) == np.uint8
        else f" Cast it: x.astype(np.{self.input_dtype.name})."
      )
      raise ValueError(f"input has dtype {dtype}; this network takes {self.input_dtype.name}." + hint)

  def __call__(self, x: Any) -> Any:
    """The network's output on the batch `x` (checked: shape and dtype)."""
    self.check_input(x)
    return self._call(self.weights, x)

  def preprocess(self, images: Any) -> jax.Array:
    """uint8 images (batch, *input_shape) to the network's input: `x / 255`, then
    `(x - mean) / std` with the card's normalisation (if any)."""
    x = jnp.asarray(images, jnp.float32)
    if np.asarray(images).dtype == np.uint8:
      x = x / 255.0
    norm = self.card["input"].get("normalisation") or {}
    if "mean" in norm:
      x = x - jnp.asarray(norm["mean"], jnp.float32)
    if "std" in norm:
      x = x / jnp.asarray(norm["std"], jnp.float32)
    return x.astype(self.input_dtype)


def load(directory: str, *, device: jax.Device | None = None) -> Deployed:
  """Load an artifact written by `jaxprune.deploy.export` (checked: format and
  calling-convention versions, platform, weights against the artifact).

  Example:
    >>> card = jaxprune.deploy.export_module(small_model, "out/net", input_shape=(32, 32, 3))
    >>> net = jaxprune.deploy.load("out/net")
    >>> net(x).shape, net(x[:1]).shape
    ((8, 10), (1, 10))
  """
  directory = os.path.abspath(os.path.expanduser(directory))  # orbax restores absolute paths only
  card_path = os.path.join(directory, CARD_FILE)
  if not os.path.exists(card_path):
    raise FileNotFoundError(
      f"{directory} has no {CARD_FILE}: not a jaxprune deploy artifact (write one with jaxprune.deploy.export)."
    )
  with open(card_path) as f:
    card = json.load(f)
  check_card(card, directory)
  with open(os.path.join(directory, MODEL_FILE), "rb") as f:
    exported = jax.export.deserialize(bytearray(f.read()))
  platform = (device or jax.devices()[0]).platform
  if platform not in exported.platforms:
    raise IncompatibleArtifactError(
      f"artifact {directory} was lowered for {list(exported.platforms)}, not for {platform}; "
      "export it again with platforms=(..., '" + platform + "')."
    )
  weights = _restore(os.path.join(directory, WEIGHTS_DIR), card, exported)
  if device is not None:
    weights = jax.device_put(weights, device)
  return Deployed(card, exported, weights)


def _restore(path: str, card: dict, exported: jax.export.Exported) -> list:
  import orbax.checkpoint as ocp

  restored = ocp.StandardCheckpointer().restore(path)
  leaves = card["weights"]["leaves"]
  missing = [w["name"] for w in leaves if w["name"] not in restored]
  if missing:
    raise IncompatibleArtifactError(
      f"weights in {path} lack {missing[:5]} ({len(missing)} in all); the artifact is incomplete."
    )
  weights = [jnp.asarray(restored[w["name"]]) for w in leaves]
  for w, arr, aval in zip(leaves, weights, exported.in_avals[: len(leaves)]):
    if tuple(arr.shape) != tuple(aval.shape) or arr.dtype != aval.dtype:
      raise IncompatibleArtifactError(
        f"weight {w['name']} is {arr.dtype}{list(arr.shape)} but the exported network takes "
        f"{aval.dtype}{list(aval.shape)}; the weights do not belong to this model.jax."
      )
  return weights
