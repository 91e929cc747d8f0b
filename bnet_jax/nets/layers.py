"""Small layers Flax lacks, with implementations chosen for XLA's CPU backend.

`Conv` keeps Flax's parameter layout (`kernel` HWIO, `bias`) whatever its
implementation, so a checkpoint trained with one runs with another. Its
implementations are the records of `CONV_IMPLS` (the function, whether it fuses the
max pool that follows, what it is and why it exists); how the kernel gradient is
computed is a separate choice, `KERNEL_GRADS`, that applies to every implementation
that does not fuse the pool. `StridedConv` is the strided convolution, with its own
implementations (`STRIDED_CONV_IMPLS`).
"""

import dataclasses
import functools
from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from bnet_jax.nets import onednn


def _patches(x: jax.Array, k: int, pad: int) -> list[jax.Array]:
  """Returns the k*k shifted views of `x` (B, H, W, C), each (B, Ho, Wo, C)."""
  xp = jnp.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
  ho = x.shape[1] + 2 * pad - k + 1
  wo = x.shape[2] + 2 * pad - k + 1
  return [xp[:, i:i + ho, j:j + wo, :] for i in range(k) for j in range(k)]


def _batch_last_padded(x: jax.Array, pad: int) -> jax.Array:
  """(B, H, W, C) -> (C, H + 2 pad, W + 2 pad, B): transposed, spatially zero-padded."""
  return jnp.pad(jnp.transpose(x, (3, 1, 2, 0)), ((0, 0), (pad, pad), (pad, pad), (0, 0)))


def _batch_last_patches(x: jax.Array, k: int, pad: int) -> list[jax.Array]:
  """`_patches` with the batch axis last: the k*k views of `x` (B, H, W, C), each
  (C, Ho, Wo, B), taken from one transposed, zero-padded copy."""
  xt = _batch_last_padded(x, pad)
  ho, wo = xt.shape[1] - k + 1, xt.shape[2] - k + 1
  return [xt[:, i:i + ho, j:j + wo] for i in range(k) for j in range(k)]


def _batch_last_cols(x: jax.Array, k: int, pad: int) -> jax.Array:
  """The patch matrix of `x` (B, H, W, C) with the batch axis last: (k*k*C, Ho, Wo, B).

  Row (i*k + j)*C + c holds channel c shifted by tap (i, j): the concatenated
  `_batch_last_patches`, built in two steps (k row shifts, then k column shifts of
  those), because concatenating the k*k views directly made XLA write each view and
  then copy it again.
  """
  xt = _batch_last_padded(x, pad)
  ho, wo = xt.shape[1] - k + 1, xt.shape[2] - k + 1
  rows = jnp.stack([xt[:, i:i + ho] for i in range(k)])  # (k, C, Ho, W + 2 pad, B)
  cols = jnp.stack([rows[:, :, :, j:j + wo] for j in range(k)], axis=1)
  return cols.reshape(-1, ho, wo, xt.shape[3])


def _xla_conv(x: jax.Array, kernel: jax.Array, pad: int) -> jax.Array:
  """(B, H, W, C_in) * (k, k, C_in, C_out) HWIO -> (B, Ho, Wo, C_out)."""
  return lax.conv_general_dilated(x, kernel, (1, 1), [(pad, pad)] * 2,
                                  dimension_numbers=("NHWC", "HWIO", "NHWC"))


def _onednn_conv(x: jax.Array, kernel: jax.Array, pad: int, bias: jax.Array) -> jax.Array:
  """`_xla_conv` plus `bias` as oneDNN calls, forward and gradients (`onednn.conv`)."""
  return onednn.conv(x, kernel, (1, 1), ((pad, pad), (pad, pad)), bias)


def _channels_pad8_conv(x: jax.Array, kernel: jax.Array, pad: int) -> jax.Array:
  """`_xla_conv` with C_in and C_out zero-padded up to multiples of 8.

  XLA's CPU convolution vectorises channels in groups of 8 floats; the padded
  outputs are dropped.
  """
  cin, cout = kernel.shape[2:]
  more_in, more_out = -cin % 8, -cout % 8
  x = jnp.pad(x, ((0, 0), (0, 0), (0, 0), (0, more_in)))
  kernel = jnp.pad(kernel, ((0, 0), (0, 0), (0, more_in), (0, more_out)))
  return _xla_conv(x, kernel, pad)[..., :cout]


