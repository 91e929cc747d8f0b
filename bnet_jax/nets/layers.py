"""Small layers Flax lacks, with implementations chosen for XLA's CPU backend.

`Conv` keeps Flax's parameter layout (`kernel` HWIO, `bias`) whatever its
implementation, so a checkpoint trained with one runs with another:

- ``"xla"``: `lax.conv_general_dilated`.
- ``"shifted"``: a sum of kh*kw shifted multiply-adds. XLA's CPU convolution with
  one input channel is about 10x slower than it should be; this form is not.
- ``"im2col"``: patches concatenated on the channel axis, then one matmul. Faster
  than XLA's convolution for narrow layers at small batch sizes.
"""

from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

CONV_IMPLS = ("xla", "shifted", "im2col")


def _patches(x: jax.Array, k: int, pad: int) -> list[jax.Array]:
  """Returns the k*k shifted views of `x` (B, H, W, C), each (B, Ho, Wo, C)."""
  xp = jnp.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
  ho = x.shape[1] + 2 * pad - k + 1
  wo = x.shape[2] + 2 * pad - k + 1
  return [xp[:, i:i + ho, j:j + wo, :] for i in range(k) for j in range(k)]


class Conv(nn.Module):
  """Stride-1 square convolution with symmetric zero padding.

  Attributes:
    features: output channels.
    kernel_size: side of the square kernel.
    padding: zeros added on every side.
    impl: one of `CONV_IMPLS`.
    kernel_init: initialiser of the (k, k, C_in, C_out) kernel.
  """
  features: int
  kernel_size: int
  padding: int = 0
  impl: str = "xla"
  kernel_init: Callable = nn.initializers.lecun_normal()

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    """Maps (B, H, W, C_in) to (B, H + 2p - k + 1, W + 2p - k + 1, features)."""
    k, cin = self.kernel_size, x.shape[-1]
    kernel = self.param("kernel", self.kernel_init, (k, k, cin, self.features))
    bias = self.param("bias", nn.initializers.zeros_init(), (self.features,))
    if self.impl == "xla":
      y = lax.conv_general_dilated(
          x, kernel, (1, 1), [(self.padding, self.padding)] * 2,
          dimension_numbers=("NHWC", "HWIO", "NHWC"))
    elif self.impl == "shifted":
      taps = kernel.reshape(k * k, cin, self.features)
      views = _patches(x, k, self.padding)
      if cin == 1:
        y = sum(v * t[0] for v, t in zip(views, taps))
      else:
        y = sum(v @ t for v, t in zip(views, taps))
    elif self.impl == "im2col":
      cols = jnp.concatenate(_patches(x, k, self.padding), axis=-1)
      y = cols @ kernel.reshape(k * k * cin, self.features)
    else:
      raise ValueError(f"Unknown conv impl {self.impl!r}; expected one of {CONV_IMPLS}.")
    return y + bias


def max_pool_ceil(x: jax.Array, window: int = 2, stride: int | None = None) -> jax.Array:
  """Max pooling that rounds its output size up, as Chainer's `cover_all=True`.

  Args:
    x: (B, H, W, C).
    window: side of the pooling window.
    stride: defaults to `window`.

  Returns:
    (B, ceil((H - window) / stride) + 1, same for W, C). Windows that run past the
    edge take the max over the pixels they cover.
  """
  stride = stride or window

  def extra(n: int) -> int:
    out = -(-(n - window) // stride) + 1
    return (out - 1) * stride + window - n

  pads = ((0, extra(x.shape[1])), (0, extra(x.shape[2])))
  return nn.max_pool(x, (window, window), (stride, stride), padding=pads)
