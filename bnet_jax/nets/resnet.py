"""B-ResNet (3 exits) and ResNet of depth 6n+2, as in the authors' code, for H x W x C images.

Sizes are given for an H x W x C input, with CIFAR-10's 32x32x3 in brackets; S = H - 2
and T = W - 2 are the sides after the stem [30].

Trunk: stem conv C->16 3x3 pad 0 (S x T), BN, ReLU -> n residual blocks at 16 channels
(S x T) -> n blocks at 32 (the first with stride 2: ceil(S / 2) [15]) -> n blocks at 64
(the first with stride 2: ceil(S / 4) [8]) -> 6x6 stride-1 average pool (ceil(S / 4) - 5
[3]) -> exit 3 = FC (ceil(S / 4) - 5)(ceil(T / 4) - 5)64 [576, the code's size]
->num_classes. The pool needs the last stage at least 6 wide: sides of at least 23
(`MIN_SIDE`). Depth 110 is n = 18.

Residual block: conv 3x3 pad 1 (stride s) + BN + ReLU, conv 3x3 pad 1 + BN, add the
shortcut, ReLU. When the block changes shape the shortcut is "option A": the input
subsampled by s (stride-s 1x1 pick) with zero channels prepended, as the code's
``concat((zeros, x))``. Convolutions have biases and He-normal kernels (Chainer's
``wscale=sqrt(2)``); BatchNorm: momentum 0.9, epsilon 1e-5, batch statistics in
training, running statistics in evaluation.

Exits (``placement``):

- ``"code"`` (default): exit 1 after the stem (before the first block).
- ``"paper"``: exit 1 after the 2nd conv layer. A residual block's inner conv output
  is not a point one can branch at without cutting the block from its shortcut, so
  exit 1 follows the first residual block (whose first conv is the 2nd conv layer);
  the later version of the authors' code branches at the same point. The 16-channel
  stage then has n - 1 blocks before exit 2, so the depth is unchanged. All shapes
  stay S x T x 16, so the heads are the same as for "code".

Exit heads (``exit_heads``), both on S x T x 16 maps:

- ``"authors"`` (default), sized for ResNet-110. Exit 1: conv 16->64 5x5 pad 2, ReLU,
  LRN, conv 64->32 3x3 pad 1 + ReLU, conv 32->32 + ReLU, FC S T 32 [28800]
  ->num_classes. Exit 2 (after the 16-channel blocks): one residual block 16->16 and FC
  S T 16 [14400]. Exit 1 alone costs more FLOPs than ResNet-20's whole main path.
- ``"trunk"``, sized to the trunk: conv 16->32 3x3 stride 2 (the trunk's next
  downsampling conv) + BN + ReLU, global average pool, FC 32->num_classes: about 3%
  of ResNet-20's main-path FLOPs, less for deeper networks.

Stage outputs: (S, T, 16), (S, T, 16), ((ceil(S / 4) - 5)(ceil(T / 4) - 5)64,).
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
EXIT_HEADS = ("authors", "trunk")
STANDARD_DEPTHS = (20, 32, 44, 56, 110)
# The smallest image side: the stem takes 2, two stride-2 stages leave ceil(21 / 4) = 6,
# the average pool's width.
MIN_SIDE = 23

_he_normal = nn.initializers.he_normal()


def _batch_norm(train: bool, name: str, module: nn.Module) -> nn.Module:
  """BatchNorm (momentum 0.9, epsilon 1e-5) in `module`'s dtype and `norm_impl`."""
  return layers.batch_norm(module.norm_impl, train, name, module.dtype, momentum=0.9,
                           epsilon=1e-5)


def _conv3x3(features: int, stride: int, name: str, module: nn.Module) -> nn.Module:
  """A 3x3 pad-1 He-normal conv with `module`'s implementation for its stride."""
  dtype = module.dtype
  if stride == 1:
    return layers.Conv(features, 3, padding=1, impl=module.conv_impl,
                       kernel_grad=module.conv_kernel_grad, kernel_init=_he_normal, dtype=dtype,
                       name=name)
  return layers.StridedConv(features, 3, padding=1, stride=stride,
                            impl=module.strided_conv_impl,
                            kernel_grad=module.strided_conv_kernel_grad,
                            kernel_init=_he_normal, dtype=dtype, name=name)


