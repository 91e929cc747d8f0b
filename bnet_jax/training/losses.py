"""The joint training loss over every exit."""

import jax
import jax.numpy as jnp
import optax


def joint_cross_entropy(logits: jax.Array, labels: jax.Array, weights: jax.Array
                        ) -> tuple[jax.Array, jax.Array]:
  """Weighted sum over exits of the mean softmax cross-entropy (nats).

  Args:
    logits: (E, B, C), one row of logits per exit.
    labels: (B,) integer class labels.
    weights: (E,) per-exit loss weights (the authors' code: all 1.0).

  Returns:
    (total, per_exit): the scalar ``sum_e w_e * CE_e`` and the (E,) unweighted
    per-exit mean cross-entropies.
  """
  per_sample = optax.softmax_cross_entropy_with_integer_labels(logits, labels[None, :])
  per_exit = jnp.mean(per_sample, axis=-1)
  return jnp.sum(jnp.asarray(weights, per_exit.dtype) * per_exit), per_exit
