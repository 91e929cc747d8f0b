"""Tests of bnet_jax.screening against brute-force references, and of the LTT guarantee."""

import json
import math

import numpy as np
import pytest
from scipy import stats

from bnet_jax import criteria, screening

# One criterion of each direction: exits below the threshold, and above it.
DIRECTIONS = [criteria.ENTROPY, criteria.MAX_PROB]


def _exits_brute(scores, thresholds, criterion):
  """Exit index of every sample under one vector, by a per-sample loop."""
  n_exits, n_samples = scores.shape
  exits = []
  for i in range(n_samples):
    exit_ = n_exits - 1
    for n in range(n_exits - 1):
      if criterion.exits(scores[n, i], thresholds[n]):
        exit_ = n
        break
    exits.append(exit_)
  return np.array(exits)


def _evaluate_brute(scores, correct, grid, cost, criterion):
  n_exits, n_samples = scores.shape
  accuracy, fractions, expected_cost = [], [], []
  for t in grid:
    exits = _exits_brute(scores, t, criterion)
    accuracy.append(np.mean(correct[exits, np.arange(n_samples)]))
    fractions.append(np.bincount(exits, minlength=n_exits) / n_samples)
    expected_cost.append(np.mean(cost[exits]))
  return np.array(accuracy), np.array(fractions), np.array(expected_cost)


def _random_split(rng, n_exits, n_samples, criterion):
  """Scores on a coarse lattice, so that thresholds drawn from it tie with scores."""
  scores = rng.integers(0, 6, size=(n_exits, n_samples)) / 5.0
  if not criterion.exits_below:
    scores -= 0.4  # negative scores too: only entropy is non-negative
  correct = rng.random((n_exits, n_samples)) < 0.7
  return scores, correct


def _random_grid(rng, scores, n_vectors, criterion):
  """Thresholds equal to score values (ties), off-lattice values, and the two extremes."""
  n_exits = scores.shape[0]
  values = np.concatenate([np.unique(scores), rng.uniform(scores.min(), scores.max(), 5)])
  grid = rng.choice(values, size=(n_vectors, n_exits - 1))
  never, always = criterion.never_exit, criterion.always_exit
  return np.concatenate([grid, np.full((1, n_exits - 1), never), np.full((1, n_exits - 1), always)])


@pytest.mark.parametrize("criterion", DIRECTIONS, ids=lambda c: c.name)
@pytest.mark.parametrize("n_exits", [2, 3, 4])
@pytest.mark.parametrize("chunk_elements", [None, 50])
def test_evaluate_matches_brute_force(n_exits, criterion, chunk_elements, monkeypatch):
  if chunk_elements is not None:  # force many chunks
    monkeypatch.setattr(screening, "CHUNK_ELEMENTS", chunk_elements)
  rng = np.random.default_rng(100 * n_exits + criterion.higher_is_confident)
  scores, correct = _random_split(rng, n_exits, 37, criterion)
  grid = _random_grid(rng, scores, 80, criterion)
  cost = np.cumsum(rng.uniform(0.5, 2.0, n_exits))

  result = screening.evaluate_thresholds(scores, correct, grid, cost, criterion=criterion)
  accuracy, fractions, expected_cost = _evaluate_brute(scores, correct, grid, cost, criterion)
  np.testing.assert_array_equal(result.thresholds, grid)
  np.testing.assert_allclose(result.accuracy, accuracy, rtol=0, atol=1e-12)
  np.testing.assert_allclose(result.exit_fractions, fractions, rtol=0, atol=1e-12)
  np.testing.assert_allclose(result.expected_cost, expected_cost, rtol=1e-12)
  # The last two rows are "nobody exits early" and "everybody exits at the first exit".
  np.testing.assert_array_equal(result.exit_fractions[-2], np.eye(n_exits)[-1])
  np.testing.assert_array_equal(result.exit_fractions[-1], np.eye(n_exits)[0])
  assert result.accuracy[-2] == screening.last_exit_accuracy(correct)


def test_strict_comparison_at_ties():
  scores = np.array([[0.5, 0.5, 0.2], [0.0, 0.0, 0.0]])
  correct = np.ones_like(scores, bool)
  cost = [1.0, 2.0]
  below = screening.evaluate_thresholds(scores, correct, [0.5], cost, criterion="entropy")
  above = screening.evaluate_thresholds(scores, correct, [0.5], cost, criterion="max_prob")
  np.testing.assert_allclose(below.exit_fractions[0], [1 / 3, 2 / 3])  # only 0.2 < 0.5
  np.testing.assert_allclose(above.exit_fractions[0], [0.0, 1.0])  # nothing > 0.5