def _flatten(x: jax.Array) -> jax.Array:
  return x.reshape(x.shape[0], -1)


class ResBlock(nn.Module):
  """(B, H, W, C) -> (B, ceil(H / stride), ceil(W / stride), features)."""
  features: int
  stride: int = 1
  conv_impl: str = "xla"
  conv_kernel_grad: str = "autodiff"
  strided_conv_impl: str = "xla"
  strided_conv_kernel_grad: str = "autodiff"
  dtype: Any = jnp.float32
  norm_impl: str = "flax"

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    h = _conv3x3(self.features, self.stride, "conv1", self)(x)
    h = layers.batch_norm_relu(_batch_norm(train, "bn1", self), h)
    h = _conv3x3(self.features, 1, "conv2", self)(h)
    h = _batch_norm(train, "bn2", self)(h)
    if x.shape != h.shape:  # Option A: subsample, prepend zero channels; no parameters.
      x = x[:, ::self.stride, ::self.stride]
      x = jnp.pad(x, ((0, 0), (0, 0), (0, 0), (self.features - x.shape[-1], 0)))
    return nn.relu(h + x.astype(h.dtype))


class Trunk(nn.Module):
  """A run of the trunk: optional stem, residual blocks, optional final pool.

  Attributes:
    stem: start with conv C->16 3x3 pad 0 + BN + ReLU: (B, H, W, C) -> (B, H - 2, W - 2,
      16), e.g. 32x32x3 -> 30x30x16.
    blocks: (features, stride) of each residual block, in order.
    pool: end with the 6x6 stride-1 average pool and flatten: (B, H, W, 64) ->
      (B, (H - 5)(W - 5)64), e.g. 8x8 -> 576.
    conv_impl: implementation of the stride-1 convolutions (`layers.CONV_IMPLS`).
    conv_kernel_grad: how their kernel gradients are computed (`layers.KERNEL_GRADS`).
    strided_conv_impl: implementation of the stride-2 convolutions
      (`layers.STRIDED_CONV_IMPLS`).
    strided_conv_kernel_grad: how their kernel gradients are computed.
    dtype: computation dtype.
    norm_impl: implementation of the BatchNorms in training (`layers.NORM_IMPLS`).
  """
  stem: bool
  blocks: tuple[tuple[int, int], ...]
  pool: bool
  conv_impl: str = "xla"
  conv_kernel_grad: str = "autodiff"
  strided_conv_impl: str = "xla"
  strided_conv_kernel_grad: str = "autodiff"
  dtype: Any = jnp.float32
  norm_impl: str = "flax"

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    if self.stem:
      x = layers.Conv(16, 3, padding=0, impl=self.conv_impl, kernel_grad=self.conv_kernel_grad,
                      kernel_init=_he_normal, dtype=self.dtype, name="stem_conv")(x)
      x = layers.batch_norm_relu(_batch_norm(train, "stem_bn", self), x)
    for i, (features, stride) in enumerate(self.blocks):
      x = ResBlock(features, stride, self.conv_impl, self.conv_kernel_grad,
                   self.strided_conv_impl, self.strided_conv_kernel_grad, self.dtype,
                   self.norm_impl, name=f"block{i}")(x, train)
    if self.pool:
      # Sums of 36 activations: float32 even in a bfloat16 network.
      x = _flatten(nn.avg_pool(x.astype(jnp.float32), (6, 6), strides=(1, 1))).astype(x.dtype)
    return x


