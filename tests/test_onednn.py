"""oneDNN's convolutions (nets.onednn): XLA's values and gradients, the layers and train
step that use them, and what happens where they cannot be built."""

import os
import platform
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax import lax

from bnet_jax import nets
from bnet_jax.inference import cost
from bnet_jax.nets import alexnet, layers, onednn
from bnet_jax.training import train
from experiments import train_runner
from tests.helpers import REPO

# The README's set-up installs the `onednn` extra; its wheels exist for x86-64 Linux.
EXPECTED = sys.platform == "linux" and platform.machine() == "x86_64"


def test_available_where_the_extra_installs():
  if EXPECTED:
    assert onednn.available(), onednn.unavailable_reason()
    assert onednn.version().startswith("3.")
  else:
    assert "pip install 'bnet-jax[onednn]'" in onednn.unavailable_reason()


needs_onednn = pytest.mark.skipif(not EXPECTED, reason="oneDNN's wheels: x86-64 Linux only")


def _xla(x, kernel, strides, padding):
  return lax.conv_general_dilated(x, kernel, strides, padding,
                                  dimension_numbers=("NHWC", "HWIO", "NHWC"))


@needs_onednn
@pytest.mark.newest
@pytest.mark.parametrize("x_shape, kernel_shape, strides, padding", [
    ((4, 9, 9, 3), (3, 3, 3, 5), (1, 1), ((1, 1), (1, 1))),    # ResNet's 3x3.
    ((4, 10, 10, 6), (3, 3, 6, 7), (2, 2), ((1, 1), (1, 1))),  # Its stride-2 3x3.
    ((2, 8, 8, 4), (1, 1, 4, 8), (2, 2), ((0, 0), (0, 0))),    # Its 1x1 shortcut.
    ((3, 7, 9, 2), (5, 5, 2, 4), (1, 1), ((2, 1), (0, 2))),    # Uneven padding, H != W.
    ((1, 6, 6, 1), (3, 3, 1, 16), (1, 1), ((0, 0), (0, 0))),   # One input channel, batch 1.
    ((2, 6, 6, 16), (3, 3, 16, 16), (1, 1), ((1, 1), (1, 1))),  # Blocked = plain: no copies.
    ((2, 5, 5, 32), (3, 3, 32, 32), (1, 1), ((1, 1), (1, 1))),  # Blocked != plain: reorders.
])
def test_matches_xla_values_and_all_gradients(x_shape, kernel_shape, strides, padding):
  """Output, and the gradients of input, kernel and bias (the bias is added in the call)."""
  kx, kk, kb, kg = jax.random.split(jax.random.key(0), 4)
  x = jax.random.normal(kx, x_shape)
  kernel = jax.random.normal(kk, kernel_shape)
  bias = jax.random.normal(kb, kernel_shape[-1:])
  want, xla_vjp = jax.vjp(lambda x, k, b: _xla(x, k, strides, padding) + b, x, kernel, bias)
  got, ours_vjp = jax.jit(lambda x, k, b: jax.vjp(
      lambda x, k, b: onednn.conv(x, k, strides, padding, b), x, k, b))(x, kernel, bias)
  g = jax.random.normal(kg, want.shape)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
  for ours, theirs in zip(jax.jit(ours_vjp)(g), xla_vjp(g), strict=True):
    np.testing.assert_allclose(ours, theirs, rtol=1e-5, atol=1e-4)


@needs_onednn
def test_other_dtypes_run_xla():
  x = jnp.ones((2, 5, 5, 3), jnp.bfloat16)
  kernel = jnp.ones((3, 3, 3, 4), jnp.bfloat16)
  hlo = jax.jit(lambda x, k: onednn.conv(x, k)).lower(x, kernel).as_text()
  assert "custom_call" not in hlo and "convolution" in hlo
  assert jax.jit(lambda x, k: onednn.conv(x, k)).lower(
      x.astype(jnp.float32), kernel.astype(jnp.float32)).as_text().count("custom_call") == 1


@needs_onednn
@pytest.mark.parametrize("module, options", [
    (layers.Conv, {"features": 6, "kernel_size": 3, "padding": 1}),
    (layers.Conv, {"features": 6, "kernel_size": 3, "padding": 1, "pool": 2}),
    (layers.StridedConv, {"features": 6, "kernel_size": 3, "padding": 1, "stride": 2}),
])
def test_layers_compute_what_xla_does(module, options):
  x = jax.random.normal(jax.random.key(1), (3, 8, 8, 4))
  variables = module(impl="xla", **options).init(jax.random.key(2), x)

  def value_and_grads(impl):
    loss = lambda v, x: jnp.sum(jnp.sin(module(impl=impl, **options).apply(v, x)))
    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))(variables, x)

  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4),
               value_and_grads("onednn"), value_and_grads("xla"))


