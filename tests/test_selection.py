"""Choosing thresholds for a model from cached outputs (validation in, test out)."""

import math
import warnings

import numpy as np
import pytest

from bnet_jax import criteria, selection
from bnet_jax.evaluate import CachedExits


def synthetic(n, seed):
  """Two exits; exit 1 is right less often, and less confident when wrong."""
  rng = np.random.default_rng(seed)
  labels = rng.integers(0, 10, n)
  logits = rng.normal(size=(2, n, 10)).astype(np.float32)
  right = np.stack([rng.random(n) < 0.9, rng.random(n) < 0.99])
  boost = np.where(right, rng.uniform(4, 9, (2, n)), 0.0)
  logits[:, np.arange(n), labels] += boost
  return CachedExits(logits, labels)


def brute_force(cached, criterion, thresholds, costs):
  scores = cached.scores(criterion)
  exit_idx = np.full(scores.shape[1], scores.shape[0] - 1)
  for k in reversed(range(len(thresholds))):
    leave = criteria.get(criterion).exits(scores[k], thresholds[k])
    exit_idx = np.where(leave, k, exit_idx)
  right = cached.correct()[exit_idx, np.arange(len(exit_idx))]
  return right.mean(), np.mean(np.cumsum(costs)[exit_idx])


@pytest.mark.parametrize("criterion", ["entropy", "max_prob", "margin"])
@pytest.mark.parametrize("rule", selection.RULES)
def test_choice_and_its_test_figures(criterion, rule):
  val, test = synthetic(4000, 0), synthetic(4000, 1)
  seg = [1.0, 3.0]
  r = selection.choose(val, test, criterion, seg, rule=rule, epsilon=0.01, max_cost_fraction=0.6)
  assert r["chosen_on"] == "validation" and r["criterion"] == criterion and r["rule"] == rule
  acc_val, cost_val = brute_force(val, criterion, r["thresholds"], seg)
  acc_test, cost_test = brute_force(test, criterion, r["thresholds"], seg)
  assert r["validation"]["accuracy"] == pytest.approx(acc_val)
  assert r["validation"]["expected_flops"] == pytest.approx(cost_val)
  assert r["test"]["accuracy"] == pytest.approx(acc_test)
  assert r["test"]["expected_flops"] == pytest.approx(cost_test)
  last = r["validation"]["last_exit_accuracy"]
  if rule == "accuracy_drop":
    assert acc_val >= last - 0.01 - 1e-12
  if rule == "budget":
    assert cost_val <= 0.6 * 4.0 + 1e-12
  assert cost_val < 4.0  # Every rule finds something cheaper than the full network here.


def test_fixed_grid_spans_nobody_to_everybody():
  near = np.geomspace(1e-6, 1.0, 20)
  g = selection.fixed_grid("entropy", 10, 20)
  np.testing.assert_array_equal(g, np.concatenate([[0.0], near * math.log(10), [np.inf]]))
  assert g[-2] == pytest.approx(math.log(10))
  for name in ("max_prob", "margin"):  # Near 1, down to 0 (the span's far end).
    p = selection.fixed_grid(name, 10, 20)
    np.testing.assert_array_equal(p, np.concatenate([[np.inf], 1.0 - near, [-np.inf]]))
    assert p[-2] == 0.0


def test_unknown_rule_and_criterion():
  val = synthetic(100, 0)
  with pytest.raises(ValueError, match="Unknown selection rule 'best'"):
    selection.choose(val, val, "entropy", [1.0, 2.0], rule="best")
  with pytest.raises(ValueError, match="Unknown exit criterion"):
    selection.choose(val, val, "confidence", [1.0, 2.0])


def test_risk_rule_says_when_no_early_exit_can_be_certified():
  """epsilon 0.001, delta 0.1: the test half needs 2,302 samples, so 4,603 in all."""
  test = synthetic(200, 1)
  with pytest.warns(UserWarning, match="cannot certify any early exit with 4000 validation "
                                       "samples.* p = 0.135 > 0.1. It needs 4603 samples"):
    r = selection.choose(synthetic(4000, 0), test, "entropy", [1.0, 3.0], rule="risk",
                         epsilon=0.001)
  assert r["certifiable"] is False and r["samples_needed"] == 4603 and r["certified"] is False
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    r = selection.choose(synthetic(4603, 0), test, "entropy", [1.0, 3.0], rule="risk",
                         epsilon=0.001)
  assert r["certifiable"] is True and r["samples_needed"] == 4603
  assert "certifiable" not in selection.choose(synthetic(4000, 0), test, "entropy", [1.0, 3.0])