class Exit1(nn.Module):
  """The authors' exit 1, (B, H, W, 16) -> (B, num_classes): conv 5x5 64, ReLU, LRN,
  conv 32 + ReLU, conv 32 + ReLU, FC."""
  num_classes: int
  conv_impl: str = "xla"
  conv_kernel_grad: str = "autodiff"
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    conv = functools.partial(layers.Conv, impl=self.conv_impl, kernel_grad=self.conv_kernel_grad,
                             dtype=self.dtype)
    x = paper_lrn(nn.relu(conv(64, 5, padding=2, name="conv1")(x)))
    x = nn.relu(conv(32, 3, padding=1, name="conv2")(x))
    x = nn.relu(conv(32, 3, padding=1, name="conv3")(x))
    return nn.Dense(self.num_classes, dtype=self.dtype, name="fc")(_flatten(x))


class Exit2(nn.Module):
  """The authors' exit 2, (B, H, W, 16) -> (B, num_classes): one residual block 16->16, FC."""
  num_classes: int
  conv_impl: str = "xla"
  conv_kernel_grad: str = "autodiff"
  dtype: Any = jnp.float32
  norm_impl: str = "flax"

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    x = ResBlock(16, 1, self.conv_impl, self.conv_kernel_grad, dtype=self.dtype,
                 norm_impl=self.norm_impl, name="block")(x, train)
    return nn.Dense(self.num_classes, dtype=self.dtype, name="fc")(_flatten(x))


class TrunkExit(nn.Module):
  """An exit sized to the trunk, (B, H, W, C) -> (B, num_classes): conv 2C 3x3 stride 2 +
  BN + ReLU (as the trunk's next downsampling conv), global average pool, FC. Like the
  trunk's strided convs, its conv follows the strided-conv implementation."""
  num_classes: int
  strided_conv_impl: str = "xla"
  strided_conv_kernel_grad: str = "autodiff"
  dtype: Any = jnp.float32
  norm_impl: str = "flax"

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    x = _conv3x3(2 * x.shape[-1], 2, "conv", self)(x)
    x = layers.batch_norm_relu(_batch_norm(train, "bn", self), x)
    # A mean over H * W / 4 activations: float32 even in a bfloat16 network.
    x = jnp.mean(x.astype(jnp.float32), axis=(1, 2)).astype(x.dtype)
    return nn.Dense(self.num_classes, dtype=self.dtype, name="fc")(x)


class MainExit(nn.Module):
  """(B, F) -> (B, num_classes) logits; F: the pooled last stage, 3x3x64 = 576 for CIFAR-10."""
  num_classes: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    return nn.Dense(self.num_classes, dtype=self.dtype, name="fc")(x)


def blocks_per_stage(depth: int) -> int:
  """n for a CIFAR ResNet of `depth` = 6n + 2 layers; a ValueError for other depths."""
  if not isinstance(depth, int) or depth < 8 or (depth - 2) % 6:
    raise ValueError(f"ResNet depth must be 6n + 2 with n >= 1 (8, 14, 20, ...; standard: "
                     f"{STANDARD_DEPTHS}); got {depth!r}.")
  return (depth - 2) // 6


def _name(prefix: str, depth: int, placement: str, exit_heads: str = "authors") -> str:
  return (f"{prefix}{depth}" + ("" if placement == "code" else f"_{placement}")
          + ("" if exit_heads == "authors" else "_trunk_heads"))


