"""B-AlexNet and B-ResNet: docs/method.md's layer sizes at any input size, and training.

Parameter counts are computed here by hand from the layer sizes docs/method.md gives (conv
k x k C_in -> C_out with bias, BatchNorm scale + offset, FC with bias), for CIFAR-10's
32x32x3 and Fashion-MNIST's 28x28x1; shapes come from `jax.eval_shape`, so even
ResNet-110 is counted without computing anything. Training tests use ResNet-8 (n = 1),
the smallest 6n+2 depth, to stay fast.
"""

import functools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
import tensorflow_datasets as tfds

from bnet_jax import cascade, checkpoint, losses, nets, train
from bnet_jax.nets import lrn
from experiments.configs import (alexnet_cifar10, alexnet_fashion_mnist, resnet110_cifar10,
                                 resnet_fashion_mnist)


def conv(k, cin, cout):
  return k * k * cin * cout + cout


def dense(n_in, n_out):
  return n_in * n_out + n_out


def bn(c):
  return 2 * c


def block(cin, cout):
  return conv(3, cin, cout) + bn(cout) + conv(3, cout, cout) + bn(cout)


# docs/method.md, code placement: exits after conv2 and conv3. FC inputs: exit 1 4x4x32,
# exit 2 2x2x32, trunk 4x4x64.
ALEXNET_CODE = {
    "trunk_0": conv(5, 3, 32) + conv(5, 32, 64),
    "head_0": conv(3, 64, 32) + conv(3, 32, 32) + dense(512, 10),
    "trunk_1": conv(3, 64, 96),
    "head_1": conv(3, 96, 32) + dense(128, 10),
    "trunk_2": conv(3, 96, 96) + conv(3, 96, 64) + dense(1024, 256) + dense(256, 128),
    "head_2": dense(128, 10),
}
# Paper placement: exits after conv1 (16x16x32 -> FC 8x8x32) and conv2 (8x8x64 -> 4x4x32).
ALEXNET_PAPER = {
    "trunk_0": conv(5, 3, 32),
    "head_0": conv(3, 32, 32) + conv(3, 32, 32) + dense(2048, 10),
    "trunk_1": conv(5, 32, 64),
    "head_1": conv(3, 64, 32) + dense(512, 10),
    "trunk_2": (conv(3, 64, 96) + conv(3, 96, 96) + conv(3, 96, 64) + dense(1024, 256)
                + dense(256, 128)),
    "head_2": dense(128, 10),
}
# 28x28x1, code placement: pools 28 -> 14 -> 7 -> 3 (exit 2: 7 -> 3 -> 1).
ALEXNET_CODE_28 = {
    "trunk_0": conv(5, 1, 32) + conv(5, 32, 64),
    "head_0": conv(3, 64, 32) + conv(3, 32, 32) + dense(3 * 3 * 32, 10),
    "trunk_1": conv(3, 64, 96),
    "head_1": conv(3, 96, 32) + dense(32, 10),
    "trunk_2": conv(3, 96, 96) + conv(3, 96, 64) + dense(3 * 3 * 64, 256) + dense(256, 128),
    "head_2": dense(128, 10),
}
# Trunk heads, paper placement, 28x28x1 into 7 classes: conv to 32 at the stage's
# channels, global average pool, FC 32 -> 7.
ALEXNET_PAPER_TRUNK_28 = {
    "trunk_0": conv(5, 1, 32),
    "head_0": conv(3, 32, 32) + dense(32, 7),
    "trunk_1": conv(5, 32, 64),
    "head_1": conv(3, 64, 32) + dense(32, 7),
    "trunk_2": (conv(3, 64, 96) + conv(3, 96, 96) + conv(3, 96, 64) + dense(3 * 3 * 64, 256)
                + dense(256, 128)),
    "head_2": dense(128, 7),
}


