"""B-AlexNet (3 exits) and AlexNet, as in the authors' code, for H x W x C images.

Sizes are given for an H x W x C input, with CIFAR-10's 32x32x3 in brackets.

Trunk: conv1 C->32 5x5 -> ReLU -> pool -> LRN -> conv2 32->64 5x5 -> ReLU -> pool -> LRN
-> conv3 64->96 3x3 -> ReLU -> conv4 96->96 3x3 -> ReLU -> conv5 96->64 3x3 -> ReLU
-> pool -> fc1 (H // 8)(W // 8)64 [1024] ->256 -> ReLU -> dropout -> fc2 256->128 -> ReLU
-> dropout -> exit 3 = fc3 128->num_classes. Every conv pads k // 2 (5x5 pad 2, 3x3 pad
1, the code's values), keeping the side; every pool is 3x3 stride 2 rounding up
(Chainer's cover_all), which halves the side rounding down (32 -> 16 -> 8 -> 4).
LRN is Chainer's with n=3, alpha=5e-5, beta=0.75, k=2.

Exits (``placement``):

- ``"code"`` (default): exit 1 after conv2, exit 2 after conv3 (both before the ReLU).
- ``"paper"``: exit 1 after conv1, exit 2 after conv2.

Exit heads (``exit_heads``):

- ``"authors"`` (default): the code's branches, input channels following the
  attachment point. Code placement: exit 1 ReLU, pool, LRN, conv 64->32 3x3 + ReLU,
  conv 32->32 + ReLU, pool, FC (H // 8)(W // 8)32 [512] ->num_classes; exit 2 ReLU,
  pool, LRN, conv 96->32 + ReLU, pool, FC (H // 16)(W // 16)32 [128]. Paper placement:
  exit 1 conv 32->32, conv 32->32, pool, FC (H // 4)(W // 4)32 [2048]; exit 2 conv
  64->32, pool, FC (H // 8)(W // 8)32 [512].
- ``"trunk"``: conv 3x3 to 32 + ReLU on the stage's output, global average pool, FC
  32->num_classes: a head a few percent of the main path's FLOPs at any input size.

Each exit's branch begins with the ReLU (and, where the trunk pools next, the same
pool + LRN) that the trunk applies next, so the stage ends after those shared layers:
computed once, and a smaller activation between stages. Stage outputs: code
(H // 4, W // 4, 64) [8x8], (H // 4, W // 4, 96), (128,); paper (H // 2, W // 2, 32)
[16x16], (H // 4, W // 4, 64), (128,). Every pool needs a side of 2 or more, so the
longest chain of pools (4 for the code placement's authors' heads, else 3) sets the
smallest input side, 2 ** pools: 16 or 8.
"""

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from bnet_jax.nets import layers, onednn
from bnet_jax.nets.core import Network, Stage
from bnet_jax.nets.lrn import paper_lrn

PLACEMENTS = ("code", "paper")
EXIT_HEADS = ("authors", "trunk")


def max_pool_3x3_s2(x: jax.Array, conv_impl: str = "xla") -> jax.Array:
  """3x3 stride-2 max pooling that rounds its output size up (Chainer's cover_all).

  With oneDNN's convolutions, oneDNN's pooling (float32): XLA computes the gradient
  of the slices below as one slow select over nine padded copies. Otherwise the max
  of nine strided slices rather than `nn.max_pool`: on CPU the gradient of XLA's
  reduce_window (select_and_scatter) is several times slower than this.

  Args:
    x: (B, H, W, C).
    conv_impl: the network's convolutions (a `layers.CONV_IMPLS` name).

  Returns:
    (B, (H - 2) // 2 + 1, (W - 2) // 2 + 1, C), which is (B, H // 2, W // 2, C):
    32 -> 16, 16 -> 8, 8 -> 4, 4 -> 2; 7 -> 3.
  """
  _, h, w, _ = x.shape
  ho, wo = (h - 2) // 2 + 1, (w - 2) // 2 + 1
  if conv_impl == "onednn" and x.dtype == jnp.float32:
    return onednn.max_pool(x, 3, 2, ((0, 2 * ho + 1 - h), (0, 2 * wo + 1 - w)))
  # Windows running past the edge see -inf, which never wins: cover_all.
  x = jnp.pad(x, ((0, 0), (0, 2 * ho + 1 - h), (0, 2 * wo + 1 - w), (0, 0)),
              constant_values=-jnp.inf)
  taps = [x[:, i:i + 2 * ho - 1:2, j:j + 2 * wo - 1:2] for i in range(3) for j in range(3)]
  return functools.reduce(jnp.maximum, taps)


