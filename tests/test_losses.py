"""Loss, entropy and exit criteria against hand-computed values; gradient checks."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

from bnet_jax import criteria, losses, nets


def test_entropy_hand_values():
  # softmax([0, ln 3]) = [1/4, 3/4]; H = -(1/4 ln 1/4 + 3/4 ln 3/4).
  h = criteria.entropy(jnp.array([[0.0, math.log(3.0)], [5.0, 5.0]]))
  np.testing.assert_allclose(h, [-(0.25 * math.log(0.25) + 0.75 * math.log(0.75)),
                                 math.log(2.0)], rtol=1e-6)
  assert float(criteria.entropy(jnp.array([100.0, 0.0, 0.0]))) < 1e-30 + 1e-6
  np.testing.assert_allclose(criteria.entropy(jnp.zeros(10)), math.log(10), rtol=1e-6)


def test_max_prob_and_margin_hand_values():
  logits = jnp.array([0.0, math.log(2.0), math.log(5.0)])  # p = [1/8, 2/8, 5/8].
  np.testing.assert_allclose(criteria.max_prob(logits), 5 / 8, rtol=1e-6)
  np.testing.assert_allclose(criteria.margin(logits), 3 / 8, rtol=1e-6)


def test_criteria_comparisons_are_strict():
  score = jnp.array([0.1, 0.2, 0.3])
  np.testing.assert_array_equal(criteria.exits("entropy", score, 0.2), [True, False, False])
  np.testing.assert_array_equal(criteria.exits("max_prob", score, 0.2), [False, False, True])
  with pytest.raises(ValueError, match="Unknown exit criterion 'ent'"):
    criteria.get("ent")


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