def resnet_counts(n, paper=False, side=30, channels=3, pooled=3, trunk_heads=False):
  """Per-module counts of B-ResNet-(6n+2); exits see side x side maps (30 for CIFAR-10),
  the trunk ends at pooled x pooled x 64 (3 for CIFAR-10)."""
  stem = conv(3, channels, 16) + bn(16)
  first = 1 if paper else 0
  trunk_head = conv(3, 16, 32) + bn(32) + dense(32, 10)
  return {
      "trunk_0": stem + first * block(16, 16),
      "head_0": trunk_head if trunk_heads else (
          conv(5, 16, 64) + conv(3, 64, 32) + conv(3, 32, 32) + dense(side * side * 32, 10)),
      "trunk_1": (n - first) * block(16, 16),
      "head_1": trunk_head if trunk_heads else block(16, 16) + dense(side * side * 16, 10),
      "trunk_2": (block(16, 32) + (n - 1) * block(32, 32) + block(32, 64)
                  + (n - 1) * block(64, 64)),
      "head_2": dense(pooled * pooled * 64, 10),
  }


def abstract_variables(net):
  return jax.eval_shape(lambda key: nets.init(net, key), jax.random.key(0))


@pytest.mark.parametrize("name,options,expected,stage_shapes", [
    ("b_alexnet", {}, ALEXNET_CODE, [(8, 8, 64), (8, 8, 96), (128,)]),
    ("b_alexnet", {"placement": "paper"}, ALEXNET_PAPER, [(16, 16, 32), (8, 8, 64), (128,)]),
    ("b_resnet", {"depth": 8}, resnet_counts(1), [(30, 30, 16)] * 2 + [(576,)]),
    ("b_resnet", {"depth": 110}, resnet_counts(18), [(30, 30, 16)] * 2 + [(576,)]),
    ("b_resnet", {"depth": 14, "placement": "paper"}, resnet_counts(2, paper=True),
     [(30, 30, 16)] * 2 + [(576,)]),
    # Fashion-MNIST's 28x28x1: stem 26, stages 26 -> 13 -> 7, pooled 2x2.
    ("b_alexnet", {"input_shape": (28, 28, 1)}, ALEXNET_CODE_28,
     [(7, 7, 64), (7, 7, 96), (128,)]),
    ("b_alexnet", {"input_shape": [28, 28, 1], "num_classes": 7, "placement": "paper",
                   "exit_heads": "trunk"}, ALEXNET_PAPER_TRUNK_28,
     [(14, 14, 32), (7, 7, 64), (128,)]),
    ("b_resnet", {"depth": 8, "input_shape": (28, 28, 1)},
     resnet_counts(1, side=26, channels=1, pooled=2), [(26, 26, 16)] * 2 + [(256,)]),
    ("b_resnet", {"depth": 20, "input_shape": (28, 28, 1), "exit_heads": "trunk"},
     resnet_counts(3, channels=1, pooled=2, trunk_heads=True), [(26, 26, 16)] * 2 + [(256,)]),
    ("b_resnet", {"depth": 8, "exit_heads": "trunk"}, resnet_counts(1, trunk_heads=True),
     [(30, 30, 16)] * 2 + [(576,)]),
])
def test_parameter_counts_and_stage_shapes(name, options, expected, stage_shapes):
  net = nets.get(name, **options)
  variables = abstract_variables(net)
  assert net.num_exits == 3 and net.exit_stages == (0, 1, 2)
  counts = {k: nets.count_params(v) for k, v in variables["params"].items() if v}
  assert counts == {k: v for k, v in expected.items() if v}
  h = jax.ShapeDtypeStruct((2, *net.input_shape), jnp.float32)
  for i, shape in enumerate(stage_shapes):
    h = jax.eval_shape(lambda v, h: nets.apply_trunk(net, v, i, h)[0], variables, h)
    assert h.shape == (2, *shape)
    z = jax.eval_shape(lambda v, h: nets.apply_head(net, v, i, h)[0], variables, h)
    assert z.shape == (2, net.num_classes)


