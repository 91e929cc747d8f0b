"""Exit criteria: hand-computed scores, the `Criterion` value and its registry, and a
criterion whose scores are negative taken through the whole pipeline (cached exits ->
threshold choice by every rule -> cascade equal to the reference)."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bnet_jax import cascade, cost, criteria, nets, screening, selection
from bnet_jax.evaluate import CachedExits
from helpers import BAND, Case, random_variables


def neg_logit_gap(logits: jax.Array) -> jax.Array:
  """Minus the gap between the two largest logits: (..., C) -> (...), in (-inf, 0]."""
  top2 = jax.lax.top_k(logits, 2)[0]
  return top2[..., 1] - top2[..., 0]


# Confident samples have very negative scores: nothing bounds them below, so no finite
# threshold lets nobody exit, and every useful threshold is negative.
NEG_LOGIT_GAP = criteria.Criterion("neg_logit_gap", neg_logit_gap, exits_below=True,
                                   never_exit=-math.inf, span=lambda num_classes: (-10.0, 0.0))


@pytest.fixture
def registered(monkeypatch) -> criteria.Criterion:
  """`NEG_LOGIT_GAP` registered for one test (the registry is restored afterwards)."""
  monkeypatch.setattr(criteria, "CRITERIA", dict(criteria.CRITERIA))
  return criteria.register(NEG_LOGIT_GAP)


# ---- the built-in criteria ----------------------------------------------------------

def test_entropy_hand_values():
  # softmax([0, ln 3]) = [1/4, 3/4]; H = -(1/4 ln 1/4 + 3/4 ln 3/4).
  h = criteria.entropy(jnp.array([[0.0, math.log(3.0)], [5.0, 5.0]]))
  np.testing.assert_allclose(h, [-(0.25 * math.log(0.25) + 0.75 * math.log(0.75)),
                                 math.log(2.0)], rtol=1e-6)
  assert float(criteria.entropy(jnp.array([100.0, 0.0, 0.0]))) < 1e-30 + 1e-6
  np.testing.assert_allclose(criteria.entropy(jnp.zeros(10)), math.log(10), rtol=1e-6)


def test_max_prob_and_margin_hand_values():
  logits = jnp.array([0.0, math.log(2.0), math.log(5.0)])  # p = [1/8, 2/8, 5/8].
  np.testing.assert_allclose(criteria.get("max_prob").score(logits), 5 / 8, rtol=1e-6)
  np.testing.assert_allclose(criteria.get("margin").score(logits), 3 / 8, rtol=1e-6)


def test_comparisons_are_strict_for_jax_and_numpy():
  for score in (jnp.array([0.1, 0.2, 0.3]), np.array([0.1, 0.2, 0.3])):
    np.testing.assert_array_equal(criteria.ENTROPY.exits(score, 0.2), [True, False, False])
    np.testing.assert_array_equal(criteria.MAX_PROB.exits(score, 0.2), [False, False, True])


def test_built_in_bounds():
  assert [(c.name, c.exits_below, c.never_exit, c.always_exit) for c in criteria.CRITERIA.values()
          ] == [("entropy", True, 0.0, math.inf), ("max_prob", False, math.inf, -math.inf),
                ("margin", False, math.inf, -math.inf)]
  assert criteria.ENTROPY.span(10) == (0.0, math.log(10))
  assert not criteria.ENTROPY.higher_is_confident and criteria.MARGIN.higher_is_confident


# ---- the registry and the threshold check -------------------------------------------

def test_get_and_register(registered):
  assert criteria.get(criteria.ENTROPY) is criteria.ENTROPY
  assert criteria.get("neg_logit_gap") is registered
  with pytest.raises(ValueError, match=r"Unknown exit criterion 'ent'; known: \['entropy', "
                                       r"'margin', 'max_prob', 'neg_logit_gap'\]"):
    criteria.get("ent")
  with pytest.raises(ValueError, match="'entropy' is already registered"):
    criteria.register(criteria.Criterion("entropy", neg_logit_gap, True, -math.inf,
                                         lambda c: (-1.0, 0.0)))


def test_registry_is_restored_after_a_test():
  assert list(criteria.CRITERIA) == ["entropy", "max_prob", "margin"]


def test_check_refuses_only_the_never_side():
  criteria.ENTROPY.check([0.0, 0.5, math.inf])
  with pytest.raises(ValueError, match="entropy threshold -0.1 lets no sample exit: entropy "
                                       "scores are never below 0; use 0 for 'nobody exits'"):
    criteria.ENTROPY.check([[0.5, -0.1]])
  NEG_LOGIT_GAP.check([-1e9, -3.0, 0.0, -math.inf, math.inf])
  capped = criteria.Criterion("capped", criteria.max_prob, exits_below=False, never_exit=1.0,
                              span=lambda c: (1.0, 0.0))
  capped.check([-5.0, 1.0])
  with pytest.raises(ValueError, match="capped scores are never above 1; use 1 for"):
    capped.check([1.5])


def test_screening_grid_clips_rounding_to_the_never_side():
  """Quantiles beyond a finite `never_exit` (rounding) are clipped to it; none otherwise."""
  capped = criteria.Criterion("capped", criteria.max_prob, exits_below=False, never_exit=1.0,
                              span=lambda c: (1.0, 0.0))
  scores = np.array([[0.2, 0.6, 1.0 + 1e-7], [0.0, 0.0, 0.0]])
  np.testing.assert_array_equal(screening.grid(scores, 3, criterion=capped)[0],
                                [-np.inf, 0.2, 0.6, 1.0])
  shifted = scores - 5.0
  np.testing.assert_array_equal(screening.grid(shifted, 3, criterion=NEG_LOGIT_GAP)[0],
                                [-np.inf, *shifted[0], np.inf])


def test_fixed_grid_spans_the_criterion_span():
  g = selection.fixed_grid(NEG_LOGIT_GAP, 10, 30)
  assert g[0] == -np.inf and g[-1] == np.inf  # Nobody exits, then everybody.
  inner = g[1:-1]
  assert np.all(np.diff(g) > 0) and -10.0 < inner.min() < -9.99 and inner.max() == 0.0
  assert np.all(inner <= 0.0)  # Inside the span; an entropy-like grid would be >= 0.


# ---- the whole pipeline on neg_logit_gap ---------------------------------------------

@pytest.fixture(scope="module")
def blenet():
  """Random-weight B-LeNet; validation and test splits of 300 images each, labelled as
  predicted by the first exit where its score is in the lowest 30% (confident) and by
  the last exit elsewhere, 10% at random; the test images as a `test_cascade.Case`;
  the segment FLOPs and a cascade under NEG_LOGIT_GAP."""
  net = nets.get("b_lenet")
  variables = random_variables(net, 0)
  rng = np.random.default_rng(4)
  splits = []
  for _ in range(2):
    x = rng.normal(size=(300, 28, 28, 1)).astype(np.float32)
    logits = np.asarray(nets.forward(net, variables, x)[0].logits)
    score = np.asarray(neg_logit_gap(logits[0]))
    labels = np.argmax(np.where((score < np.quantile(score, 0.3))[:, None], logits[0],
                                logits[-1]), -1)
    labels = np.where(rng.random(300) < 0.9, labels, rng.integers(0, 10, 300))
    splits.append(CachedExits(logits, labels))
  case = Case(net, variables, x, {}, {})
  seg = cost.segment_flops(net, variables, NEG_LOGIT_GAP)
  cas = cascade.Cascade(net, variables, [-math.inf], criterion=NEG_LOGIT_GAP)
  return (*splits, case, seg, cas)


def assert_agrees(pred: cascade.Prediction, case: Case, size: int,
                  thresholds: list[float]) -> cascade.Prediction:
  """The cascade's `pred` on the first `size` test images equals `cascade.reference`
  (computed on all of them) as in `test_cascade.assert_matches`, the tie band included;
  scores are compared relative to their size, as logit gaps are not bounded by 1."""
  ref = cascade.reference(case.net, case.variables, case.x, thresholds, NEG_LOGIT_GAP)
  ref = cascade.Prediction(*(a[:size] for a in ref))
  near = np.abs(case.all_scores(NEG_LOGIT_GAP)[0, :size] - thresholds[0]) < BAND  # 2 exits.
  assert near.sum() <= 1 + 0.01 * size, f"{near.sum()} samples within {BAND} of a threshold"
  np.testing.assert_array_equal(pred.exit[~near], ref.exit[~near])
  np.testing.assert_array_equal(pred.label[~near], ref.label[~near])
  np.testing.assert_allclose(pred.score[~near], ref.score[~near], rtol=1e-5, atol=1e-5)
  return ref


@pytest.mark.parametrize("rule", selection.RULES)
def test_neg_logit_gap_through_the_pipeline(registered, blenet, rule):
  val, test, case, seg, cas = blenet
  r = selection.choose(val, test, "neg_logit_gap", seg, rule=rule, epsilon=0.05, delta=0.2,
                       max_cost_fraction=0.7)
  assert r["criterion"] == "neg_logit_gap" and r["rule"] == rule
  t = r["thresholds"]
  assert len(t) == 1 and t[0] <= 0.0  # Negative or -inf: refused under an entropy-like check.
  if rule == "risk":
    assert r["certified"] and t[0] in selection.fixed_grid(registered, 10, 60)
    assert -10.0 < t[0] < 0.0  # An early exit certified inside the span.
  else:
    assert t[0] in screening.grid(val.scores(registered), 60, criterion=registered)[0]
  brute = registered.exits(val.scores(registered)[0], t[0])
  assert r["validation"]["exit_fractions"][0] == pytest.approx(np.mean(brute))

  for size in (1, 300):
    pred = cas.predict(case.x[:size], t)
    ref = assert_agrees(pred, case, size, t)
    assert np.all(ref.score <= 0.0)
  assert np.mean(pred.exit == 0) == pytest.approx(r["test"]["exit_fractions"][0], abs=2 / 300)


def test_negative_thresholds_are_accepted_where_scores_are_negative(registered, blenet):
  val, _, case, _, _ = blenet
  t = [float(np.median(val.scores(registered)[0]))]
  assert t[0] < 0.0
  np.testing.assert_array_equal(cascade.check_thresholds(case.net, t, registered), np.float32(t))
  cas = cascade.Cascade(case.net, case.variables, t, criterion="neg_logit_gap")
  assert cas.criterion is registered
  pred = cas.predict(case.x[:50])
  assert 0 < np.mean(pred.exit == 0) < 1
  assert_agrees(pred, case, 50, t)
  nobody = cascade.reference(case.net, case.variables, case.x[:50], [-math.inf], registered)
  np.testing.assert_array_equal(nobody.exit, 1)
  with pytest.raises(ValueError, match="entropy scores are never below 0"):
    cascade.check_thresholds(case.net, t, "entropy")