@needs_onednn
@pytest.mark.parametrize("shape", [(3, 28, 28, 4), (2, 7, 9, 16), (1, 14, 14, 33)])
def test_max_pool_matches_the_slices_with_gradient(shape):
  """B-AlexNet's 3x3 stride-2 cover_all pooling, values and gradient (no ties)."""
  x = jax.random.normal(jax.random.key(6), shape)
  want, xla_vjp = jax.vjp(alexnet.max_pool_3x3_s2, x)
  got, ours_vjp = jax.jit(lambda x: jax.vjp(
      lambda x: alexnet.max_pool_3x3_s2(x, "onednn"), x))(x)
  assert "bnet_onednn_pool_backward" in jax.jit(jax.grad(
      lambda x: alexnet.max_pool_3x3_s2(x, "onednn").sum())).lower(x).as_text()
  g = jax.random.normal(jax.random.key(7), want.shape)
  np.testing.assert_array_equal(got, want)
  # Overlapping windows add up in another order: equal to rounding.
  np.testing.assert_allclose(jax.jit(ours_vjp)(g)[0], xla_vjp(g)[0], rtol=1e-6, atol=1e-6)


def test_max_pool_refuses_windows_its_workspace_cannot_index():
  with pytest.raises(ValueError, match="windows up to 15"):
    onednn.max_pool(jnp.ones((1, 32, 32, 1)), 16, 16)


@needs_onednn
def test_b_alexnet_gradients_alike_with_onednn_and_xla():
  """Convolutions with their biases, and the pooling, in a whole B-AlexNet."""
  grads = {}
  for impl in ("xla", "onednn"):
    net = nets.get("b_alexnet", input_shape=(16, 16, 2), num_classes=5, conv_impl=impl)
    variables = nets.init(net, jax.random.key(0))
    batch = train_runner.random_batch(net, 4)
    loss = lambda params: jnp.sum(nets.forward(  # noqa: E731
        net, {**variables, "params": params}, batch["image"])[0].logits ** 2)
    fn = jax.jit(jax.value_and_grad(loss))
    if impl == "onednn":
      assert "bnet_onednn_pool_backward" in fn.lower(variables["params"]).as_text()
    grads[impl] = fn(variables["params"])
  np.testing.assert_allclose(grads["onednn"][0], grads["xla"][0], rtol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5),
               grads["onednn"][1], grads["xla"][1])


@needs_onednn
@pytest.mark.newest
def test_b_resnet_trains_alike_with_onednn_and_xla():
  """Three joint SGD steps of a small B-ResNet from the same start, both ways."""
  def train_three_steps(impl):
    net = nets.get("b_resnet", depth=8, exit_heads="trunk", input_shape=(24, 24, 2),
                   num_classes=5, conv_impl=impl, strided_conv_impl=impl,
                   norm_impl="flax" if impl == "xla" else impl)
    phase = train.Phase("joint", net, (1.0,) * net.num_exits, 0, 1)
    tx = optax.sgd(0.1)  # Not Adam: it would scale the rounding noise of zero gradients.
    state = train.initial_state(phase, tx, nets.init(net, jax.random.key(0)), 0)
    step = train.make_train_step(phase, tx)
    batch = train_runner.random_batch(net, 16)
    hlo = step.lower(state, batch, jax.random.key(0)).as_text()
    losses = []
    for _ in range(3):
      state, metrics = step(state, batch, jax.random.key(0))
      losses.append(np.asarray(metrics["loss"]))
    return hlo, losses, state.params

  xla_hlo, xla_losses, xla_params = train_three_steps("xla")
  hlo, losses, params = train_three_steps("onednn")
  assert "custom_call" not in xla_hlo
  assert "bnet_onednn_conv_kernel_grad" in hlo and "bnet_onednn_norm_backward" in hlo
  np.testing.assert_allclose(losses, xla_losses, rtol=1e-4)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-5),
               params, xla_params)