# Computed with the code before the networks took their input's shape: CIFAR-10's
# networks keep their parameters (names: the per-module counts above).
@pytest.mark.parametrize("name,options,count", [
    ("b_alexnet", {}, 605_886), ("alexnet", {}, 544_074), ("b_resnet", {"depth": 20}, 765_630),
    ("b_resnet", {"depth": 110}, 2_227_230)])
def test_cifar10_parameter_counts_are_unchanged(name, options, count):
  assert nets.count_params(abstract_variables(nets.get(name, **options))["params"]) == count


@pytest.mark.parametrize("name,options", [
    ("b_lenet", {"input_shape": (32, 32, 3)}), ("resnet", {"depth": 8, "input_shape": (28, 28, 1)}),
    ("alexnet", {"placement": "paper", "input_shape": (28, 28, 1)})])
def test_main_and_other_networks_take_any_input(name, options):
  net = nets.get(name, **options, num_classes=7)
  x = jax.ShapeDtypeStruct((2, *net.input_shape), jnp.float32)
  out = jax.eval_shape(lambda x: nets.forward(net, nets.init(net, jax.random.key(0)), x)[0], x)
  assert out.logits.shape == (net.num_exits, 2, 7)


def test_trunk_heads_leave_the_main_network_unchanged():
  for name, options in (("b_resnet", {"depth": 8}), ("b_alexnet", {})):
    trunk_heads = nets.get(name, **options, exit_heads="trunk")
    assert trunk_heads.main_network().stages == nets.get(name, **options).main_network().stages


def test_strided_conv_implementations_give_the_same_network():
  """B-ResNet's stride-2 convs (trunk and trunk heads) by space-to-depth: same parameters,
  logits and gradients as with XLA's strided convolution; sides 26 (even) and 13 (odd)."""
  nets_by_impl = {impl: nets.get("b_resnet", depth=8, exit_heads="trunk",
                                 input_shape=(28, 28, 1), conv_impl="xla",
                                 strided_conv_impl=impl)
                  for impl in ("xla", "space_to_depth")}
  variables = nets.init(nets_by_impl["xla"], jax.random.key(0))
  x = np.random.default_rng(0).standard_normal((4, 28, 28, 1)).astype(np.float32)

  def loss_and_grads(net):
    def loss(params):
      out, _ = nets.forward(net, {**variables, "params": params}, x, train=True)
      return jnp.sum(out.logits ** 2)
    return jax.jit(jax.value_and_grad(loss))(variables["params"])

  (want, want_grads), (got, got_grads) = map(loss_and_grads, nets_by_impl.values())
  np.testing.assert_allclose(got, want, rtol=1e-5)
  # Biases before a BatchNorm have zero gradients up to rounding: compare on the whole scale.
  scale = max(float(np.abs(w).max()) for w in jax.tree.leaves(want_grads))
  jax.tree.map(lambda g, w: np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-5 * scale),
               got_grads, want_grads)


@pytest.mark.parametrize("name,options,match", [
    ("b_resnet", {"depth": 8, "input_shape": (22, 28, 1)}, "at least 23x23 .*got 22x28"),
    ("resnet", {"depth": 8, "input_shape": (28, 22, 3)}, "at least 23x23"),
    ("b_alexnet", {"input_shape": (15, 15, 1)}, "at least 16x16 .*got 15x15"),
    ("b_alexnet", {"input_shape": (7, 8, 1), "exit_heads": "trunk"}, "at least 8x8"),
    ("alexnet", {"input_shape": (8, 7, 1)}, "at least 8x8"),
    ("b_resnet", {"exit_heads": "small"}, "Unknown exit_heads 'small'"),
    ("b_alexnet", {"exit_heads": "small"}, "Unknown exit_heads 'small'"),
])
def test_too_small_inputs_and_unknown_heads_are_refused(name, options, match):
  with pytest.raises(ValueError, match=match):
    nets.get(name, **options)


def test_resnet110_totals():
  variables = abstract_variables(nets.get("b_resnet"))
  assert nets.count_params(variables["params"]) == sum(resnet_counts(18).values()) == 2_227_230
  main = nets.get("resnet")
  assert main.name == "resnet110" and main.num_exits == 1
  main_params = {k: variables["params"][k] for k in nets.module_names(main)}
  # The standard ResNet-110 (about 1.7 M) plus conv biases and the code's 576-input FC.
  assert nets.count_params(main_params) == 1_737_130