def _relu_pool_lrn(x: jax.Array, conv_impl: str) -> jax.Array:
  return paper_lrn(max_pool_3x3_s2(nn.relu(x), conv_impl))


def _conv(features: int, kernel: int, name: str, module: nn.Module) -> layers.Conv:
  """A k // 2-padded `layers.Conv` with `module`'s implementation, kernel gradient and dtype."""
  return layers.Conv(features, kernel, padding=kernel // 2, impl=module.conv_impl,
                     kernel_grad=module.conv_kernel_grad, name=name, dtype=module.dtype)


def _flatten(x: jax.Array) -> jax.Array:
  return x.reshape(x.shape[0], -1)


class Trunk(nn.Module):
  """A run of AlexNet's trunk blocks, in order.

  Blocks: ``conv1`` (B, H, W, C) -> (B, H // 2, W // 2, 32) [conv, ReLU, pool, LRN];
  ``conv2`` -> (B, H // 4, W // 4, 64) [conv, ReLU, pool, LRN]; ``conv3`` -> (B, H // 4,
  W // 4, 96) [conv, ReLU]; ``top`` -> (B, 128) [conv4, conv5, pool, fc1, fc2, with
  ReLUs and dropout]. CIFAR-10: 32 -> 16 -> 8.
  """
  blocks: tuple[str, ...]
  conv_impl: str = "xla"
  conv_kernel_grad: str = "autodiff"
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    for block in self.blocks:
      if block == "conv1":
        x = _relu_pool_lrn(_conv(32, 5, "conv1", self)(x), self.conv_impl)
      elif block == "conv2":
        x = _relu_pool_lrn(_conv(64, 5, "conv2", self)(x), self.conv_impl)
      elif block == "conv3":
        x = nn.relu(_conv(96, 3, "conv3", self)(x))
      elif block == "top":
        x = nn.relu(_conv(96, 3, "conv4", self)(x))
        x = nn.relu(_conv(64, 3, "conv5", self)(x))
        x = _flatten(max_pool_3x3_s2(x, self.conv_impl))
        x = nn.relu(nn.Dense(256, dtype=self.dtype, name="fc1")(x))
        x = nn.Dropout(0.5, deterministic=not train)(x)
        x = nn.relu(nn.Dense(128, dtype=self.dtype, name="fc2")(x))
        x = nn.Dropout(0.5, deterministic=not train)(x)
      else:
        raise ValueError(f"Unknown AlexNet block {block!r}.")
    return x


class Branch(nn.Module):
  """The authors' early exit: [pool, LRN], `num_convs` x (conv 32 3x3 + ReLU), pool, FC.

  (B, H, W, C) -> (B, num_classes) logits; the FC input is 32 * ceil-pooled H * W.
  """
  num_convs: int
  pool_first: bool
  num_classes: int
  conv_impl: str = "xla"
  conv_kernel_grad: str = "autodiff"
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    if self.pool_first:
      x = paper_lrn(max_pool_3x3_s2(x, self.conv_impl))
    for i in range(self.num_convs):
      x = nn.relu(_conv(32, 3, f"conv{i + 1}", self)(x))
    x = _flatten(max_pool_3x3_s2(x, self.conv_impl))
    return nn.Dense(self.num_classes, dtype=self.dtype, name="fc")(x)


class TrunkBranch(nn.Module):
  """An early exit sized to the trunk: conv 32 3x3 + ReLU, global average pool, FC.

  (B, H, W, C) -> (B, num_classes) logits; costs about 2 * 9 * C * 32 FLOPs a pixel.
  """
  num_classes: int
  conv_impl: str = "xla"
  conv_kernel_grad: str = "autodiff"
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    x = nn.relu(_conv(32, 3, "conv", self)(x))
    # A mean over H * W activations: float32 even in a bfloat16 network.
    x = jnp.mean(x.astype(jnp.float32), axis=(1, 2)).astype(x.dtype)
    return nn.Dense(self.num_classes, dtype=self.dtype, name="fc")(x)