def _shifted_sum_conv(x: jax.Array, kernel: jax.Array, pad: int) -> jax.Array:
  """`_xla_conv` as a sum of k*k shifted views, each times its tap's (C_in, C_out) matrix.

  XLA's CPU convolution with one input channel is much slower than its arithmetic
  warrants; this form (an elementwise multiply-add per tap when C_in is 1) is not.
  """
  k, _, cin, cout = kernel.shape
  taps = kernel.reshape(k * k, cin, cout)
  views = _patches(x, k, pad)
  if cin == 1:
    return sum(v * t[0] for v, t in zip(views, taps))
  return sum(v @ t for v, t in zip(views, taps))


def _all_taps_matmul_conv(x: jax.Array, kernel: jax.Array, pad: int) -> jax.Array:
  """`_xla_conv` as one matmul for every tap at once, then a sum of k*k shifted slices.

  (B, H, W, C_in) * (k, k, C_in, C_out) HWIO -> (B, Ho, Wo, C_out). With xp the
  zero-padded input, z[p, q, a, b] = xp[p, q] @ kernel[a, b] and output (i, j) is
  the sum over taps (a, b) of z[i + a, j + b, a, b]. At batch 1 XLA's convolution
  costs several times its arithmetic; this form does not (at large batches it is
  slower). The input is read once, by the matmul: an im2col of B-LeNet's exit-1
  convolution made XLA fuse (and so recompute) stage 1 into each of its k*k slices.
  """
  k, _, cin, cout = kernel.shape
  xp = jnp.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
  b, h, w, _ = xp.shape
  z = xp.reshape(-1, cin) @ jnp.transpose(kernel, (2, 0, 1, 3)).reshape(cin, k * k * cout)
  z = z.reshape(b, h, w, k, k, cout)
  ho, wo = h - k + 1, w - k + 1
  return sum(z[:, i:i + ho, j:j + wo, i, j] for i in range(k) for j in range(k))


def _im2col_conv(x: jax.Array, kernel: jax.Array, pad: int) -> jax.Array:
  """`_xla_conv` as the k*k shifted views concatenated on the channel axis, then one matmul.

  (B, H, W, C_in) -> (B, Ho, Wo, C_out) via the (B, Ho, Wo, k*k*C_in) patch matrix.
  """
  k, _, cin, cout = kernel.shape
  cols = jnp.concatenate(_patches(x, k, pad), axis=-1)
  return cols @ kernel.reshape(k * k * cin, cout)


def _im2col_batch_last_conv_pool(x: jax.Array, kernel: jax.Array, pad: int, pool: int
                                 ) -> jax.Array:
  """`_xla_conv` (then `max_pool_ceil` if pool > 1) as one matmul, batch axis last.

  (B, H, W, C_in) -> (B, Ho, Wo, C_out); pooled,
  (B, ceil(Ho / pool), ceil(Wo / pool), C_out).
  The input is transposed to (C_in, H, W, B); the k*k shifted views stacked on the
  channel axis are the (k*k*C_in, Ho*Wo*B) patch matrix, and the output is
  kernel^T (C_out, k*k*C_in) @ patches. Every copy, the pool and its gradient then
  move whole rows of B contiguous floats, and the matmuls (forward, kernel
  gradient, input gradient) have one long dimension, whatever the channel counts.
  This is what makes B-LeNet's one-input-channel conv1 fast in training; wider
  layers gain less, and inside the network lose: XLA fuses the transposes back to
  (B, H, W, C) into the gradient's patch sums.
  """
  k, _, cin, cout = kernel.shape
  cols = _batch_last_cols(x, k, pad)
  y = (kernel.reshape(k * k * cin, cout).T @ cols.reshape(k * k * cin, -1)
       ).reshape(cout, *cols.shape[1:])
  if pool > 1:
    y = max_pool_ceil(y, pool)  # (C, H, W, B) pools as (B, H, W, C) does.
  return jnp.transpose(y, (3, 1, 2, 0))