def b_resnet(depth: int = 110, placement: str = "code", conv_impl: str = "xla",
             dtype: Any = "float32", *, conv_kernel_grad: str = "autodiff",
             strided_conv_impl: str = "xla", strided_conv_kernel_grad: str = "autodiff",
             input_shape: tuple[int, int, int] = (32, 32, 3), num_classes: int = 10,
             exit_heads: str = "authors", norm_impl: str = "flax") -> Network:
  """B-ResNet for H x W x C images (CIFAR-10 by default).

  Args:
    depth: 6n + 2 (110 as in the paper; 20, 32, 56 are standard smaller ones; 8 is
      the smallest, handy in tests; "paper" placement needs 14 or more).
    placement: "code" (exit 1 after the stem) or "paper" (after the first block).
    conv_impl: implementation of the stride-1 convolutions (a `layers.CONV_IMPLS` name).
    dtype: computation dtype of every layer (parameters and BatchNorm statistics
      stay float32).
    conv_kernel_grad: how their kernel gradients are computed (a `layers.KERNEL_GRADS`
      name).
    strided_conv_impl: implementation of the stride-2 convolutions (a
      `layers.STRIDED_CONV_IMPLS` name).
    strided_conv_kernel_grad: how their kernel gradients are computed.
    input_shape: (H, W, C) of one image (a list is taken too); sides of at least
      `MIN_SIDE`.
    num_classes: classes of every exit.
    exit_heads: "authors" (sized for ResNet-110) or "trunk" (one strided conv, global
      average pool, FC: see the module docstring).
    norm_impl: implementation of the BatchNorms in training (a `layers.NORM_IMPLS`
      name).

  Returns:
    A 3-exit `Network` named "b_resnet{depth}" ("b_resnet{depth}_paper";
    "_trunk_heads" appended for trunk heads).
  """
  n = blocks_per_stage(depth)
  if placement not in PLACEMENTS:
    raise ValueError(f"Unknown placement {placement!r}; expected one of {PLACEMENTS}.")
  if placement == "paper" and n < 2:
    raise ValueError(f"placement='paper' needs depth >= 14 (a block before exit 1 and one "
                     f"between the exits); got {depth}.")
  if exit_heads not in EXIT_HEADS:
    raise ValueError(f"Unknown exit_heads {exit_heads!r}; expected one of {EXIT_HEADS}.")
  if norm_impl not in layers.NORM_IMPLS:
    raise ValueError(f"Unknown norm_impl {norm_impl!r}; expected one of "
                     f"{tuple(layers.NORM_IMPLS)}.")
  input_shape = tuple(input_shape)
  if min(input_shape[:2]) < MIN_SIDE:
    raise ValueError(f"ResNet needs images of at least {MIN_SIDE}x{MIN_SIDE} (its 6x6 average "
                     f"pool); got {input_shape[0]}x{input_shape[1]}.")
  first = 1 if placement == "paper" else 0  # Blocks at 16 channels before exit 1.
  stage = lambda features: tuple((features, 2 if i == 0 and features > 16 else 1)
                                 for i in range(n))
  convs = dict(conv_impl=conv_impl, conv_kernel_grad=conv_kernel_grad, dtype=jnp.dtype(dtype))
  strided = dict(strided_conv_impl=strided_conv_impl,
                 strided_conv_kernel_grad=strided_conv_kernel_grad)
  trunk = functools.partial(Trunk, **convs, **strided, norm_impl=norm_impl)
  if exit_heads == "authors":
    heads = (Exit1(num_classes, **convs), Exit2(num_classes, **convs, norm_impl=norm_impl))
  else:
    heads = tuple(TrunkExit(num_classes, **strided, dtype=convs["dtype"], norm_impl=norm_impl)
                  for _ in range(2))
  stages = (Stage(trunk(True, stage(16)[:first], False), heads[0]),
            Stage(trunk(False, stage(16)[first:], False), heads[1]),
            Stage(trunk(False, stage(32) + stage(64), True), MainExit(num_classes, convs["dtype"])))
  return Network(name=_name("b_resnet", depth, placement, exit_heads), stages=stages,
                 input_shape=input_shape, num_classes=num_classes)


def resnet(depth: int = 110, placement: str = "code", conv_impl: str = "xla",
           dtype: Any = "float32", *, conv_kernel_grad: str = "autodiff",
           strided_conv_impl: str = "xla", strided_conv_kernel_grad: str = "autodiff",
           input_shape: tuple[int, int, int] = (32, 32, 3), num_classes: int = 10,
           norm_impl: str = "flax") -> Network:
  """ResNet: B-ResNet's trunk and main exit, parameters named as in B-ResNet."""
  return b_resnet(depth, placement, conv_impl, dtype, conv_kernel_grad=conv_kernel_grad,
                  strided_conv_impl=strided_conv_impl,
                  strided_conv_kernel_grad=strided_conv_kernel_grad,
                  input_shape=input_shape, num_classes=num_classes, norm_impl=norm_impl
                  ).main_network(name=_name("resnet", depth, placement))