@pytest.mark.parametrize("name,options,want", [
    ("alexnet", {}, "alexnet"), ("alexnet", {"placement": "paper"}, "alexnet_paper"),
    ("resnet", {"depth": 20}, "resnet20"), ("b_resnet", {"depth": 20}, "b_resnet20"),
    ("b_resnet", {"depth": 20, "exit_heads": "trunk"}, "b_resnet20_trunk_heads"),
    ("b_alexnet", {"placement": "paper", "exit_heads": "trunk"}, "b_alexnet_paper_trunk_heads")])
def test_names_and_main_networks(name, options, want):
  net = nets.get(name, **options)
  assert net.name == want
  if not name.startswith("b_"):  # The main path, with B-network parameter names.
    assert nets.module_names(net) == ["trunk_0", "trunk_1", "trunk_2", "head_2"]


@pytest.mark.parametrize("depth", [0, 7, 21, 100, "110"])
def test_resnet_rejects_other_depths(depth):
  with pytest.raises(ValueError, match="6n \\+ 2"):
    nets.get("b_resnet", depth=depth)


def test_bad_placement_is_rejected():
  with pytest.raises(ValueError, match="Unknown placement 'middle'"):
    nets.get("b_alexnet", placement="middle")
  with pytest.raises(ValueError, match="needs depth >= 14"):
    nets.get("b_resnet", depth=8, placement="paper")