@pytest.mark.parametrize("criterion", DIRECTIONS, ids=lambda c: c.name)
def test_grid_includes_extremes(criterion):
  rng = np.random.default_rng(0)
  scores = rng.uniform(0.0, 1.0, (3, 200))
  values = screening.grid(scores, 7, criterion=criterion)
  assert len(values) == 2 and all(len(v) <= 9 and np.all(np.diff(v) > 0) for v in values)
  grid = screening.cartesian(values)
  assert grid.shape == (len(values[0]) * len(values[1]), 2)
  result = screening.evaluate_thresholds(scores, scores > 0.5, grid, [1, 2, 3],
                                         criterion=criterion)
  assert any(np.array_equal(f, [0, 0, 1]) for f in result.exit_fractions)
  assert any(np.array_equal(f, [1, 0, 0]) for f in result.exit_fractions)


def test_cartesian_order():
  grid = screening.cartesian([[1.0, 2.0], [3.0, 4.0, 5.0]])
  np.testing.assert_array_equal(grid, [[1, 3], [1, 4], [1, 5], [2, 3], [2, 4], [2, 5]])


def _result(accuracy, cost):
  accuracy, cost = np.asarray(accuracy, float), np.asarray(cost, float)
  g = len(accuracy)
  return screening.ScreenResult(np.zeros((g, 1)), accuracy, np.zeros((g, 2)), cost)


def _pareto_brute(accuracy, cost):
  keep = []
  for i in range(len(accuracy)):
    dominated = any(cost[j] <= cost[i] and accuracy[j] >= accuracy[i]
                    and (cost[j] < cost[i] or accuracy[j] > accuracy[i])
                    for j in range(len(accuracy)))
    duplicate = any(cost[j] == cost[i] and accuracy[j] == accuracy[i] for j in range(i))
    if not dominated and not duplicate:
      keep.append(i)
  return sorted(keep, key=lambda i: cost[i])


@pytest.mark.parametrize("seed", range(5))
def test_pareto_matches_brute_force(seed):
  rng = np.random.default_rng(seed)
  accuracy = rng.integers(0, 8, 150) / 8  # coarse values: many ties
  cost = rng.integers(0, 10, 150) / 3
  frontier = screening.pareto_frontier(_result(accuracy, cost))
  assert frontier.tolist() == _pareto_brute(accuracy, cost)
  assert np.all(np.diff(cost[frontier]) > 0) and np.all(np.diff(accuracy[frontier]) > 0)


def test_pareto_of_a_screened_grid():
  rng = np.random.default_rng(1)
  scores, correct = _random_split(rng, 3, 300, criteria.ENTROPY)
  result = screening.evaluate_thresholds(scores, correct,
                                         _random_grid(rng, scores, 300, criteria.ENTROPY),
                                         [1.0, 2.0, 3.0], criterion="entropy")
  assert (screening.pareto_frontier(result).tolist()
          == _pareto_brute(result.accuracy, result.expected_cost))


@pytest.mark.parametrize("seed", range(5))
def test_rules_match_brute_force(seed):
  rng = np.random.default_rng(seed)
  accuracy = rng.integers(0, 10, 200) / 10
  cost = rng.integers(1, 12, 200) / 4
  result = _result(accuracy, cost)
  indices = range(len(accuracy))

  reference, epsilon = 0.9, 0.2  # the floor 0.7 is met exactly by some vectors
  chosen = screening.select_accuracy_drop(result, epsilon, reference)
  feasible = [i for i in indices if accuracy[i] >= 0.7]
  assert chosen.index == min(feasible, key=lambda i: (cost[i], -accuracy[i], i))

  max_cost = 1.5  # met exactly by some vectors
  chosen = screening.select_budget(result, max_cost)
  feasible = [i for i in indices if cost[i] <= max_cost]
  assert chosen.index == min(feasible, key=lambda i: (-accuracy[i], cost[i], i))
  assert chosen.accuracy == accuracy[chosen.index]
  assert json.loads(json.dumps(chosen.to_dict()))["index"] == chosen.index


def test_rules_fail_clearly_when_nothing_is_feasible():
  result = _result([0.5, 0.6], [2.0, 3.0])
  with pytest.raises(ValueError, match="no vector reaches"):
    screening.select_accuracy_drop(result, 0.01, 0.9)
  with pytest.raises(ValueError, match="no vector costs"):
    screening.select_budget(result, 1.0)


