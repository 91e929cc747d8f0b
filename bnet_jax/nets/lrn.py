"""Local response normalisation across channels, as Chainer computes it.

Chainer's ``F.local_response_normalization(x, n, k, alpha, beta)``:

  y_c = x_c / (k + alpha * sum_{j = c - n//2}^{c + n//2} x_j^2) ** beta

with the window clipped at the first and last channel. Unlike Caffe, alpha is not
divided by n, and the window always spans 2 * (n // 2) + 1 channels (an even n
behaves as n + 1), exactly as Chainer's own loop does.
"""

import jax
import jax.numpy as jnp


def local_response_norm(x: jax.Array, n: int = 5, k: float = 2.0, alpha: float = 1e-4,
                        beta: float = 0.75) -> jax.Array:
  """Normalises each channel by the energy of its `n` neighbours (Chainer's defaults).

  Args:
    x: (..., C) activations, channels last (NHWC).
    n: window width in channels.
    k, alpha, beta: the formula's offset, scale and power.

  Returns:
    (..., C), the same shape and dtype as `x` (computed in float32).
  """
  half = n // 2
  channels = x.shape[-1]
  x32 = x.astype(jnp.float32)  # A power of a small sum: float32 even in a bfloat16 network.
  sq = jnp.pad(jnp.square(x32), [(0, 0)] * (x.ndim - 1) + [(half, half)])
  # A sum of shifted slices: XLA fuses it into one elementwise pass.
  energy = sum(sq[..., i:i + channels] for i in range(2 * half + 1))
  return (x32 * (k + alpha * energy) ** -beta).astype(x.dtype)


def paper_lrn(x: jax.Array) -> jax.Array:
  """The BranchyNet code's LRN: n=3, alpha=5e-5, beta=0.75, Chainer's k=2."""
  return local_response_norm(x, n=3, k=2.0, alpha=5e-5, beta=0.75)
