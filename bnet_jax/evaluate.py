"""The all-exits pass over a whole split, in fixed-size batches."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from bnet_jax import nets


@functools.partial(jax.jit, static_argnums=0)
def _forward_eval(net: nets.Network, variables: nets.Variables, x: jax.Array) -> nets.Outputs:
  return nets.forward(net, variables, x)[0]


def all_exits(net: nets.Network, variables: nets.Variables, images: np.ndarray,
              batch_size: int = 1000) -> nets.Outputs:
  """Every exit's logits and entropies for a whole split, as numpy arrays.

  The split is cut into batches of exactly `batch_size` (the last padded), so one
  compiled program serves every batch.

  Args:
    net: the network.
    variables: its variables.
    images: (N, H, W, C) float images, preprocessed.
    batch_size: rows per compiled call.

  Returns:
    `Outputs` with logits (E, N, C) and entropy (E, N), numpy.
  """
  nets.check_images(net, images)
  n = len(images)
  batch_size = min(batch_size, n)
  chunks = []
  for start in range(0, n, batch_size):
    x = images[start:start + batch_size]
    rows = len(x)
    if rows < batch_size:
      x = np.concatenate([x, np.zeros((batch_size - rows, *x.shape[1:]), x.dtype)])
    out = _forward_eval(net, variables, jnp.asarray(x))
    chunks.append(jax.tree.map(lambda a: np.asarray(a)[:, :rows], out))
  return nets.Outputs(*(np.concatenate(parts, axis=1) for parts in zip(*chunks)))


def accuracy_per_exit(logits: np.ndarray, labels: np.ndarray) -> list[float]:
  """Fraction of correct argmax predictions per exit: (E, N, C), (N,) -> E floats."""
  return [float(a) for a in np.mean(np.argmax(logits, -1) == labels[None], axis=1)]


def evaluate_split(net: nets.Network, variables: nets.Variables, images: np.ndarray,
                   labels: np.ndarray, batch_size: int = 1000) -> dict:
  """``{"num_examples": N, "accuracy_per_exit": [...]}`` of one split."""
  out = all_exits(net, variables, images, batch_size)
  return {"num_examples": int(len(labels)), "accuracy_per_exit": accuracy_per_exit(out.logits, labels)}
