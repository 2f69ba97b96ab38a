"""Channel widths that suit the backend: per-backend `round_to` and exact padding.

Uneven widths cost some backends more than their MACs say. Two ways to even
them out, both with the multiple `round_to(platform)` gives:

- at selection, before finetuning: `jaxprune.select.global_topk(..., round_to=m)`
  keeps multiples of `m` channels per group (rounded down: the network changes);
- at export, after finetuning: `pad_channels(graph, masks, small, m)` adds
  zero channels to a slimmed network up to multiples of `m` (rounded up: the
  outputs stay the same, the MACs grow a little).

At selection a wider multiple runs faster where the budget allows it
(`select_multiples`, tried widest first by `select_rounded`).

Example:
  >>> m = jaxprune.deploy.round_to("cpu")
  >>> padded, masks_up = jaxprune.deploy.pad_channels(graph, masks, small, m)
"""

from __future__ import annotations

import math
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np

import jaxprune

# Measured on XLA:CPU (benchmarks/deploy_latency.py --sweep, docs/deploy.md) and
# from the vendors' guidance for the accelerators (docs/deploy.md cites it):
# NVIDIA tensor cores want channel counts divisible by 8 (fp16/bf16); a TPU's
# XLA pads feature dimensions to multiples of 128.
ROUND_TO = {"cpu": 8, "gpu": 8, "cuda": 8, "rocm": 8, "tpu": 128}
# At selection, widest first: the first that meets the budget wins. On XLA:CPU
# multiples of 16 ran faster than 8 where the sweep could compare them (ResNet-56
# at -30% MACs; one AVX-512 register holds 16 floats; docs/deploy.md); 16 cannot
# always be met (a 16-channel group cannot shrink), so 8 is the fallback.
SELECT_MULTIPLES = {"cpu": (16, 8), "gpu": (8,), "cuda": (8,), "rocm": (8,), "tpu": (128,)}


def round_to(platform: str | None = None) -> int:
  """The channel multiple for `platform` ("cpu", "gpu"/"cuda"/"rocm", "tpu"; default:
  jax's default backend).

  Example:
    >>> jaxprune.deploy.round_to("tpu")
    128
  """
  return _for_platform(ROUND_TO, "round_to", platform)


def select_multiples(platform: str | None = None) -> tuple[int, ...]:
  """The channel multiples `select_rounded` tries for `platform`, widest first.

  Example:
    >>> jaxprune.deploy.select_multiples("cpu")
    (16, 8)
  """
  return _for_platform(SELECT_MULTIPLES, "multiples", platform)


def _for_platform(table: Mapping[str, Any], what: str, platform: str | None) -> Any:
  platform = (platform or jax.default_backend()).lower()
  if platform not in table:
    raise ValueError(
      f"no {what} known for platform {platform!r}; known: {sorted(table)}. "
      "Pass a multiple yourself (8 is a safe choice)."
    )
  return table[platform]


def select_rounded(
  scores: Mapping[str, Any],
  graph: jaxprune.ChannelGraph,
  budget: float,
  multiples: int | str | tuple[int, ...] | None = None,
  **kwargs: Any,
) -> tuple[dict[str, jax.Array], int]:
  """`jaxprune.select.global_topk` with the widest of `multiples` that meets `budget`.

  `multiples`: a platform name or None (its `select_multiples`), one multiple,
  or several, widest first. `kwargs` go to `global_topk` (unit, min_channels,
  whole, ...). Returns the masks and the multiple they were rounded to.

  Example:
    >>> masks, m = jaxprune.deploy.select_rounded(scores, graph, 0.5, "cpu")
    >>> m in (16, 8)
    True
  """
  if multiples is None or isinstance(multiples, str):
    multiples = select_multiples(multiples)
  elif isinstance(multiples, int):
    multiples = (multiples,)
  if not multiples or any(not isinstance(m, int) or m < 1 for m in multiples):
    raise ValueError(f"multiples must be positive integers, widest first, got {multiples!r}")
  errors = []
  for m in multiples:
    try:
      return jaxprune.select.global_topk(scores, graph, budget, round_to=m, **kwargs), m
    except jaxprune.select.BudgetUnmet as e:  # this multiple cannot meet the budget: try the next
      errors.append(f"{m}: {e}")
  raise jaxprune.select.BudgetUnmet(
    f"budget {budget} cannot be met with any of the multiples {multiples}; " + " | ".join(errors)
  )


def round_up_masks(graph: jaxprune.ChannelGraph, masks: Mapping[str, Any], multiple: int) -> dict[str, jax.Array]:
  """Hard masks keeping a multiple of `multiple` channels per group (or the whole
  group): each group's kept count rounded up, the extra channels taken among the
  removed ones in order.

  On a branch graph (`trace(..., branches=True)`) the residual streams and the
  branch groups are left as they are: what a stream's readers compute is a
  union of branches, which no count of one group makes even.
  """
  if multiple < 1:
    raise ValueError(f"multiple must be a positive integer, got {multiple}")
  fixed = set(graph.streams()) | set(graph.names("branch")) if graph.has_branches else set()
  out = {}
  for g in graph.groups:
    m = np.asarray(masks[g.name], np.float32).copy()
    if g.name not in fixed:
      kept = int(m.sum())
      extra = min(g.size, multiple * math.ceil(kept / multiple)) - kept
      m[np.nonzero(m == 0)[0][:extra]] = 1.0
    out[g.name] = jnp.asarray(m)
  return out


def pad_channels(
  graph: jaxprune.ChannelGraph, masks: Mapping[str, Any], small: Any, multiple: int
) -> tuple[Any, dict[str, jax.Array]]:
  """`small` (= `slim(variables, graph, masks)`, possibly finetuned since) widened
  with zero channels to the widths of `round_up_masks(graph, masks, multiple)`.

  The added channels have zero weights in and out (a BatchNorm on them has
  scale, bias and mean 0), so the padded network's outputs equal `small`'s.
  `graph` is the trace of the *dense* network `small` was slimmed from. Returns
  the padded variables and the masks they correspond to.

  Example:
    >>> padded, masks_up = jaxprune.deploy.pad_channels(graph, masks, small, 8)
    >>> bool(jnp.allclose(jaxprune.module(model, padded)(x), small_model(x), atol=1e-5))
    True
  """
  masks_up = round_up_masks(graph, masks, multiple)
  kept = jax.tree_util.tree_leaves(jaxprune.expand(graph, masks))
  small_leaves = jax.tree_util.tree_leaves(small)
  index = {il.leaf for il in graph.index_leaves}
  dense = []
  for li, (k, s, shape) in enumerate(zip(kept, small_leaves, graph.leaf_shapes)):
    s = np.asarray(s)
    if li in index:  # a dense network's index vectors are 0..n-1
      dense.append(jnp.arange(shape[0], dtype=s.dtype))
      continue
    if tuple(s.shape) == tuple(shape):
      dense.append(jnp.asarray(s))
      continue
    where = np.asarray(k) > 0.5
    if int(where.sum()) != s.size:
      raise ValueError(
        f"leaf {graph.leaf_names[li]} has shape {s.shape}, but the masks keep "
        f"{int(where.sum())} of its {int(np.prod(shape))} entries: pass the masks "
        "and graph `small` was slimmed with."
      )
    full = np.zeros(shape, s.dtype)
    full[where] = s.ravel()
    dense.append(jnp.asarray(full))
  dense_vars = jax.tree_util.tree_unflatten(graph.treedef, dense)
  return jaxprune.slim(dense_vars, graph, masks_up), masks_up
