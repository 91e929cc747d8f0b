"""B-AlexNet (3 exits) and AlexNet for 32x32x3 images (CIFAR-10), as in the authors' code.

Trunk: conv1 3->32 5x5 -> ReLU -> pool -> LRN -> conv2 32->64 5x5 -> ReLU -> pool -> LRN
-> conv3 64->96 3x3 -> ReLU -> conv4 96->96 3x3 -> ReLU -> conv5 96->64 3x3 -> ReLU
-> pool -> fc1 1024->256 -> ReLU -> dropout -> fc2 256->128 -> ReLU -> dropout
-> exit 3 = fc3 128->10. Every conv pads k // 2 (5x5 pad 2, 3x3 pad 1, the code's
values); every pool is 3x3 stride 2 rounding up (Chainer's cover_all), which with
those pads gives 32 -> 16 -> 8 -> 4 and the code's FC inputs (1024, 512, 128).
LRN is Chainer's with n=3, alpha=5e-5, beta=0.75, k=2.

Exits (``placement``):

- ``"code"`` (default): exit 1 after conv2, exit 2 after conv3 (both before the ReLU).
  Exit 1: ReLU, pool, LRN, conv 64->32 3x3 + ReLU, conv 32->32 + ReLU, pool,
  FC 512->10 (8x8 -> 4x4 x 32). Exit 2: ReLU, pool, LRN, conv 96->32 + ReLU, pool,
  FC 128->10 (8x8 -> 4x4 -> 2x2 x 32).
- ``"paper"``: exit 1 after conv1, exit 2 after conv2, with the same branch layers,
  their input channels following the attachment point: exit 1 conv 32->32, conv
  32->32, FC 2048->10 (16x16 -> 8x8 x 32); exit 2 conv 64->32, FC 512->10 (8x8 -> 4x4 x 32).

Each exit's branch begins with the ReLU (and, where the trunk pools next, the same
pool + LRN) that the trunk applies next, so the stage ends after those shared layers:
computed once, and a smaller activation between stages.
Stage outputs: code (8, 8, 64), (8, 8, 96), (128,); paper (16, 16, 32), (8, 8, 64), (128,).
"""

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from bnet_jax.nets import layers
from bnet_jax.nets.core import Network, Stage
from bnet_jax.nets.lrn import paper_lrn

PLACEMENTS = ("code", "paper")


def max_pool_3x3_s2(x: jax.Array) -> jax.Array:
  """3x3 stride-2 max pooling that rounds its output size up (Chainer's cover_all).

  The max of nine strided slices rather than `nn.max_pool`: on CPU the gradient of
  XLA's reduce_window (select_and_scatter) is several times slower than this.

  Args:
    x: (B, H, W, C).

  Returns:
    (B, (H - 2) // 2 + 1, (W - 2) // 2 + 1, C): 32 -> 16, 16 -> 8, 8 -> 4, 4 -> 2.
  """
  _, h, w, _ = x.shape
  ho, wo = (h - 2) // 2 + 1, (w - 2) // 2 + 1
  # Windows running past the edge see -inf, which never wins: cover_all.
  x = jnp.pad(x, ((0, 0), (0, 2 * ho + 1 - h), (0, 2 * wo + 1 - w), (0, 0)),
              constant_values=-jnp.inf)
  taps = [x[:, i:i + 2 * ho - 1:2, j:j + 2 * wo - 1:2] for i in range(3) for j in range(3)]
  return functools.reduce(jnp.maximum, taps)


def _relu_pool_lrn(x: jax.Array) -> jax.Array:
  return paper_lrn(max_pool_3x3_s2(nn.relu(x)))


def _conv(features: int, kernel: int, name: str, module: nn.Module) -> layers.Conv:
  """A k // 2-padded `layers.Conv` with `module`'s implementation, kernel gradient and dtype."""
  return layers.Conv(features, kernel, padding=kernel // 2, impl=module.conv_impl,
                     kernel_grad=module.conv_kernel_grad, name=name, dtype=module.dtype)


def _flatten(x: jax.Array) -> jax.Array:
  return x.reshape(x.shape[0], -1)


