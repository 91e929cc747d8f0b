"""Local response normalisation across channels, as Chainer computes it.

Chainer's ``F.local_response_normalization(x, n, k, alpha, beta)``:

  y_c = x_c / (k + alpha * sum_{j = c - n//2}^{c + n//2} x_j^2) ** beta

with the window clipped at the first and last channel. Unlike Caffe, alpha is not
divided by n, and the window always spans 2 * (n // 2) + 1 channels (an even n
behaves as n + 1), exactly as Chainer's own loop does.
"""

import functools

import jax
import jax.numpy as jnp


def _window_sum(v: jax.Array, half: int) -> jax.Array:
  """Each channel's sum over channels c - half .. c + half of v (..., C), clipped at the
  edges: shifted slices of a zero-padded copy, which XLA fuses into one pass."""
  channels = v.shape[-1]
  padded = jnp.pad(v, [(0, 0)] * (v.ndim - 1) + [(half, half)])
  return sum(padded[..., i:i + channels] for i in range(2 * half + 1))


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2, 3, 4))
def _lrn(x: jax.Array, half: int, k: float, alpha: float, beta: float) -> jax.Array:
  return _lrn_fwd(x, half, k, alpha, beta)[0]


def _lrn_fwd(x, half, k, alpha, beta):
  scale = k + alpha * _window_sum(jnp.square(x), half)
  factor = scale ** -beta
  return x * factor, (x, scale, factor)


def _lrn_bwd(half, k, alpha, beta, residuals, g):
  # dx_i = g_i s_i^-beta - 2 alpha beta x_i sum_{c near i} g_c x_c s_c^(-beta - 1): the
  # window is symmetric. Autodiff recomputed the power for every neighbour instead.
  x, scale, factor = residuals
  return (g * factor - 2 * alpha * beta * x * _window_sum(g * x * factor / scale, half),)


_lrn.defvjp(_lrn_fwd, _lrn_bwd)


def local_response_norm(x: jax.Array, n: int = 5, k: float = 2.0, alpha: float = 1e-4,
                        beta: float = 0.75) -> jax.Array:
  """Normalises each channel by the energy of its `n` neighbours (Chainer's defaults).

  Its gradient is written out (it reuses the forward's power of each channel's
  energy): autodiff's evaluated the power again for each neighbour.

  Args:
    x: (..., C) activations, channels last (NHWC).
    n: window width in channels.
    k, alpha, beta: the formula's offset, scale and power.

  Returns:
    (..., C), the same shape and dtype as `x` (computed in float32).
  """
  # A power of a small sum: float32 even in a bfloat16 network.
  return _lrn(x.astype(jnp.float32), n // 2, float(k), float(alpha), float(beta)).astype(x.dtype)


def paper_lrn(x: jax.Array) -> jax.Array:
  """The BranchyNet code's LRN: n=3, alpha=5e-5, beta=0.75, Chainer's k=2."""
  return local_response_norm(x, n=3, k=2.0, alpha=5e-5, beta=0.75)
