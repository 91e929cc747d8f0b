"""B-LeNet (2 exits) and LeNet as in the authors' code, for 28x28x1 images (MNIST) or others.

Trunk: conv 1->5 5x5 pad 3 -> [exit 1] -> maxpool 2 -> ReLU -> conv 5->10 5x5 pad 3
-> maxpool 2 -> ReLU -> conv 10->20 5x5 pad 3 -> maxpool 2 -> ReLU -> FC 720->84
-> exit 2 = FC 84->10. Exit 1: maxpool 2 -> ReLU -> conv 5->10 3x3 pad 1 -> maxpool 2
-> ReLU -> FC 640->10. Pooling rounds up (Chainer's cover_all): 28 -> 30 -> 15 ->
17 -> 9 -> 11 -> 6 on the trunk, 15 -> 8 on the exit. Other input shapes change the
input channels and sides (each 5x5 conv adds 2, each pool halves rounding up) and so the
FC inputs; other class counts the exits' outputs.

Exit 1 and the trunk both begin with the same maxpool + ReLU of conv1's output, so
stage 1 ends after that pool and ReLU: the same function, computed once, and a 4x
smaller activation handed from stage to stage.
"""

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from bnet_jax.nets import layers
from bnet_jax.nets.core import Network, Stage


def _conv_pool_relu(features: int, kernel: int, padding: int, impl: str, kernel_grad: str,
                    dtype: Any, x: jax.Array) -> jax.Array:
  """Conv, ceil max pool 2, ReLU; the pool is fused into the implementations that fuse it."""
  return nn.relu(layers.Conv(features, kernel, padding=padding, impl=impl,
                             kernel_grad=kernel_grad, pool=2, dtype=dtype)(x))


class Stage1(nn.Module):
  """(B, 28, 28, 1) -> (B, 15, 15, 5)."""
  conv_impl: str
  conv_kernel_grad: str = "autodiff"
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    return _conv_pool_relu(5, 5, 3, self.conv_impl, self.conv_kernel_grad, self.dtype, x)


class Exit1(nn.Module):
  """(B, 15, 15, 5) -> (B, num_classes) logits."""
  conv_impl: str
  conv_kernel_grad: str = "autodiff"
  dtype: Any = jnp.float32
  num_classes: int = 10

  @nn.compact
  def __call__(self, h: jax.Array, train: bool = False) -> jax.Array:
    h = _conv_pool_relu(10, 3, 1, self.conv_impl, self.conv_kernel_grad, self.dtype, h)
    return nn.Dense(self.num_classes, dtype=self.dtype)(h.reshape(h.shape[0], -1))


class Stage2(nn.Module):
  """(B, 15, 15, 5) -> (B, 84)."""
  conv_impl: str
  conv_kernel_grad: str = "autodiff"
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, h: jax.Array, train: bool = False) -> jax.Array:
    h = _conv_pool_relu(10, 5, 3, self.conv_impl, self.conv_kernel_grad, self.dtype, h)
    h = _conv_pool_relu(20, 5, 3, self.conv_impl, self.conv_kernel_grad, self.dtype, h)
    return nn.Dense(84, dtype=self.dtype)(h.reshape(h.shape[0], -1))


class MainExit(nn.Module):
  """(B, 84) -> (B, num_classes) logits; no ReLU between the two FC layers, as in the code."""
  dtype: Any = jnp.float32
  num_classes: int = 10

  @nn.compact
  def __call__(self, h: jax.Array, train: bool = False) -> jax.Array:
    return nn.Dense(self.num_classes, dtype=self.dtype)(h)


def b_lenet(conv1_impl: str = "xla", conv_impl: str = "xla", exit_conv_impl: str | None = None,
            dtype: Any = "float32", *, conv1_kernel_grad: str = "autodiff",
            conv_kernel_grad: str = "autodiff", exit_conv_kernel_grad: str | None = None,
            input_shape: tuple[int, int, int] = (28, 28, 1), num_classes: int = 10) -> Network:
  """B-LeNet for MNIST-sized input by default.

  `nets.get` fills the layer implementations per platform (`nets.resolve_options`):
  on CPU the fastest measured for training, and `nets.inference_options` the
  fastest for inference by batch size.

  Args:
    conv1_impl: implementation of the one-input-channel first convolution (a
      `layers.CONV_IMPLS` name).
    conv_impl: implementation of the other trunk convolutions.
    exit_conv_impl: implementation of exit 1's convolution (None: `conv_impl`).
    dtype: computation dtype of every layer (parameters stay float32).
    conv1_kernel_grad: how conv1's kernel gradient is computed (a
      `layers.KERNEL_GRADS` name).
    conv_kernel_grad: the same for the other trunk convolutions.
    exit_conv_kernel_grad: the same for exit 1's convolution (None:
      `conv_kernel_grad` if `exit_conv_impl` is None too, else "autodiff").
    input_shape: (H, W, C) of one image (a list is taken too).
    num_classes: classes of both exits.
  """
  dtype = jnp.dtype(dtype)
  exit_grad = exit_conv_kernel_grad or (conv_kernel_grad if exit_conv_impl is None
                                        else "autodiff")
  return Network(
      name="b_lenet",
      stages=(Stage(Stage1(conv1_impl, conv1_kernel_grad, dtype),
                    Exit1(exit_conv_impl or conv_impl, exit_grad, dtype, num_classes)),
              Stage(Stage2(conv_impl, conv_kernel_grad, dtype), MainExit(dtype, num_classes))),
      input_shape=tuple(input_shape),
      num_classes=num_classes)


def lenet(**kwargs) -> Network:
  """LeNet: B-LeNet's trunk and main exit, parameters named as in B-LeNet."""
  return b_lenet(**kwargs).main_network(name="lenet")