class MainExit(nn.Module):
  """(B, 128) -> (B, num_classes) logits: fc3."""
  num_classes: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    return nn.Dense(self.num_classes, dtype=self.dtype, name="fc3")(x)


def b_alexnet(placement: str = "code", conv_impl: str = "xla", dtype: Any = "float32", *,
              conv_kernel_grad: str = "autodiff",
              input_shape: tuple[int, int, int] = (32, 32, 3), num_classes: int = 10,
              exit_heads: str = "authors") -> Network:
  """B-AlexNet for H x W x C images (CIFAR-10 by default).

  Args:
    placement: "code" (exits after conv2 and conv3, as the authors' code) or "paper"
      (after conv1 and conv2).
    conv_impl: implementation of every convolution (a `layers.CONV_IMPLS` name);
      "onednn" max-pools with oneDNN too (`max_pool_3x3_s2`).
    dtype: computation dtype of every layer (parameters stay float32).
    conv_kernel_grad: how every convolution's kernel gradient is computed (a
      `layers.KERNEL_GRADS` name).
    input_shape: (H, W, C) of one image (a list is taken too); each side at least 16
      for the code placement's authors' heads, else 8.
    num_classes: classes of every exit.
    exit_heads: "authors" (the code's branches) or "trunk" (one conv, global average
      pool, FC: see the module docstring).

  Returns:
    A 3-exit `Network` named "b_alexnet" ("b_alexnet_paper" for the paper's placement;
    "_trunk_heads" appended for trunk heads).
  """
  if placement not in PLACEMENTS:
    raise ValueError(f"Unknown placement {placement!r}; expected one of {PLACEMENTS}.")
  if exit_heads not in EXIT_HEADS:
    raise ValueError(f"Unknown exit_heads {exit_heads!r}; expected one of {EXIT_HEADS}.")
  input_shape = tuple(input_shape)
  if (placement, exit_heads) == ("code", "authors"):
    pools, network = 4, "B-AlexNet with the code's exits and heads"
  else:
    pools, network = 3, "AlexNet"
  if min(input_shape[:2]) < 2 ** pools:
    raise ValueError(f"{network} needs images of at least {2 ** pools}x{2 ** pools} ({pools} "
                     f"stride-2 pools); got {input_shape[0]}x{input_shape[1]}.")
  convs = dict(conv_impl=conv_impl, conv_kernel_grad=conv_kernel_grad, dtype=jnp.dtype(dtype))
  trunk = functools.partial(Trunk, **convs)
  if exit_heads == "authors":  # Exit 2 pools first where the trunk does not pool next.
    heads = (Branch(2, False, num_classes, **convs),
             Branch(1, placement == "code", num_classes, **convs))
  else:
    heads = (TrunkBranch(num_classes, **convs), TrunkBranch(num_classes, **convs))
  main = MainExit(num_classes, convs["dtype"])
  if placement == "code":
    stages = (Stage(trunk(("conv1", "conv2")), heads[0]), Stage(trunk(("conv3",)), heads[1]),
              Stage(trunk(("top",)), main))
  else:
    stages = (Stage(trunk(("conv1",)), heads[0]), Stage(trunk(("conv2",)), heads[1]),
              Stage(trunk(("conv3", "top")), main))
  suffix = ("" if placement == "code" else f"_{placement}") + (
      "" if exit_heads == "authors" else "_trunk_heads")
  return Network(name=f"b_alexnet{suffix}", stages=stages, input_shape=input_shape,
                 num_classes=num_classes)


def alexnet(placement: str = "code", conv_impl: str = "xla", dtype: Any = "float32", *,
            conv_kernel_grad: str = "autodiff",
            input_shape: tuple[int, int, int] = (32, 32, 3), num_classes: int = 10) -> Network:
  """AlexNet: B-AlexNet's trunk and main exit, parameters named as in B-AlexNet."""
  suffix = "" if placement == "code" else f"_{placement}"
  # The heads are dropped; trunk heads need no larger input than the trunk does.
  return b_alexnet(placement, conv_impl, dtype, conv_kernel_grad=conv_kernel_grad,
                   input_shape=input_shape, num_classes=num_classes, exit_heads="trunk"
                   ).main_network(name=f"alexnet{suffix}")
