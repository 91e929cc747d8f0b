"""Exit criteria: a confidence score per sample from an exit's logits, and how it exits.

A `Criterion` is one value that every part of the library takes (as itself or by its
registered name): its score function, which way the score is compared with an exit
threshold T (entropy exits when ``score < T``, the paper's rule; max_prob and margin
when ``score > T``; comparisons are strict), the threshold that lets nobody exit, and
the range of scores a data-independent threshold grid spans. To add a criterion, build
a `Criterion` and `register` it; the cascade, screening, selection and the benchmark
then take it, or its name (``--criteria=NAME``).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import TypeVar

import jax
import jax.numpy as jnp
import numpy as np
from numpy.typing import ArrayLike

Array = TypeVar("Array", jax.Array, np.ndarray)


def entropy(logits: jax.Array) -> jax.Array:
  """Entropy of softmax(logits) in nats: (..., C) -> (...), in [0, ln C]."""
  logp = jax.nn.log_softmax(logits, axis=-1)
  return -jnp.sum(jnp.exp(logp) * logp, axis=-1)


def max_prob(logits: jax.Array) -> jax.Array:
  """Largest softmax probability: (..., C) -> (...), in [1/C, 1]."""
  return jnp.max(jax.nn.softmax(logits, axis=-1), axis=-1)


def margin(logits: jax.Array) -> jax.Array:
  """Top-1 minus top-2 softmax probability: (..., C) -> (...), in [0, 1]."""
  top2 = jax.lax.top_k(jax.nn.softmax(logits, axis=-1), 2)[0]
  return top2[..., 0] - top2[..., 1]


@dataclasses.dataclass(frozen=True)
class Criterion:
  """An exit criterion: everything the library needs to know about one confidence score.

  Attributes:
    name: the name it is registered, saved (thresholds.json, benchmark rows) and
      chosen on the command line by.
    score: logits (..., C) -> score (...).
    exits_below: True if a sample exits when ``score < T``, False if when ``score > T``.
    never_exit: the threshold that lets no sample exit on any data (a bound of the
      scores: 0.0 for entropy, +inf for max_prob).
    span: number of classes C -> (most confident, least confident) score, the range a
      data-independent threshold grid spans (entropy: (0, ln C)).
  """

  name: str
  score: Callable[[jax.Array], jax.Array]
  exits_below: bool
  never_exit: float
  span: Callable[[int], tuple[float, float]]

  @property
  def always_exit(self) -> float:
    """The threshold that every finite score passes: everybody exits."""
    return math.inf if self.exits_below else -math.inf

  @property
  def higher_is_confident(self) -> bool:
    """Whether a larger score is more confident (the sample exits above T)."""
    return not self.exits_below

  def exits(self, score: Array, threshold: ArrayLike) -> Array:
    """Whether each sample leaves: the strict comparison of `score` (...) with T.

    Plain ``<`` or ``>``, so jax and numpy arrays alike, and a jitted program
    compares with no more than that.
    """
    return score < threshold if self.exits_below else score > threshold

  def check(self, thresholds: ArrayLike) -> None:
    """Refuses thresholds beyond `never_exit` (any shape), which no score can pass.

    Such a threshold means "nobody exits" but is probably a mistake (a negative
    entropy threshold, say); `never_exit` itself says it on purpose.
    """
    t = np.asarray(thresholds, np.float64)
    beyond = t < self.never_exit if self.exits_below else t > self.never_exit
    if beyond.any():
      side = "below" if self.exits_below else "above"
      raise ValueError(
          f"{self.name} threshold {t[beyond].flat[0]:g} lets no sample exit: {self.name} "
          f"scores are never {side} {self.never_exit:g}; use {self.never_exit:g} for "
          "'nobody exits'.")


CRITERIA: dict[str, Criterion] = {}


def register(criterion: Criterion) -> Criterion:
  """Adds `criterion` to `CRITERIA` under its name (refusing a name taken); returns it."""
  if criterion.name in CRITERIA:
    raise ValueError(f"An exit criterion named {criterion.name!r} is already registered; "
                     "choose another name.")
  CRITERIA[criterion.name] = criterion
  return criterion


def get(criterion: Criterion | str) -> Criterion:
  """The criterion called `criterion` (a `Criterion` is returned as it is).

  Raises:
    ValueError: an unknown name; the message lists the known ones.
  """
  if isinstance(criterion, Criterion):
    return criterion
  if criterion not in CRITERIA:
    raise ValueError(f"Unknown exit criterion {criterion!r}; known: {sorted(CRITERIA)}.")
  return CRITERIA[criterion]


ENTROPY = register(Criterion("entropy", entropy, exits_below=True, never_exit=0.0,
                             span=lambda num_classes: (0.0, math.log(num_classes))))
MAX_PROB = register(Criterion("max_prob", max_prob, exits_below=False, never_exit=math.inf,
                              span=lambda num_classes: (1.0, 0.0)))
MARGIN = register(Criterion("margin", margin, exits_below=False, never_exit=math.inf,
                            span=lambda num_classes: (1.0, 0.0)))