@needs_onednn
@pytest.mark.newest
def test_batch_norm_matches_its_definition_with_gradients():
  kx, ks, kb, kg = jax.random.split(jax.random.key(3), 4)
  x = 3 * jax.random.normal(kx, (16, 7, 5, 12)) + 1
  scale = 1 + 0.1 * jax.random.normal(ks, (12,))
  shift = 0.1 * jax.random.normal(kb, (12,))
  g = jax.random.normal(kg, x.shape)

  def reference(x, scale, shift, epsilon):
    mean = jnp.mean(x, (0, 1, 2))
    var = jnp.mean(jnp.square(x - mean), (0, 1, 2))
    return (x - mean) * lax.rsqrt(var + epsilon) * scale + shift, mean, var

  for norm in (reference, onednn.batch_norm):
    got = jax.jit(norm, static_argnums=3)(x, scale, shift, 1e-5)
    grads = jax.grad(lambda *a: jnp.sum(norm(*a, 1e-5)[0] * g), argnums=(0, 1, 2))(
        x, scale, shift)
    if norm is reference:
      want, want_grads = got, grads
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4),
               (got, grads), (want, want_grads))


@needs_onednn
@pytest.mark.parametrize("relu", [False, True])
@pytest.mark.parametrize("train", [True, False])
def test_onednn_batch_norm_layer_is_flax_batch_norm(train, relu):
  """Same variables, outputs, updated statistics and gradients as nn.BatchNorm, alone
  and followed by a ReLU (`batch_norm_relu`, one call in training)."""
  x = 2 * jax.random.normal(jax.random.key(4), (8, 6, 6, 5)) - 1
  modules = {impl: layers.batch_norm(impl, train, "bn", jnp.float32, momentum=0.9,
                                     epsilon=1e-5) for impl in layers.NORM_IMPLS}
  assert isinstance(modules["flax"], nn.BatchNorm)
  variables = modules["flax"].init(jax.random.key(5), x)
  variables = jax.tree.map(lambda v: v + 0.1 * jnp.arange(v.size).reshape(v.shape), variables)
  assert jax.tree.structure(modules["onednn"].init(jax.random.key(5), x)) == \
      jax.tree.structure(variables)

  def run(module):
    def loss(variables, x):
      y, updated = nn.apply(layers.batch_norm_relu if relu else lambda m, x: m(x), module,
                            mutable=["batch_stats"])(variables, x)
      return jnp.sum(jnp.sin(y)), updated
    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))(variables, x)

  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4),
               run(modules["onednn"]), run(modules["flax"]))


def _python(code: str, **env: str) -> subprocess.CompletedProcess:
  return subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True,
                        text=True, timeout=300, env={**os.environ, **env})


def test_without_onednn_auto_keeps_xla_and_asking_for_it_is_one_line(tmp_path):
  """No oneDNN found: "auto" trains with XLA's convolutions, and an explicit "onednn"
  is a ValueError that says what to install; a failed build says so too."""
  code = (
      "from bnet_jax import nets\n"
      "from bnet_jax.nets import onednn\n"
      "print(nets.resolve_options('b_resnet', {})['conv_impl'])\n"
      "print(onednn.unavailable_reason())\n"
      "net = nets.get('b_resnet', depth=8, conv_impl='onednn', input_shape=(24, 24, 1))\n"
      "try:\n"
      "  nets.init(net, __import__('jax').random.key(0))\n"
      "except onednn.OnednnUnavailableError as e:\n"
      "  print('refused:', e)\n")
  empty = tmp_path / "no-onednn"
  empty.mkdir()
  done = _python(code, BNET_ONEDNN_ROOT=str(empty), BNET_JAX_CACHE=str(tmp_path / "cache"))
  assert done.returncode == 0, done.stderr
  auto, reason, refused = done.stdout.splitlines()
  assert auto == "xla"
  assert "pip install 'bnet-jax[onednn]'" in reason and str(empty) in reason
  assert refused.startswith("refused: layer implementation 'onednn' cannot run here")
  assert "Use 'auto' or 'xla'" in refused

  off = _python(code, BNET_ONEDNN="0")
  assert off.stdout.splitlines()[:2] == ["xla", "turned off by BNET_ONEDNN=0."], off.stderr
  if EXPECTED:  # A compiler that fails: the build's failure, not a traceback.
    broken = _python(code, CXX="false", BNET_JAX_CACHE=str(tmp_path / "cache"))
    assert broken.stdout.splitlines()[0] == "xla", broken.stderr
    assert broken.stdout.splitlines()[1].startswith(
        "building the oneDNN operations failed (false exit 1")


@needs_onednn
def test_flop_counts_are_those_of_xla_convolutions():
  """XLA counts no FLOPs inside a custom call: the counts are taken on XLA's own."""
  net = nets.get("b_resnet", depth=8, exit_heads="trunk", conv_impl="onednn",
                 strided_conv_impl="onednn")
  variables = nets.init(net, jax.random.key(0))
  counts = cost.segment_flops(net, variables)
  assert counts == cost.segment_flops(net.with_conv_impl("xla"), variables)
  assert all(c > 1e6 for c in counts)