def test_lrn_matches_chainers_formula():
  x = np.random.default_rng(0).standard_normal((2, 3, 5)).astype(np.float32) * 30
  n, k, alpha, beta = 3, 2.0, 5e-5, 0.75
  want = np.empty_like(x)
  for c in range(5):  # Chainer: window c - n//2 .. c + n//2, clipped; alpha not divided by n.
    window = x[..., max(0, c - n // 2):c + n // 2 + 1]
    want[..., c] = x[..., c] / (k + alpha * np.sum(window ** 2, -1)) ** beta
  np.testing.assert_allclose(lrn.paper_lrn(x), want, rtol=1e-6)
  np.testing.assert_allclose(lrn.local_response_norm(x, 5, 1.0, 1e-4, 0.75)[..., 2],
                             x[..., 2] / (1 + 1e-4 * np.sum(x ** 2, -1)) ** 0.75, rtol=1e-6)



@pytest.mark.parametrize("n", [3, 5])
def test_lrn_gradient_is_autodiffs_of_the_formula(n):
  """The written-out gradient against autodiff of the plain formula, edges included."""
  x = jax.random.normal(jax.random.key(0), (2, 3, 3, 7)) * 30
  g = jax.random.normal(jax.random.key(1), x.shape)
  k, alpha, beta = 2.0, 5e-4, 0.75

  def formula(x):
    energy = jnp.stack([jnp.sum(jnp.square(x[..., max(0, c - n // 2):c + n // 2 + 1]), -1)
                        for c in range(x.shape[-1])], -1)
    return x * (k + alpha * energy) ** -beta

  want = jax.vjp(formula, x)[1](g)[0]
  got = jax.vjp(lambda x: lrn.local_response_norm(x, n, k, alpha, beta), x)[1](g)[0]
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6 * float(jnp.max(jnp.abs(want))))

def _adam(lr=2e-3):
  return train.make_optimizer(ml_collections.ConfigDict(dict(
      learning_rate=lr, beta1=0.9, beta2=0.999, weight_decay=0.0, lr_schedule="constant",
      optimizer="adam")), 1)


def _random_examples(n, seed=0):
  """Random 4x4-pixel-block images (variation that survives pooling) and random labels."""
  rng = np.random.default_rng(seed)
  coarse = rng.standard_normal((n, 4, 4, 3)).astype(np.float32)
  return np.repeat(np.repeat(coarse, 8, 1), 8, 2), rng.integers(0, 10, n).astype(np.int32)


NETS = [("b_alexnet", {}), ("b_resnet", {"depth": 8})]


@functools.cache
def _trained(name, depth=None, steps=3, batch=32):
  """The network and its variables after `steps` joint Adam steps on a fixed random batch."""
  net = nets.get(name, **({} if depth is None else {"depth": depth}))
  phase = train.Phase("p", net, (1.0,) * net.num_exits, 0, steps)
  tx = _adam()
  state = train.initial_state(phase, tx, nets.init(net, jax.random.key(0)), 0)
  step = train.make_train_step(phase, tx)
  x, y = _random_examples(batch)
  for _ in range(steps):
    state, _ = step(state, {"image": x, "label": y}, jax.random.key(1))
  return net, {"params": state.params, **state.model_state}


@pytest.mark.parametrize("name,options", NETS)
def test_one_joint_step_lowers_the_loss(name, options):
  net = nets.get(name, **options)
  x, y = _random_examples(16)
  key = jax.random.key(3)

  @jax.jit
  def loss(v):  # Training mode with a fixed dropout key: the loss the step descends.
    out, _ = nets.forward(net, v, x, train=True, rng=jax.random.fold_in(key, 0))
    return losses.joint_cross_entropy(out.logits, y, jnp.ones(3))[0]

  variables = nets.init(net, jax.random.key(0))
  before = float(loss(variables))
  phase = train.Phase("joint", net, (1.0, 1.0, 1.0), 0, 1)
  tx = _adam(1e-3)
  step = train.make_train_step(phase, tx)
  state, metrics = step(train.initial_state(phase, tx, variables, 0),
                        {"image": x, "label": y}, key)
  assert float(loss({"params": state.params, **state.model_state})) < before
  if name == "b_resnet":  # BatchNorm: training updates the running statistics.
    mean = state.model_state["batch_stats"]["trunk_0"]["stem_bn"]["mean"]
    assert np.abs(np.asarray(mean)).max() > 0


@pytest.mark.slow
@pytest.mark.parametrize("name,options,main_only", [
    ("b_alexnet", {}, False),  # Its main path alone learns noise slowly; exits help.
    ("b_resnet", {"depth": 8}, True),  # ResNet-8's exit 1 costs more than its trunk.
])
def test_memorises_256_random_examples(name, options, main_only):
  net = nets.get(name, **options)
  phase_net = net.main_network() if main_only else net
  phase = train.Phase("p", phase_net, (1.0,) * phase_net.num_exits, 0, 1)
  tx = _adam(2e-3)
  state = train.initial_state(phase, tx, nets.init(net, jax.random.key(0)), 0)
  step = train.make_train_step(phase, tx)
  final_exit = jax.jit(lambda v, x: nets.forward(phase_net, v, x)[0].logits[-1])
  x, y = _random_examples(256)
  accuracy = 0.0
  for epoch in range(1, 61):
    for i in range(0, 256, 128):
      state, _ = step(state, {"image": x[i:i + 128], "label": y[i:i + 128]}, jax.random.key(0))
    if epoch % 5 == 0:  # Evaluation mode: dropout off, BatchNorm's running statistics.
      logits = final_exit({"params": state.params, **state.model_state}, x)
      accuracy = float(np.mean(np.argmax(logits, -1) == y))
      if accuracy >= 0.95:
        break
  assert accuracy >= 0.95, f"{net.name}: {accuracy:.3f} after {epoch} epochs"


@pytest.mark.parametrize("name,options", NETS)
def test_evaluation_is_independent_of_the_batch(name, options):
  net, variables = _trained(name, options.get("depth"))
  x, _ = _random_examples(256, seed=1)
  forward = jax.jit(lambda v, x: nets.forward(net, v, x))
  out, updates = forward(variables, x)
  assert updates == {}  # Evaluation reads the running statistics, never writes them.
  alone, _ = forward(variables, x[5:6])
  np.testing.assert_allclose(alone.logits[:, 0], out.logits[:, 5], rtol=1e-4, atol=1e-4)
  reordered, _ = forward(variables, x[::-1])
  np.testing.assert_allclose(reordered.logits[:, ::-1], out.logits, rtol=1e-4, atol=1e-4)


def _widest_gap(values, lo, hi):
  """The midpoint of the widest gap between the lo-th..hi-th smallest values."""
  v = np.sort(values)
  k = lo + int(np.argmax(np.diff(v[lo:hi + 1])))
  return float(v[k] + v[k + 1]) / 2


def test_cascade_equals_all_exits_reference():
  net, variables = _trained("b_resnet", 8)
  x, _ = _random_examples(64, seed=2)
  entropy = np.asarray(jax.jit(lambda v, x: nets.forward(net, v, x)[0].entropy)(variables, x))
  thresholds = [_widest_gap(entropy[0], 10, 30), _widest_gap(entropy[1], 20, 40)]
  want = cascade.reference(net, variables, x, thresholds)
  assert set(want.exit.tolist()) == {0, 1, 2}  # Every exit takes some samples.
  got = cascade.Cascade(net, variables, thresholds, buckets=[64]).predict(x)
  # docs/design.md: rounding may differ between programs; only samples this close may move.
  near = np.any(np.abs(entropy[:2].T - np.asarray(thresholds)) < 1e-4, axis=1)
  same = (got.exit == want.exit) & (got.label == want.label)
  assert np.all(same | near) and np.sum(near) <= 2
  np.testing.assert_allclose(got.score[same], want.score[same], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("shape,match", [
    ((2, 28, 28, 3), "expects 32x32 images"),
    ((2, 32, 32, 1), "3 channel"),
])
def test_check_images_rejects_bad_input(shape, match):
  for name in ("b_alexnet", "b_resnet"):
    with pytest.raises(ValueError, match=match):
      nets.check_images(nets.get(name), np.zeros(shape, np.float32))


@pytest.mark.parametrize("module,variants", [
    (alexnet_cifar10, ("paper", "modern", "smoke")),
    (resnet110_cifar10, ("paper", "modern", "smoke")),
    (alexnet_fashion_mnist, ("tuned", "smoke")),
    (resnet_fashion_mnist, ("tuned", "plain", "heads", "smoke"))])
def test_configs_build_their_networks(module, variants):
  assert tuple(module.VARIANTS) == variants
  for variant in variants:
    c = module.get_config(variant)
    if variant == "heads":
      c.init_from = "W"  # The plain network's workdir, given on the command line.
    net = checkpoint.network(c)  # Sized for the config's dataset.
    assert len(c.loss_weights) == net.num_exits == (1 if variant == "plain" else 3)
    train.validate_config(c, net)
  if "plain" in variants:  # `heads` puts its exits on `plain`'s parameters, all of them.
    shapes = lambda net: jax.tree.map(jnp.shape, jax.eval_shape(
        lambda: nets.init(net, jax.random.key(0))))
    plain = checkpoint.network(module.get_config("plain"))
    assert shapes(plain) == shapes(checkpoint.network(module.get_config("heads")).main_network())
  with pytest.raises(ValueError, match="Unknown variant"):
    module.get_config("bogus")


@pytest.mark.parametrize("module", [resnet110_cifar10, resnet_fashion_mnist])
def test_end_to_end_on_mock_data(tmp_path, module):
  c = module.get_config("smoke")
  c.model_options.depth = 8  # The smoke configs' depth 20, made smaller still.
  c.update(dict(num_validation=64, batch_size=32, eval_batch_size=64,
                data_dir="/nonexistent-under-mock", download=False))
  # mock_data ignores split slicing: every split has 64 rows, so 2 steps per epoch.
  with tfds.testing.mock_data(num_examples=64):
    results = train.train_and_evaluate(c, str(tmp_path))
  for split in ("validation", "test"):
    assert results[split]["num_examples"] == 64
    assert len(results[split]["accuracy_per_exit"]) == 3
  assert (tmp_path / "eval.json").exists()