def test_apply_selection_reports_the_other_split():
  rng = np.random.default_rng(3)
  scores, correct = _random_split(rng, 3, 50, criteria.ENTROPY)
  figures = screening.apply_selection(scores, correct, [0.3, 0.5], [1, 2, 3],
                                      criterion="entropy")
  accuracy, fractions, cost = _evaluate_brute(scores, correct, [[0.3, 0.5]], np.array([1, 2, 3]),
                                              criteria.ENTROPY)
  assert figures["accuracy"] == pytest.approx(accuracy[0])
  assert figures["expected_cost"] == pytest.approx(cost[0])
  assert figures["exit_fractions"] == pytest.approx(fractions[0].tolist())


# ----------------------------------------------------------------------------------
# Risk control.


def _synthetic_population(rng, size):
  """3 exits, entropy-like scores in [0, ln 10]; early exits are less accurate when unsure.

  Samples the last exit gets wrong are wrong everywhere, so that the accuracy drop
  equals the controlled loss (the bound is tight, the test as sharp as it can be).

  Returns scores (3, size), correct (3, size) and the cost per exit.
  """
  confidence = rng.random((3, size))
  scores = math.log(10) * (1 - confidence)
  wrong_weight = np.array([0.9, 0.6, 0.0])[:, None]
  correct = rng.random((3, size)) < 1 - wrong_weight * (1 - confidence) ** 2
  correct[2] = rng.random(size) < 0.9
  correct[:2] &= correct[2]
  return scores, correct, np.array([0.3, 0.6, 1.0])


def _true_loss_and_drop(scores, correct, thresholds, cost):
  """E[1(last right, cascade wrong)] and acc(last) - acc(cascade) over the population."""
  no_loss = correct | ~correct[-1]
  loss = 1 - screening.evaluate_thresholds(scores, no_loss, thresholds, cost,
                                           criterion="entropy").accuracy
  result = screening.evaluate_thresholds(scores, correct, thresholds, cost, criterion="entropy")
  return loss, screening.last_exit_accuracy(correct) - result.accuracy, result.expected_cost


@pytest.mark.parametrize("method,trials", [("binomial", 400), ("hb", 150)])
def test_risk_control_keeps_its_promise(method, trials):
  epsilon, delta, n = 0.01, 0.1, 2000
  rng = np.random.default_rng(0)
  population, correct, cost = _synthetic_population(rng, 200_000)
  # A fixed grid: the candidates must not depend on the calibration draws.
  values = np.concatenate([[0.0], np.linspace(0.02, 1.2, 30), [np.inf]])
  candidates = screening.cartesian([values, values])

  chosen, certified = [], []
  for _ in range(trials):
    draw = rng.integers(0, population.shape[1], n)  # i.i.d. from the population
    selection = screening.select_risk_controlled(
        population[:, draw], correct[:, draw], candidates, cost, epsilon, delta,
        criterion="entropy", method=method, seed=int(rng.integers(2**31)))
    chosen.append(selection.thresholds)
    certified.append(selection.certified)
  loss, drop, true_cost = _true_loss_and_drop(population, correct, np.array(chosen), cost)

  violation_rate = np.mean(loss > epsilon)
  print(f"\n{method}: {trials} calibration sets of n={n}, epsilon={epsilon}, delta={delta}: "
        f"violation rate of E[loss] <= epsilon {violation_rate:.4f}, of the accuracy drop "
        f"{np.mean(drop > epsilon):.4f}; mean true loss {loss.mean():.4f}; certified "
        f"{np.mean(certified):.3f}; mean true cost {true_cost.mean():.4f} (last exit alone: "
        f"{cost[-1]})")
  assert violation_rate <= delta + 3 * math.sqrt(delta * (1 - delta) / trials)
  # Not trivially conservative: it usually certifies real savings.
  assert np.mean(certified) >= 0.8
  assert np.mean(true_cost) < 0.9 * cost[-1]


def test_risk_control_with_given_ordering_matches_fixed_sequence_by_hand():
  rng = np.random.default_rng(5)
  scores, correct, cost = _synthetic_population(rng, 3000)
  candidates = screening.cartesian([np.linspace(0.0, 1.5, 12)] * 2)
  # Data-independent, most expensive first: low entropy thresholds let few samples out.
  ordering = np.argsort(candidates.sum(axis=1), kind="stable")
  epsilon, delta = 0.02, 0.1
  selection = screening.select_risk_controlled(scores, correct, candidates, cost, epsilon, delta,
                                               criterion="entropy", ordering=ordering)

  last_exit = 0
  for k, index in enumerate(ordering):
    exits = _exits_brute(scores, candidates[index], criteria.ENTROPY)
    losses = np.sum(correct[-1] & ~correct[exits, np.arange(scores.shape[1])])
    if stats.binom.cdf(losses, scores.shape[1], epsilon) > delta:
      break
    last_exit = k + 1
  assert 0 < last_exit < len(ordering)  # the walk stops somewhere in the middle
  assert selection.certified and selection.index == ordering[last_exit - 1]
  assert selection.params["num_rejected"] == last_exit
  json.dumps(selection.to_dict())


