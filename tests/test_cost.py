"""Cost accounting from XLA's compiled stage programs."""

import jax
import numpy as np
import pytest

from bnet_jax import cascade, cost, nets
from helpers import random_variables


@pytest.fixture(scope="module")
def blenet():
  net = nets.get("b_lenet")
  return net, nets.init(net, jax.random.key(0))


def test_segments_cover_every_stage_once(blenet):
  net, _ = blenet
  assert cascade.segments(net) == [(0,), (1,)]


def test_blenet_flops_are_xlas_and_consistent(blenet):
  net, variables = blenet
  seg = cost.segment_flops(net, variables)
  full = cost.main_path_flops(net, variables)
  # docs/method.md (XLA's count): main path 1.61 M, stage 1 + exit 1 0.40 M.
  assert 1.5e6 < full < 1.8e6 and 0.35e6 < seg[0] < 0.5e6
  # Both exits' segments contain the whole main path plus exit 1's head.
  assert sum(seg) > full
  # Per-sample counts do not depend on the batch the program was compiled for.
  np.testing.assert_allclose(cost.segment_flops(net, variables, batch_size=16), seg, rtol=0.01)
  assert cost.compiled_flops(lambda v, x: x * 2.0, variables, np.zeros((1, 1000), np.float32)) == 1000


def test_expected_cost_and_ideal_speedup():
  seg = [400.0, 1400.0]
  np.testing.assert_allclose(cost.cumulative(seg), [400.0, 1800.0])
  assert cost.expected([0.94, 0.06], seg) == pytest.approx(0.94 * 400 + 0.06 * 1800)
  assert cost.expected([0.0, 1.0], seg) == 1800.0


def test_flops_count_arithmetic_not_layer_implementations(blenet):
  # Channel-padded convolutions compute more; the count is the network's own.
  net, variables = blenet
  padded = nets.get("b_lenet", conv1_impl="xla_pad8", conv_impl="xla_pad8")
  x = jax.numpy.zeros((1, *net.input_shape))
  as_run = cost.compiled_flops(lambda v, x: nets.main_logits(padded, v, x), variables, x)
  assert as_run > 1.5 * cost.main_path_flops(net, variables)
  assert cost.main_path_flops(padded, variables) == cost.main_path_flops(net, variables)
  assert cost.segment_flops(padded, variables) == cost.segment_flops(net, variables)
  swapped = padded.with_conv_impl("xla")
  assert {s.trunk.conv_impl for s in swapped.stages} == {"xla"}
  assert swapped.stages[0].head.conv_impl == "xla"


def test_heads_are_segments_less_their_trunks(blenet):
  net, variables = blenet
  seg, heads = cost.segment_flops(net, variables), cost.head_flops(net, variables)
  # Exit 1: conv 5->10 3x3 on 15x15, pool, FC 640->10; the main head: FC 84->10.
  assert 0.1e6 < heads[0] < seg[0] and 1600 < heads[1] < 3000
  trunk = lambda v, x: nets.apply_trunk(net.with_conv_impl("xla"), v, 0, x)[0]
  x = jax.numpy.zeros((1, *net.input_shape))
  assert heads[0] == seg[0] - cost.compiled_flops(trunk, variables, x)
  assert cost.head_flops(net, variables, segment_costs=seg) == heads  # Counted once.


# Fashion-MNIST's images: the authors' ResNet exit 1 alone costs more than ResNet-20's
# main path; heads sized to the trunk must leave early exits worth taking.
@pytest.mark.parametrize("name,options", [("b_resnet", {"depth": 20}), ("b_alexnet", {})])
def test_trunk_heads_cost_at_most_a_quarter_of_the_main_path(name, options):
  net = nets.get(name, **options, input_shape=(28, 28, 1), exit_heads="trunk")
  variables = random_variables(net, 0)
  main = cost.main_path_flops(net, variables)
  heads = cost.head_flops(net, variables)
  assert all(0 < h <= main / 4 for h in heads[:-1]), (heads, main)


def test_strided_convolutions_are_counted_as_xlas():
  """Space-to-depth strided convs compute zero taps too; the count is the network's own."""
  options = dict(depth=8, input_shape=(28, 28, 1), exit_heads="trunk", conv_impl="xla")
  net = nets.get("b_resnet", **options)
  s2d = nets.get("b_resnet", **options, strided_conv_impl="space_to_depth")
  variables = random_variables(net, 0)
  x = jax.numpy.zeros((1, *net.input_shape))
  as_run = cost.compiled_flops(lambda v, x: nets.main_logits(s2d, v, x), variables, x)
  assert as_run > 1.05 * cost.main_path_flops(net, variables)
  assert cost.main_path_flops(s2d, variables) == cost.main_path_flops(net, variables)