class Trunk(nn.Module):
  """A run of AlexNet's trunk blocks, in order.

  Blocks: ``conv1`` (B, 32, 32, 3) -> (B, 16, 16, 32) [conv, ReLU, pool, LRN];
  ``conv2`` -> (B, 8, 8, 64) [conv, ReLU, pool, LRN]; ``conv3`` -> (B, 8, 8, 96)
  [conv, ReLU]; ``top`` -> (B, 128) [conv4, conv5, pool, fc1, fc2, with ReLUs and
  dropout].
  """
  blocks: tuple[str, ...]
  conv_impl: str = "xla"
  conv_kernel_grad: str = "autodiff"
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    for block in self.blocks:
      if block == "conv1":
        x = _relu_pool_lrn(_conv(32, 5, "conv1", self)(x))
      elif block == "conv2":
        x = _relu_pool_lrn(_conv(64, 5, "conv2", self)(x))
      elif block == "conv3":
        x = nn.relu(_conv(96, 3, "conv3", self)(x))
      elif block == "top":
        x = nn.relu(_conv(96, 3, "conv4", self)(x))
        x = nn.relu(_conv(64, 3, "conv5", self)(x))
        x = _flatten(max_pool_3x3_s2(x))
        x = nn.relu(nn.Dense(256, dtype=self.dtype, name="fc1")(x))
        x = nn.Dropout(0.5, deterministic=not train)(x)
        x = nn.relu(nn.Dense(128, dtype=self.dtype, name="fc2")(x))
        x = nn.Dropout(0.5, deterministic=not train)(x)
      else:
        raise ValueError(f"Unknown AlexNet block {block!r}.")
    return x


class Branch(nn.Module):
  """An early exit: [pool, LRN], `num_convs` x (conv 32 3x3 + ReLU), pool, FC -> 10.

  (B, H, W, C) -> (B, 10) logits; the FC input is 32 * ceil-pooled H * W.
  """
  num_convs: int
  pool_first: bool
  conv_impl: str = "xla"
  conv_kernel_grad: str = "autodiff"
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    if self.pool_first:
      x = paper_lrn(max_pool_3x3_s2(x))
    for i in range(self.num_convs):
      x = nn.relu(_conv(32, 3, f"conv{i + 1}", self)(x))
    return nn.Dense(10, dtype=self.dtype, name="fc")(_flatten(max_pool_3x3_s2(x)))


class MainExit(nn.Module):
  """(B, 128) -> (B, 10) logits: fc3."""
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    return nn.Dense(10, dtype=self.dtype, name="fc3")(x)


def b_alexnet(placement: str = "code", conv_impl: str = "xla", dtype: Any = "float32", *,
              conv_kernel_grad: str = "autodiff") -> Network:
  """B-AlexNet for CIFAR-10.

  Args:
    placement: "code" (exits after conv2 and conv3, as the authors' code) or "paper"
      (after conv1 and conv2).
    conv_impl: implementation of every convolution (a `layers.CONV_IMPLS` name).
    dtype: computation dtype of every layer (parameters stay float32).
    conv_kernel_grad: how every convolution's kernel gradient is computed (a
      `layers.KERNEL_GRADS` name).

  Returns:
    A 3-exit `Network` named "b_alexnet" ("b_alexnet_paper" for the paper's placement).
  """
  convs = dict(conv_impl=conv_impl, conv_kernel_grad=conv_kernel_grad, dtype=jnp.dtype(dtype))
  trunk, branch = functools.partial(Trunk, **convs), functools.partial(Branch, **convs)
  main = MainExit(convs["dtype"])
  if placement == "code":
    stages = (Stage(trunk(("conv1", "conv2")), branch(2, False)),
              Stage(trunk(("conv3",)), branch(1, True)),
              Stage(trunk(("top",)), main))
  elif placement == "paper":
    stages = (Stage(trunk(("conv1",)), branch(2, False)),
              Stage(trunk(("conv2",)), branch(1, False)),
              Stage(trunk(("conv3", "top")), main))
  else:
    raise ValueError(f"Unknown placement {placement!r}; expected one of {PLACEMENTS}.")
  suffix = "" if placement == "code" else f"_{placement}"
  return Network(name=f"b_alexnet{suffix}", stages=stages, input_shape=(32, 32, 3),
                 num_classes=10)


def alexnet(placement: str = "code", conv_impl: str = "xla", dtype: Any = "float32", *,
            conv_kernel_grad: str = "autodiff") -> Network:
  """AlexNet: B-AlexNet's trunk and main exit, parameters named as in B-AlexNet."""
  suffix = "" if placement == "code" else f"_{placement}"
  return b_alexnet(placement, conv_impl, dtype, conv_kernel_grad=conv_kernel_grad
                   ).main_network(name=f"alexnet{suffix}")
