"""The multi-exit representation and B-LeNet / LeNet against the layer sizes of docs/method.md."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bnet_jax import nets

# docs/method.md: conv 1->5 5x5; exit 1: conv 5->10 3x3, FC 640->10; trunk: conv 5->10 5x5,
# conv 10->20 5x5, FC 720->84; main exit FC 84->10.
EXPECTED_SHAPES = {
    "trunk_0": {"Conv_0": {"kernel": (5, 5, 1, 5), "bias": (5,)}},
    "head_0": {"Conv_0": {"kernel": (3, 3, 5, 10), "bias": (10,)},
               "Dense_0": {"kernel": (640, 10), "bias": (10,)}},
    "trunk_1": {"Conv_0": {"kernel": (5, 5, 5, 10), "bias": (10,)},
                "Conv_1": {"kernel": (5, 5, 10, 20), "bias": (20,)},
                "Dense_0": {"kernel": (720, 84), "bias": (84,)}},
    "head_1": {"Dense_0": {"kernel": (84, 10), "bias": (10,)}},
}
PARAMS = {"trunk_0": 130, "head_0": 460 + 6410, "trunk_1": 1260 + 5020 + 60564, "head_1": 850}


@pytest.fixture(scope="module")
def blenet():
  net = nets.get("b_lenet")
  return net, nets.init(net, jax.random.key(0))


def test_blenet_parameter_shapes_and_counts(blenet):
  net, variables = blenet
  shapes = jax.tree.map(lambda a: tuple(a.shape), variables["params"])
  assert shapes == EXPECTED_SHAPES
  for name, count in PARAMS.items():
    assert nets.count_params(variables["params"][name]) == count
  assert nets.count_params(variables) == 74694
  assert net.num_exits == 2 and net.exit_stages == (0, 1)


def test_forward_shapes_and_entropy_range(blenet):
  net, variables = blenet
  x = jax.random.uniform(jax.random.key(1), (7, 28, 28, 1))
  out, updates = nets.forward(net, variables, x)
  assert out.logits.shape == (2, 7, 10) and out.entropy.shape == (2, 7)
  assert updates == {}
  assert np.all(out.entropy >= 0) and np.all(out.entropy <= math.log(10) + 1e-5)


def test_stage_by_stage_equals_one_pass(blenet):
  net, variables = blenet
  x = jax.random.uniform(jax.random.key(2), (3, 28, 28, 1))
  h0, _ = nets.apply_trunk(net, variables, 0, x)
  assert h0.shape == (3, 15, 15, 5)  # conv1 30x30, ceil pool -> 15x15.
  z0, _ = nets.apply_head(net, variables, 0, h0)
  h1, _ = nets.apply_trunk(net, variables, 1, h0)
  assert h1.shape == (3, 84)
  z1, _ = nets.apply_head(net, variables, 1, h1)
  out, _ = nets.forward(net, variables, x)
  np.testing.assert_allclose(out.logits, jnp.stack([z0, z1]), rtol=1e-6, atol=1e-6)


def test_lenet_is_the_main_path_of_blenet(blenet):
  net, variables = blenet
  lenet = nets.get("lenet")
  assert nets.module_names(lenet) == ["trunk_0", "trunk_1", "head_1"]
  assert lenet.num_exits == 1
  lenet_params = {k: variables["params"][k] for k in nets.module_names(lenet)}
  x = jax.random.uniform(jax.random.key(3), (4, 28, 28, 1))
  plain = nets.forward(lenet, {"params": lenet_params}, x)[0].logits[0]
  np.testing.assert_allclose(plain, nets.forward(net, variables, x)[0].logits[-1], atol=1e-6)
  np.testing.assert_allclose(plain, nets.main_logits(net, variables, x), atol=1e-6)
  assert nets.count_params(lenet_params) == 74694 - PARAMS["head_0"]


@pytest.mark.parametrize("conv1_impl", ["xla", "shifted_sum", "im2col"])
def test_layer_implementations_share_parameters(blenet, conv1_impl):
  net, variables = blenet
  other = nets.get("b_lenet", conv1_impl=conv1_impl, conv_impl="im2col")
  x = jax.random.uniform(jax.random.key(4), (5, 28, 28, 1))
  np.testing.assert_allclose(nets.forward(other, variables, x)[0].logits,
                             nets.forward(net, variables, x)[0].logits, atol=2e-5)


def test_registry_errors():
  with pytest.raises(ValueError, match="Unknown model 'resnet9000'.*b_lenet"):
    nets.get("resnet9000")
  with pytest.raises(ValueError, match="Bad options"):
    nets.get("b_lenet", depth=3)
  with pytest.raises(ValueError, match="Unknown conv impl"):
    bad = nets.get("b_lenet", conv_impl="fft")
    nets.init(bad, jax.random.key(0))


@pytest.mark.parametrize("shape,dtype,match", [
    ((28, 28, 1), np.float32, "batch of images"),
    ((2, 32, 32, 1), np.float32, "expects 28x28 images"),
    ((2, 28, 28, 3), np.float32, "1 channel"),
    ((2, 1, 28, 28), np.float32, "expects 28x28"),
    ((2, 28, 28, 1), np.uint8, "float images.*preprocess"),
])
def test_check_images_rejects_bad_input(shape, dtype, match):
  with pytest.raises(ValueError, match=match):
    nets.check_images(nets.get("b_lenet"), np.zeros(shape, dtype))
