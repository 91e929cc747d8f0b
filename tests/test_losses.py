"""Losses against hand-computed values; gradient checks (exit criteria: test_criteria.py)."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.test_util import check_grads

from bnet_jax import criteria, losses, nets, train
from helpers import random_variables, tiny_network


def test_joint_cross_entropy_hand_values():
  # Exit 1: softmax([0, ln 3]) -> CE(label 1) = -ln 3/4, CE(label 0) = -ln 1/4.
  # Exit 2: uniform over 2 classes -> CE = ln 2 for both samples.
  logits = jnp.array([[[0.0, math.log(3.0)], [0.0, math.log(3.0)]],
                      [[1.0, 1.0], [-2.0, -2.0]]])
  labels = jnp.array([1, 0])
  total, per_exit = losses.joint_cross_entropy(logits, labels, jnp.array([1.0, 0.3]))
  ce1 = (-math.log(0.75) - math.log(0.25)) / 2
  np.testing.assert_allclose(per_exit, [ce1, math.log(2.0)], rtol=1e-6)
  np.testing.assert_allclose(total, ce1 + 0.3 * math.log(2.0), rtol=1e-6)


def test_joint_loss_gradient_check():
  logits = jax.random.normal(jax.random.key(0), (3, 4, 10))
  labels = jnp.array([0, 3, 9, 3])
  f = lambda z: losses.joint_cross_entropy(z, labels, jnp.array([1.0, 0.5, 2.0]))[0]
  check_grads(f, (logits,), order=2, modes=["rev"], atol=1e-2, rtol=1e-2)
  check_grads(criteria.entropy, (logits,), order=1, modes=["rev"], atol=1e-2, rtol=1e-2)


def test_network_gradient_matches_finite_differences():
  """Directional derivative of the joint loss along a random direction, in float64.

  The network is piecewise smooth (ReLU, max pooling): a step that crosses a kink
  spoils a finite difference, so the step is tiny and the batch small.
  """
  with jax.enable_x64(True):
    _check_network_gradient()


def _check_network_gradient():
  net = nets.get("b_lenet", dtype="float64")  # The layers compute in their dtype.
  params = jax.tree.map(lambda a: a.astype(jnp.float64),
                        nets.init(net, jax.random.key(0))["params"])
  x = jax.random.uniform(jax.random.key(1), (4, 28, 28, 1), jnp.float64)
  labels = jnp.arange(4) % 10

  @jax.jit
  def loss(p):
    out, _ = nets.forward(net, {"params": p}, x)
    return losses.joint_cross_entropy(out.logits, labels, jnp.ones(2))[0]

  leaves, treedef = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.key(2), len(leaves))
  direction = treedef.unflatten([jax.random.normal(k, l.shape, jnp.float64)
                                 for k, l in zip(keys, leaves)])
  grad = jax.jit(jax.grad(loss))(params)
  analytic = sum(jnp.vdot(g, d) for g, d in zip(jax.tree.leaves(grad), jax.tree.leaves(direction)))
  eps = 1e-7
  shifted = lambda s: jax.tree.map(lambda p, d: p + s * eps * d, params, direction)
  numeric = (loss(shifted(1.0)) - loss(shifted(-1.0))) / (2 * eps)
  np.testing.assert_allclose(numeric, analytic, rtol=1e-5)
  assert abs(float(analytic)) > 1e-3  # The check is not vacuous.


def test_weighted_joint_step_follows_the_loss_weights():
  """One joint step with weights (0.3, 2.0, 0.7) and plain SGD at lr 1: its loss metric
  is the weighted sum of per-exit cross-entropies computed here, and every parameter
  moves by minus the gradient of that weighted loss."""
  net, weights = tiny_network(), (0.3, 2.0, 0.7)  # 3 exits, BatchNorm in train mode.
  variables = random_variables(net, 5)
  rng = np.random.default_rng(9)
  batch = {"image": rng.normal(size=(12, 8, 8, 2)).astype(np.float32),
           "label": rng.integers(0, 5, 12).astype(np.int32)}
  phase = train.Phase("joint", net, weights, first_step=0, num_steps=1)
  tx = optax.sgd(1.0)
  params = jax.tree.map(np.asarray, variables["params"])  # Host copies: the step donates.
  state = train.TrainState(step=jnp.int32(0), params=variables["params"],
                           model_state={"batch_stats": variables["batch_stats"]},
                           opt_state=tx.init(variables["params"]))

  def weighted_loss(p):
    out, _ = nets.forward(net, {"params": p, "batch_stats": variables["batch_stats"]},
                          batch["image"], train=True)
    logp = jax.nn.log_softmax(out.logits, axis=-1)
    ce = -jnp.take_along_axis(logp, batch["label"][None, :, None], axis=-1)[..., 0].mean(axis=1)
    return jnp.dot(jnp.asarray(weights), ce), ce

  (want_loss, want_ce), grads = jax.value_and_grad(weighted_loss, has_aux=True)(params)
  assert np.ptp(np.asarray(want_ce)) > 0.1  # Weights matter: the exits' losses differ.
  new_state, metrics = train.make_train_step(phase, tx)(state, batch, jax.random.key(0))
  np.testing.assert_allclose(metrics["loss_per_exit"], want_ce, rtol=1e-5)
  np.testing.assert_allclose(metrics["loss"], want_loss, rtol=1e-5)
  jax.tree.map(lambda new, old, g: np.testing.assert_allclose(new, old - g, rtol=1e-4, atol=1e-6),
               new_state.params, params, grads)