def _phase_conv_pool(x: jax.Array, kernel: jax.Array, pad: int, pool: int,
                     im2col: bool) -> jax.Array:
  """`max_pool_ceil(_xla_conv(x, kernel, pad), pool)` computed by pooling phase.

  (B, H, W, C_in) -> (B, ceil(Ho / pool), ceil(Wo / pool), C_out). Phase (a, c)
  holds the conv outputs at rows a, a + pool, ... and columns c, c + pool, ...: for
  each kernel tap a strided view of the padded input, summed (`im2col`: concatenated,
  then one matmul). The pool is an elementwise max of the phases, so nothing of the
  full-resolution output is stored and the channel axis is no longer a narrow inner
  loop of a reduction. Positions past the conv output (the ragged edge of ceil
  pooling) are -inf, so they never win the max, exactly as in `max_pool_ceil`. Meant
  for inference: the autodiff gradients are correct but not tuned.
  """
  k, _, cin, cout = kernel.shape
  b, h, w, _ = x.shape
  ho, wo = h + 2 * pad - k + 1, w + 2 * pad - k + 1
  po, qo = -(-ho // pool), -(-wo // pool)
  # Enough zeros on the far edges for every phase to have po x qo positions.
  xp = jnp.pad(x, ((0, 0), (pad, pad + po * pool - ho), (pad, pad + qo * pool - wo), (0, 0)))
  taps = kernel.reshape(k * k, cin, cout)
  best = None
  for a in range(pool):
    for c in range(pool):
      views = [xp[:, a + i:a + i + pool * (po - 1) + 1:pool,
                  c + j:c + j + pool * (qo - 1) + 1:pool, :] for i in range(k) for j in range(k)]
      if im2col:
        y = jnp.concatenate(views, axis=-1) @ kernel.reshape(k * k * cin, cout)
      elif cin == 1:
        y = sum(v * t[0] for v, t in zip(views, taps))
      else:
        y = sum(v @ t for v, t in zip(views, taps))
      if a + pool * (po - 1) >= ho or c + pool * (qo - 1) >= wo:  # A ragged edge.
        rows = a + pool * np.arange(po) < ho
        cols = c + pool * np.arange(qo) < wo
        valid = rows[:, None] & cols[None, :]
        y = jnp.where(valid[None, :, :, None], y, -jnp.inf)
      best = y if best is None else jnp.maximum(best, y)
  return best


def _kernel_grad(x: jax.Array, g: jax.Array, k: int, pad: int) -> jax.Array:
  """Gradient of a convolution's (k, k, C_in, C_out) kernel, as k*k matmuls.

  Autodiff gives XLA's kernel-gradient convolution (emitted on CPU as a plain loop
  nest, several times slower than the forward convolution) or, for the shifted
  sum, k*k broadcast-multiply-reduces. Here the input is transposed once to
  (C_in, H, W, B) and the cotangent to (Ho, Wo, B, C_out), so that each tap's view
  is a copy of whole rows of B floats and its matmul contracts one long axis:
  dkernel[i, j] = view_ij (C_in, Ho*Wo*B) @ g (Ho*Wo*B, C_out). With the views in
  (C_in, B, H, W) order instead, XLA copied each one element by element (an index
  division per float), and those copies dominated the train step.

  Args:
    x: (B, H, W, C_in) convolution input.
    g: (B, Ho, Wo, C_out) cotangent of the convolution output.
  """
  cin, cout = x.shape[-1], g.shape[-1]
  gt = jnp.transpose(g, (1, 2, 0, 3)).reshape(-1, cout)
  taps = [v.reshape(cin, -1) @ gt for v in _batch_last_patches(x, k, pad)]
  return jnp.stack(taps).reshape(k, k, cin, cout)


def _with_dot_kernel_grad(conv: Callable) -> Callable:
  """`conv(x, kernel, pad)` whose kernel gradient is `_kernel_grad`; x's is conv's own."""
  def fwd(x, kernel, pad):
    return conv(x, kernel, pad), (x, kernel)

  def bwd(pad, res, g):
    x, kernel = res
    dx = jax.vjp(lambda x: conv(x, kernel, pad), x)[1](g)[0]  # Dropped by XLA if unused.
    return dx, _kernel_grad(x, g, kernel.shape[0], pad)

  wrapped = jax.custom_vjp(conv, nondiff_argnums=(2,))
  wrapped.defvjp(fwd, bwd)
  return wrapped


def _space_to_depth(x: jax.Array, kernel: jax.Array, pad: int, stride: int
                    ) -> tuple[jax.Array, jax.Array]:
  """A stride-s convolution's operands for the same convolution at stride 1, no padding.

  The padded input's s x s blocks become channels and the kernel, zero-padded to
  s * ceil(k / s) taps a side, is regrouped alike: (B, H, W, C_in) and (k, k, C_in,
  C_out) -> (B, Ho + k' - 1, Wo + k' - 1, s*s*C_in) and (k', k', s*s*C_in, C_out),
  k' = ceil(k / s), Ho = (H + 2 pad - k) // s + 1. Block channel (p*s + q)*C_in + c
  holds channel c at offset (p, q) in its block; tap (i, j) of the original kernel is
  tap (i // s, j // s) at that channel's (i % s, j % s).
  """
  k, _, cin, cout = kernel.shape
  b, h, w, _ = x.shape
  kb = -(-k // stride)
  ho, wo = (h + 2 * pad - k) // stride + 1, (w + 2 * pad - k) // stride + 1
  hs, ws = ho + kb - 1, wo + kb - 1
  # Negative high padding crops rows no output reads.
  x = lax.pad(x, jnp.zeros((), x.dtype), ((0, 0, 0), (pad, stride * hs - h - pad, 0),
                                          (pad, stride * ws - w - pad, 0), (0, 0, 0)))
  x = x.reshape(b, hs, stride, ws, stride, cin).transpose(0, 1, 3, 2, 4, 5)
  kernel = jnp.pad(kernel, ((0, stride * kb - k), (0, stride * kb - k), (0, 0), (0, 0)))
  kernel = kernel.reshape(kb, stride, kb, stride, cin, cout).transpose(0, 2, 1, 3, 4, 5)
  return (x.reshape(b, hs, ws, stride * stride * cin),
          kernel.reshape(kb, kb, stride * stride * cin, cout))


@dataclasses.dataclass(frozen=True)
class ConvImpl:
  """One way to compute `Conv`: its function, how it meets the pool, what it is for.

  Attributes:
    forward: without `fuses_pool`, ``(x, kernel, pad) -> y``: (B, H, W, C_in) and a
      (k, k, C_in, C_out) HWIO kernel to (B, Ho, Wo, C_out), Ho = H + 2 pad - k + 1;
      with it, ``(x, kernel, pad, pool) -> y`` max-pooled as `max_pool_ceil` does
      (no pool when `pool` is 1).
    description: what it computes and why it exists, in one line.
    fuses_pool: `forward` applies the max pool itself (in its own layout, or by
      pooling phase); `Conv` adds the bias after it. Otherwise `Conv` adds the bias
      and then pools.
    needs_pool: defined only with a pool of 2 or more to fuse.
    adds_bias: `forward` is ``(x, kernel, pad, bias) -> y`` and adds the (C_out,) bias
      itself, in the convolution's own pass; its kernel gradient is its own.
  """
  forward: Callable[..., jax.Array]
  description: str
  fuses_pool: bool = False
  needs_pool: bool = False
  adds_bias: bool = False


CONV_IMPLS: dict[str, ConvImpl] = {
    "xla": ConvImpl(
        _xla_conv,
        "XLA's own convolution (lax.conv_general_dilated): the reference, and the choice "
        "on GPU and TPU."),
    "onednn": ConvImpl(
        _onednn_conv,
        "oneDNN's convolution and gradients through XLA's FFI (float32, CPU): several "
        "times faster than XLA:CPU's in training; built on first use (nets.onednn).",
        adds_bias=True),
    "xla_channels_pad8": ConvImpl(
        _channels_pad8_conv,
        "XLA's convolution on C_in and C_out zero-padded to multiples of 8: XLA:CPU "
        "vectorises channels in groups of 8 floats."),
    "shifted_sum": ConvImpl(
        _shifted_sum_conv,
        "A sum of k*k shifted input views times each tap's matrix: avoids XLA:CPU's slow "
        "one-input-channel convolution."),
    "all_taps_matmul": ConvImpl(
        _all_taps_matmul_conv,
        "One matmul of the input by every tap's matrix, then k*k shifted slices summed: "
        "avoids XLA:CPU's convolution overhead at batch 1."),
    "im2col": ConvImpl(
        _im2col_conv,
        "The k*k shifted views concatenated on channels, then one matmul: faster than "
        "XLA:CPU's convolution for narrow layers at small batches."),
    "im2col_batch_last": ConvImpl(
        _im2col_batch_last_conv_pool,
        "im2col and pool with the batch axis last: whole-row copies and long matmul axes "
        "for a one-input-channel layer in training.",
        fuses_pool=True),
    "pool_phase": ConvImpl(
        functools.partial(_phase_conv_pool, im2col=False),
        "Convolution and max pool together by pooling phase, each phase a shifted sum: "
        "no full-resolution output is stored (inference).",
        fuses_pool=True, needs_pool=True),
    "pool_phase_im2col": ConvImpl(
        functools.partial(_phase_conv_pool, im2col=True),
        "pool_phase with each phase one im2col matmul: for the multi-channel layers "
        "(inference).",
        fuses_pool=True, needs_pool=True),
}

# How the kernel gradient of an implementation that does not fuse the pool is computed.
KERNEL_GRADS: dict[str, str] = {
    "autodiff": "JAX's derivative of the implementation's forward function.",
    "dot": "k*k matmuls over batch-last shifted views (_kernel_grad): XLA:CPU's "
           "kernel-gradient convolution is a slow loop nest.",
}


@functools.cache
def _unpooled(impl: str, kernel_grad: str) -> Callable[[jax.Array, jax.Array, int], jax.Array]:
  """The forward function of a non-pooling `CONV_IMPLS[impl]` with `kernel_grad`, built once."""
  forward = CONV_IMPLS[impl].forward
  return _with_dot_kernel_grad(forward) if kernel_grad == "dot" else forward


class _SquareConv(nn.Module):
  """What `Conv` and `StridedConv` share: `nn.Conv`'s parameters (HWIO `kernel`, `bias`)."""
  features: int
  kernel_size: int
  padding: int = 0
  impl: str = "xla"
  kernel_grad: str = "autodiff"
  kernel_init: Callable = nn.initializers.lecun_normal()
  param_dtype: jnp.dtype = jnp.float32
  dtype: jnp.dtype = jnp.float32

  def _cast_with_parameters(self, x: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """x (B, H, W, C_in), the (k, k, C_in, features) kernel and the bias, cast to `dtype`."""
    k, cin = self.kernel_size, x.shape[-1]
    kernel = self.param("kernel", self.kernel_init, (k, k, cin, self.features), self.param_dtype)
    bias = self.param("bias", nn.initializers.zeros_init(), (self.features,), self.param_dtype)
    return tuple(a.astype(self.dtype) for a in (x, kernel, bias))


class Conv(_SquareConv):
  """Stride-1 square convolution with symmetric zero padding, optionally max-pooled.

  Attributes:
    features: output channels.
    kernel_size: side of the square kernel.
    padding: zeros added on every side.
    impl: a `CONV_IMPLS` name; those with `needs_pool` need `pool` > 1.
    kernel_grad: a `KERNEL_GRADS` name; "dot" only for implementations that
      neither fuse the pool nor add the bias.
    pool: > 1: non-overlapping ceil-mode max pooling of this window after the
      convolution (`max_pool_ceil`), fused with it where `ConvImpl.fuses_pool`.
    kernel_init: initialiser of the (k, k, C_in, C_out) kernel.
    param_dtype: dtype of the kernel and bias, as in Flax's own layers.
    dtype: computation dtype: input, kernel and bias are cast to it, as in Flax's
      own layers (bfloat16 on TPU); the parameters stay `param_dtype`.
  """
  pool: int = 1

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    """(B, H, W, C_in) -> (B, Ho, Wo, features), Ho = H + 2p - k + 1 (pooled: ceil(Ho / pool))."""
    impl = CONV_IMPLS.get(self.impl)
    if impl is None:
      raise ValueError(f"Unknown conv impl {self.impl!r}; expected one of {tuple(CONV_IMPLS)}.")
    if self.kernel_grad not in KERNEL_GRADS:
      raise ValueError(f"Unknown kernel_grad {self.kernel_grad!r}; expected one of "
                       f"{tuple(KERNEL_GRADS)}.")
    if impl.needs_pool and self.pool < 2:
      raise ValueError(f"Conv impl {self.impl!r} fuses a max pool: it needs pool >= 2.")
    if (impl.fuses_pool or impl.adds_bias) and self.kernel_grad != "autodiff":
      raise ValueError(f"Conv impl {self.impl!r} computes its own kernel gradient: "
                       f"kernel_grad can only be 'autodiff', not {self.kernel_grad!r}.")
    x, kernel, bias = self._cast_with_parameters(x)
    if impl.fuses_pool:
      return impl.forward(x, kernel, self.padding, self.pool) + bias
    if impl.adds_bias:
      y = impl.forward(x, kernel, self.padding, bias)
    else:
      y = _unpooled(self.impl, self.kernel_grad)(x, kernel, self.padding) + bias
    return max_pool_ceil(y, self.pool) if self.pool > 1 else y


# Implementations of `StridedConv`.
STRIDED_CONV_IMPLS: dict[str, str] = {
    "xla": "XLA's strided convolution: the reference, and the choice on GPU and TPU.",
    "space_to_depth": "The input's stride x stride blocks moved onto channels, then XLA's "
                      "stride-1 convolution: XLA:CPU emits the strided one's gradients as "
                      "slow loop nests.",
    "onednn": "oneDNN's strided convolution and gradients through XLA's FFI (float32, "
              "CPU; nets.onednn).",
}


class StridedConv(_SquareConv):
  """Square convolution with a stride and symmetric zero padding; `nn.Conv`'s parameters.

  Attributes:
    features: output channels.
    kernel_size: side of the square kernel.
    stride: step of the window in both directions.
    padding: zeros added on every side.
    impl: a `STRIDED_CONV_IMPLS` name.
    kernel_grad: a `KERNEL_GRADS` name; "dot" only with "space_to_depth" (for its
      stride-1 convolution).
    kernel_init: initialiser of the (k, k, C_in, C_out) kernel.
    param_dtype: dtype of the kernel and bias.
    dtype: computation dtype (input, kernel and bias are cast to it).
  """
  stride: int = 2

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    """(B, H, W, C_in) -> (B, Ho, Wo, features), Ho = (H + 2p - k) // stride + 1."""
    if self.impl not in STRIDED_CONV_IMPLS:
      raise ValueError(f"Unknown strided conv impl {self.impl!r}; expected one of "
                       f"{tuple(STRIDED_CONV_IMPLS)}.")
    grads = tuple(KERNEL_GRADS) if self.impl == "space_to_depth" else ("autodiff",)
    if self.kernel_grad not in grads:
      raise ValueError(f"Strided conv impl {self.impl!r} takes a kernel_grad of {grads}; got "
                       f"{self.kernel_grad!r}.")
    x, kernel, bias = self._cast_with_parameters(x)
    if self.impl == "xla":
      y = lax.conv_general_dilated(x, kernel, (self.stride,) * 2, [(self.padding,) * 2] * 2,
                                   dimension_numbers=("NHWC", "HWIO", "NHWC"))
    elif self.impl == "onednn":
      return onednn.conv(x, kernel, (self.stride,) * 2, ((self.padding,) * 2,) * 2, bias)
    else:
      y = _unpooled("xla", self.kernel_grad)(*_space_to_depth(x, kernel, self.padding,
                                                               self.stride), 0)
    return y + bias


# Implementations of `batch_norm` in training; both keep Flax's variables ("scale",
# "bias"; "batch_stats" "mean", "var"), so a checkpoint runs with either.
NORM_IMPLS: dict[str, str] = {
    "flax": "Flax's nn.BatchNorm: the reference, and the choice on GPU and TPU.",
    "onednn": "oneDNN's batch normalization and its gradient through XLA's FFI (float32, "
              "CPU; nets.onednn): XLA:CPU's BatchNorm sums are slow.",
}


class _OnednnBatchNorm(nn.Module):
  """`nn.BatchNorm`'s computation and variables, with batch statistics from `onednn.batch_norm`."""
  use_running_average: bool
  momentum: float
  epsilon: float

  @nn.compact
  def __call__(self, x: jax.Array, relu: bool = False) -> jax.Array:
    """(B, H, W, C) float32 -> the same, normalised per channel (then ReLU'd with `relu`,
    in the same oneDNN call in training)."""
    c = x.shape[-1]
    mean = self.variable("batch_stats", "mean", lambda: jnp.zeros((c,), jnp.float32))
    var = self.variable("batch_stats", "var", lambda: jnp.ones((c,), jnp.float32))
    scale = self.param("scale", nn.initializers.ones, (c,), jnp.float32)
    bias = self.param("bias", nn.initializers.zeros, (c,), jnp.float32)
    if self.use_running_average:
      y = (x - mean.value) * (lax.rsqrt(var.value + self.epsilon) * scale) + bias
      return nn.relu(y) if relu else y
    y, batch_mean, batch_var = onednn.batch_norm(x, scale, bias, self.epsilon, relu)
    if not self.is_initializing():
      mean.value = self.momentum * mean.value + (1 - self.momentum) * batch_mean
      var.value = self.momentum * var.value + (1 - self.momentum) * batch_var
    return y


def batch_norm(impl: str, train: bool, name: str, dtype: jnp.dtype, *, momentum: float,
               epsilon: float) -> nn.Module:
  """A BatchNorm module named `name`, (B, H, W, C) -> (B, H, W, C): batch statistics in
  training, running ones otherwise, by `NORM_IMPLS[impl]` (dtypes other than float32:
  Flax's, since oneDNN's calls are float32 only)."""
  if impl not in NORM_IMPLS:
    raise ValueError(f"Unknown norm impl {impl!r}; expected one of {tuple(NORM_IMPLS)}.")
  if impl == "onednn" and jnp.dtype(dtype) == jnp.float32:
    return _OnednnBatchNorm(not train, momentum, epsilon, name=name)
  # Flax reduces the statistics in float32 and keeps the running ones float32.
  return nn.BatchNorm(use_running_average=not train, momentum=momentum, epsilon=epsilon,
                      dtype=dtype, name=name)


def batch_norm_relu(norm: nn.Module, x: jax.Array) -> jax.Array:
  """relu(norm(x)) for a `batch_norm` module: one call where it is oneDNN's.

  Args:
    norm: a module `batch_norm` returned.
    x: (B, H, W, C).

  Returns:
    (B, H, W, C).
  """
  if isinstance(norm, _OnednnBatchNorm):
    return norm(x, relu=True)
  return nn.relu(norm(x))


def _pool_windows(x: jax.Array, window: int) -> jax.Array:
  """(B, H, W, C) -> (B, Ho, window, Wo, window, C), edges padded with -inf.

  -inf never wins a max, so a window running past the edge takes the max over
  the pixels it covers (Chainer's cover_all).
  """
  b, h, w, c = x.shape
  ho, wo = -(-h // window), -(-w // window)
  x = jnp.pad(x, ((0, 0), (0, ho * window - h), (0, wo * window - w), (0, 0)),
              constant_values=-jnp.inf)
  return x.reshape(b, ho, window, wo, window, c)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def max_pool_ceil(x: jax.Array, window: int = 2) -> jax.Array:
  """Non-overlapping max pooling that rounds its output size up (Chainer's cover_all).

  A reshape and a max rather than `nn.max_pool`: the gradient of XLA's
  reduce_window is select_and_scatter, several times slower on CPU than this one.
  The gradient routes each output's cotangent to the first maximum of its window
  in row-major order, exactly as select_and_scatter does, ties included.

  Args:
    x: (B, H, W, C).
    window: side of the square window, also its stride.

  Returns:
    (B, ceil(H / window), ceil(W / window), C).
  """
  return jnp.max(_pool_windows(x, window), axis=(2, 4))


def _max_pool_fwd(x: jax.Array, window: int) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
  y = max_pool_ceil(x, window)
  return y, (x, y)


def _max_pool_bwd(window: int, res: tuple[jax.Array, jax.Array], g: jax.Array
                  ) -> tuple[jax.Array]:
  x, y = res
  xw = _pool_windows(x, window)
  taken = jnp.zeros(y.shape, bool)  # Whether an earlier tap of the window was the max.
  rows = []
  for i in range(window):
    row = []
    for j in range(window):
      hit = (xw[:, :, i, :, j] == y) & ~taken
      taken = taken | hit
      row.append(jnp.where(hit, g, 0.0))
    rows.append(jnp.stack(row, axis=3))
  b, ho, wo, c = y.shape
  gx = jnp.stack(rows, axis=2).reshape(b, ho * window, wo * window, c)
  return (gx[:, :x.shape[1], :x.shape[2]],)


max_pool_ceil.defvjp(_max_pool_fwd, _max_pool_bwd)
