"""Exit criteria: a confidence score per sample from an exit's logits.

Each criterion maps logits (..., C) to a score (...). `EXITS_BELOW[name]` says how
a score is compared with an exit threshold T: entropy exits when ``score < T``
(the paper's rule); the others when ``score > T``. Comparisons are strict. To add
a criterion, write its function and add it to `CRITERIA` and `EXITS_BELOW`.
"""

from collections.abc import Callable

import jax
import jax.numpy as jnp


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


CRITERIA: dict[str, Callable[[jax.Array], jax.Array]] = {
    "entropy": entropy,
    "max_prob": max_prob,
    "margin": margin,
}
EXITS_BELOW: dict[str, bool] = {"entropy": True, "max_prob": False, "margin": False}


def get(name: str) -> Callable[[jax.Array], jax.Array]:
  """The criterion called `name`; a ValueError lists the known ones otherwise."""
  if name not in CRITERIA:
    raise ValueError(f"Unknown exit criterion {name!r}; known: {sorted(CRITERIA)}.")
  return CRITERIA[name]


def exits(name: str, score: jax.Array, threshold: jax.Array) -> jax.Array:
  """Whether each sample leaves: ``score < T`` for entropy, ``score > T`` otherwise."""
  return score < threshold if EXITS_BELOW[name] else score > threshold