@pytest.mark.parametrize("criterion", DIRECTIONS, ids=lambda c: c.name)
def test_risk_control_falls_back_to_no_early_exit(criterion):
  rng = np.random.default_rng(2)
  scores, correct = _random_split(rng, 3, 100, criterion)
  grid = _random_grid(rng, scores, 20, criterion)
  # With 50 test samples even a loss-free vector has p = 0.99**50 > 0.1.
  selection = screening.select_risk_controlled(scores, correct, grid, [1, 2, 3], 0.01, 0.1,
                                               criterion=criterion)
  assert selection.certified is False and selection.index is None
  np.testing.assert_array_equal(selection.exit_fractions, [0, 0, 1])
  assert selection.accuracy == screening.last_exit_accuracy(correct)
  assert json.loads(json.dumps(selection.to_dict()))["certified"] is False


def test_hb_p_value_is_more_conservative_than_binomial():
  losses = np.arange(0, 30)
  binomial = screening.binomial_p_values(losses, 1000, 0.02)
  hb = screening.hb_p_values(losses, 1000, 0.02)
  assert np.all(hb >= binomial - 1e-15) and np.all(hb <= 1.0 + 1e-12)


def _hb_by_formula(k, n, epsilon):
  """Hoeffding-Bentkus p-value (LTT, Prop. 3.2) from its formula, one loss count at a time."""
  a = min(k / n, epsilon)
  h = (a * math.log(a / epsilon) if a else 0.0) + (1 - a) * math.log((1 - a) / (1 - epsilon))
  return min(math.exp(-n * h), math.e * stats.binom.cdf(math.ceil(k), n, epsilon))


@pytest.mark.parametrize("losses, n, epsilon", [
    (np.arange(0, 40), 1000, 0.02), ([0, 1, 3, 17], 2500, 0.001), ([0, 50, 120, 4000], 4000, 0.03),
    ([0, 2, 9], 50, 0.2)])
def test_p_values_equal_an_independent_computation(losses, n, epsilon):
  losses = np.asarray(losses)
  binomial = [stats.binom.cdf(k, n, epsilon) for k in losses]
  hb = [_hb_by_formula(int(k), n, epsilon) for k in losses]
  np.testing.assert_allclose(screening.binomial_p_values(losses, n, epsilon), binomial,
                             rtol=0, atol=1e-12)
  np.testing.assert_allclose(screening.hb_p_values(losses, n, epsilon), hb, rtol=0, atol=1e-12)
  assert screening.min_p_value(n, epsilon) == pytest.approx((1 - epsilon) ** n, abs=1e-12)
  assert screening.min_p_value(n, epsilon, "hb") == pytest.approx((1 - epsilon) ** n, abs=1e-12)


@pytest.mark.parametrize("method", ["binomial", "hb"])
def test_risk_control_refuses_a_p_value_just_above_delta(method):
  """Two candidates tested in a given order: A loses nothing, B loses k samples with
  delta < p(B) < 3 delta. Only A may be certified; B when delta is raised past p(B)."""
  n, epsilon, delta = 1000, 0.02, 0.1
  p_value = lambda k: screening.P_VALUES[method](np.array([k]), n, epsilon)[0]
  k = next(k for k in range(n) if p_value(k) > delta)
  assert delta < p_value(k) < 3 * delta
  scores = np.tile(np.linspace(0.1, 1.0, n), (2, 1))  # Entropy; exit 0 wrong on k samples.
  correct = np.ones((2, n), bool)
  correct[0, :k] = False
  candidates = np.array([[0.0], [np.inf]])  # A: nobody exits early; B: everybody does.
  args = (scores, correct, candidates, [1.0, 2.0], epsilon)
  chosen = screening.select_risk_controlled(*args, delta, criterion="entropy",
                                            method=method, ordering=[0, 1])
  assert chosen.certified and chosen.index == 0 and chosen.params["num_rejected"] == 1
  looser = screening.select_risk_controlled(*args, p_value(k) + 1e-9, criterion="entropy",
                                            method=method, ordering=[0, 1])
  assert looser.index == 1 and looser.params["p_value"] == pytest.approx(p_value(k), abs=1e-12)


