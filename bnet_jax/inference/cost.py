"""Inference cost from XLA's own cost analysis of the compiled stage programs.

Each exit segment (the trunk stages since the previous exit, the exit head and the
criterion) is compiled on its own, exactly as the cascade runs it, and XLA's FLOP
count is read from the compiled program; nothing is counted by hand. XLA does not
count multiply-adds over zero padding, so these figures sit below textbook counts.
The count is of the network's arithmetic: the programs are compiled with XLA's own
convolution (`Network.with_conv_impl`), whatever layer implementations `net`
carries. Faster implementations may compute more (the channel-padded ones count
B-LeNet's main path as 3.1 MFLOP instead of 1.6).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from bnet_jax import nets
from bnet_jax.inference.cascade import segment_fn, segments
from bnet_jax.criteria import Criterion


def compiled_flops(fn: Callable, *args) -> float:
  """FLOPs of `fn(*args)` as counted by XLA for the compiled program."""
  analysis = jax.jit(fn).lower(*args).compile().cost_analysis()
  if isinstance(analysis, (list, tuple)):  # Older jaxlibs return one dict per device.
    analysis = analysis[0]
  return float(analysis["flops"])


def segment_flops(net: nets.Network, variables: nets.Variables,
                  criterion: Criterion | str = "entropy", batch_size: int = 1) -> list[float]:
  """Per-sample FLOPs of each exit segment (its score under `criterion` included): E floats."""
  net = net.with_conv_impl("xla")
  h = jnp.zeros((batch_size, *net.input_shape), jnp.float32)
  flops = []
  for k in range(net.num_exits):
    fn = segment_fn(net, k, criterion)
    flops.append(compiled_flops(fn, variables, h) / batch_size)
    h = jax.eval_shape(fn, variables, h)[0]
    h = jnp.zeros(h.shape, h.dtype)
  return flops


def head_flops(net: nets.Network, variables: nets.Variables,
               criterion: Criterion | str = "entropy", batch_size: int = 1,
               segment_costs: Sequence[float] | None = None) -> list[float]:
  """Per-sample FLOPs of each exit's head and score: its segment's minus its trunk's: E floats.

  The trunk part is the segment's trunk stages compiled alone, so a segment's FLOPs
  are its trunk's plus these; the last is the main head's share of the main path.
  `segment_costs`: what `segment_flops` gave for the same criterion and batch size,
  when the caller has it (each segment is compiled to count it); None: counted here.
  """
  if segment_costs is None:
    segment_costs = segment_flops(net, variables, criterion, batch_size)
  net = net.with_conv_impl("xla")
  h = jnp.zeros((batch_size, *net.input_shape), jnp.float32)
  heads = []
  for cost_k, stages in zip(segment_costs, segments(net)):
    def trunk(v: nets.Variables, h: jax.Array, stages: tuple[int, ...] = stages) -> jax.Array:
      for i in stages:
        h = nets.apply_trunk(net, v, i, h)[0]
      return h
    heads.append(cost_k - compiled_flops(trunk, variables, h) / batch_size)
    out = jax.eval_shape(trunk, variables, h)
    h = jnp.zeros(out.shape, out.dtype)
  return heads


def main_path_flops(net: nets.Network, variables: nets.Variables, batch_size: int = 1) -> float:
  """Per-sample FLOPs of the plain network (every trunk stage + the main head + argmax)."""
  net = net.with_conv_impl("xla")
  x = jnp.zeros((batch_size, *net.input_shape), jnp.float32)
  fn = lambda v, x: jnp.argmax(nets.main_logits(net, v, x), -1)
  return compiled_flops(fn, variables, x) / batch_size


def cumulative(segment_costs: Sequence[float]) -> np.ndarray:
  """Cost of leaving at each exit: (E,) running sums of the segment costs."""
  return np.cumsum(np.asarray(segment_costs, np.float64))


def expected(exit_fractions: Sequence[float], segment_costs: Sequence[float]) -> float:
  """Mean per-sample cost when the given fractions leave at each exit."""
  return float(np.dot(np.asarray(exit_fractions, np.float64), cumulative(segment_costs)))
