"""The batched, padded all-exits pass of `evaluate` against `nets.forward` on the same images."""

import jax
import numpy as np
import pytest

from bnet_jax import evaluate, nets, parallel
from helpers import random_variables

N, BATCH = 37, 16  # The batch size does not divide N: the last batch is padded.


@pytest.fixture(scope="module")
def case():
  net = nets.get("b_lenet")
  variables = random_variables(net, 4)
  x = np.random.default_rng(8).normal(size=(N, 28, 28, 1)).astype(np.float32)
  want = jax.device_get(nets.forward(net, variables, x)[0])
  return net, variables, x, want


@pytest.mark.parametrize("mesh", [None, "first_device"])
def test_all_exits_equals_forward(case, mesh):
  net, variables, x, want = case
  mesh = parallel.make_mesh(jax.devices()[:1]) if mesh else None
  got = evaluate.all_exits(net, variables, x, batch_size=BATCH, mesh=mesh)
  assert got.logits.shape == (net.num_exits, N, net.num_classes)
  assert got.entropy.shape == (net.num_exits, N)
  np.testing.assert_allclose(got.logits, want.logits, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(got.entropy, want.entropy, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("mesh", [None, "first_device"])
def test_correct_per_exit_counts_forward_argmax(case, mesh):
  net, variables, x, want = case
  mesh = parallel.make_mesh(jax.devices()[:1]) if mesh else None
  predicted = np.argmax(want.logits, axis=-1)
  # Labels that each exit gets right on some rows and wrong on others, padding excluded.
  labels = np.where(np.arange(N) % 3 == 0, predicted[0], predicted[-1]).astype(np.int32)
  counts = evaluate.correct_per_exit(net, variables, x, labels, batch_size=BATCH, mesh=mesh)
  np.testing.assert_array_equal(counts, np.sum(predicted == labels[None], axis=1))
  assert 0 < counts.min() and counts.max() < N
  result = evaluate.evaluate_split(net, variables, x, labels, batch_size=BATCH, mesh=mesh)
  assert result == {"num_examples": N, "accuracy_per_exit": [float(c / N) for c in counts]}