@pytest.mark.parametrize("epsilon, delta", [(0.001, 0.1), (0.01, 0.05), (0.05, 0.2), (0.3, 0.9)])
@pytest.mark.parametrize("method", ["binomial", "hb"])
def test_min_test_samples_is_where_zero_losses_first_certify(epsilon, delta, method):
  m = screening.min_test_samples(epsilon, delta, method)
  assert screening.min_p_value(m, epsilon, method) <= delta
  assert m == 1 or screening.min_p_value(m - 1, epsilon, method) > delta
  assert m == math.ceil(math.log(delta) / math.log(1 - epsilon))


def test_min_p_value_at_the_default_validation_split():
  """B-LeNet's 5,000 validation samples leave 2,500 to test: epsilon 0.001 certifies
  only with zero losses there (p = 0.999**2500 = 0.082 <= 0.1)."""
  assert screening.min_p_value(2500, 0.001) == pytest.approx(0.0819824, abs=1e-6)
  assert screening.min_test_samples(0.001, 0.1) == 2302


# ----------------------------------------------------------------------------------
# Input errors.


def _split():
  rng = np.random.default_rng(0)
  return rng.uniform(0, 1, (3, 20)), rng.random((3, 20)) < 0.5


@pytest.mark.parametrize("thresholds,match", [
    ([0.5], "give 2 thresholds per vector"),
    ([[0.5, 0.5, 0.5]], "give 2 thresholds per vector"),
    ([0.5, np.nan], "NaN"),
    ([0.5, -0.1], "entropy threshold -0.1 lets no sample exit: entropy scores are never "
                  "below 0; use 0 for 'nobody exits'"),
    (np.zeros((0, 2)), "no vectors"),
])
def test_bad_thresholds(thresholds, match):
  scores, correct = _split()
  with pytest.raises(ValueError, match=match):
    screening.evaluate_thresholds(scores, correct, thresholds, [1, 2, 3], criterion="entropy")


def test_negative_thresholds_are_fine_for_max_prob():
  scores, correct = _split()
  screening.evaluate_thresholds(scores, correct, [-0.1, -np.inf], [1, 2, 3],
                                criterion="max_prob")


@pytest.mark.parametrize("change,match", [
    (lambda s, c, k: (s, c[:2], k), "correct has shape"),
    (lambda s, c, k: (s[0], c[0], k), "scores must have shape"),
    (lambda s, c, k: (s, c, k[:2]), "cost has shape"),
    (lambda s, c, k: (np.where(s > 0.9, np.nan, s), c, k), "scores contain NaN"),
    (lambda s, c, k: (s, c * 2.0, k), "correct must be boolean"),
])
def test_bad_inputs(change, match):
  scores, correct, cost = change(*_split(), np.array([1.0, 2.0, 3.0]))
  with pytest.raises(ValueError, match=match):
    screening.evaluate_thresholds(scores, correct, [0.5, 0.5], cost, criterion="entropy")


@pytest.mark.parametrize("epsilon,delta", [(0.0, 0.1), (1.0, 0.1), (0.01, 0.0), (0.01, 1.5),
                                           (np.nan, 0.1)])
def test_bad_epsilon_delta(epsilon, delta):
  scores, correct = _split()
  with pytest.raises(ValueError, match="strictly between 0 and 1"):
    screening.select_risk_controlled(scores, correct, [[0.5, 0.5]], [1, 2, 3], epsilon, delta,
                                     criterion="entropy")


def test_bad_method_and_ordering():
  scores, correct = _split()
  args = (scores, correct, [[0.5, 0.5]], [1, 2, 3], 0.1, 0.1)
  with pytest.raises(ValueError, match="Unknown method"):
    screening.select_risk_controlled(*args, criterion="entropy", method="bonferroni")
  with pytest.raises(ValueError, match="ordering must be"):
    screening.select_risk_controlled(*args, criterion="entropy", ordering=[3])


def test_bad_selection_parameters():
  result = _result([0.5], [1.0])
  with pytest.raises(ValueError, match="epsilon must lie"):
    screening.select_accuracy_drop(result, -0.1, 0.9)
  with pytest.raises(ValueError, match="max_cost must be finite"):
    screening.select_budget(result, np.nan)
  with pytest.raises(ValueError, match="one threshold vector"):
    screening.apply_selection(*_split(), [[0.5, 0.5]], [1, 2, 3], criterion="entropy")
