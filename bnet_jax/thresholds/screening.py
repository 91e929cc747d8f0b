"""Threshold screening for early-exit networks: evaluate, choose and certify exit thresholds.

A network with N exits gives, per sample, each exit's confidence score and whether
its prediction is right. A threshold vector t has one threshold per exit except the
last (N-1 values); a sample leaves at the first exit n < N-1 whose criterion passes
and otherwise at the last exit. A `criteria.Criterion` (or its name) says how exit n
passes: ``score < t[n]`` for entropy, ``score > t[n]`` for max_prob and margin; both
comparisons are strict.

`cost[n]` is the cost of running a sample up to and including exit n (cumulative),
so a sample leaving at exit n costs `cost[n]`.

Typical use: screen a grid on the validation split, pick a vector with a rule, then
report that vector's figures on the test split::

  values = grid(val_scores, 60, criterion="entropy")
  result = evaluate_thresholds(val_scores, val_correct, cartesian(values), cost,
                               criterion="entropy")
  chosen = select_accuracy_drop(result, 0.01, last_exit_accuracy(val_correct))
  test = apply_selection(test_scores, test_correct, chosen.thresholds, cost,
                         criterion="entropy")

Computes with numpy (and scipy for the binomial tail) only: the criterion's score
function is not called here.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence

import numpy as np
from numpy.typing import ArrayLike
from scipy import special, stats

from bnet_jax import criteria, progress
from bnet_jax.criteria import Criterion

# Most (threshold rows x samples) booleans held at once; bounds the working memory of
# `evaluate_thresholds` to a few tens of MB whatever the grid and split sizes.
CHUNK_ELEMENTS = 1 << 21

# Absolute slack on the accuracy and cost limits of the selection rules, so that a
# limit met exactly (say accuracy 0.89 against 0.90 - 0.01) is not lost to rounding.
_SLACK = 1e-12


@dataclasses.dataclass(frozen=True, eq=False)
class ScreenResult:
  """Figures of G threshold vectors on one split.

  Attributes:
    thresholds: (G, N-1) the vectors, one threshold per exit except the last.
    accuracy: (G,) fraction of samples whose prediction at their exit is right.
    exit_fractions: (G, N) fraction of samples leaving at each exit; rows sum to 1.
    expected_cost: (G,) mean over samples of the cost at their exit.
  """

  thresholds: np.ndarray
  accuracy: np.ndarray
  exit_fractions: np.ndarray
  expected_cost: np.ndarray


@dataclasses.dataclass(frozen=True, eq=False)
class Selection:
  """One threshold vector chosen by a rule, with its figures on the split it was chosen on.

  Attributes:
    rule: the rule's name, e.g. "accuracy_drop".
    params: the rule's parameters and diagnostics (JSON-serialisable values).
    index: row of the screened grid, or None for the no-early-exit fallback of
      `select_risk_controlled`.
    thresholds: (N-1,) the chosen vector.
    accuracy: its accuracy on the selection split.
    expected_cost: its expected cost on the selection split.
    exit_fractions: (N,) its exit fractions on the selection split.
    certified: for `select_risk_controlled`, whether the risk bound was certified
      for this vector (False: the no-early-exit fallback); None for other rules.
  """

  rule: str
  params: dict
  index: int | None
  thresholds: np.ndarray
  accuracy: float
  expected_cost: float
  exit_fractions: np.ndarray
  certified: bool | None = None

  def to_dict(self) -> dict:
    """Plain Python values for `json.dump`.

    Infinite thresholds (e.g. the no-early-exit vector of max_prob, +inf)
    stay floats, which `json.dumps` writes as ``Infinity`` and `json.loads` reads back.
    """
    return {
        "rule": self.rule,
        "params": dict(self.params),
        "index": self.index,
        "thresholds": [float(t) for t in self.thresholds],
        "accuracy": float(self.accuracy),
        "expected_cost": float(self.expected_cost),
        "exit_fractions": [float(f) for f in self.exit_fractions],
        "certified": self.certified,
    }


# ----------------------------------------------------------------------------------
# Input checks.


def _check_split(scores: ArrayLike, correct: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
  """(N, S) float64 scores and (N, S) bool correctness, checked against each other."""
  scores = np.asarray(scores, dtype=np.float64)
  if scores.ndim != 2 or scores.shape[0] < 2 or scores.shape[1] < 1:
    raise ValueError(f"scores must have shape (N_exits, S) with N_exits >= 2 and S >= 1; "
                     f"got shape {scores.shape}. Stack one row of scores per exit.")
  if np.isnan(scores).any():
    raise ValueError("scores contain NaN; check the logits that produced them.")
  correct = np.asarray(correct)
  if correct.shape != scores.shape:
    raise ValueError(f"correct has shape {correct.shape} but scores has shape {scores.shape}; "
                     "give one correctness flag per exit and sample.")
  if correct.dtype != bool:
    if not np.isin(correct, (0, 1)).all():
      raise ValueError("correct must be boolean (or 0/1): whether each exit's prediction "
                       "equals the label.")
    correct = correct.astype(bool)
  return scores, correct


def _check_thresholds(thresholds: ArrayLike, n_exits: int, criterion: Criterion) -> np.ndarray:
  """(G, N-1) float64 threshold vectors; a single (N-1,) vector becomes G = 1."""
  thresholds = np.asarray(thresholds, dtype=np.float64)
  if thresholds.ndim == 1:
    thresholds = thresholds[None, :]
  if thresholds.ndim != 2 or thresholds.shape[1] != n_exits - 1:
    raise ValueError(
        f"thresholds have shape {thresholds.shape} but the scores have {n_exits} exits: give "
        f"{n_exits - 1} thresholds per vector (one per exit except the last), as shape "
        f"({n_exits - 1},) or (G, {n_exits - 1}).")
  if thresholds.shape[0] == 0:
    raise ValueError("thresholds hold no vectors; build a grid with `grid` and `cartesian`.")
  if np.isnan(thresholds).any():
    raise ValueError("thresholds contain NaN; every threshold must be a number (use +-inf "
                     "for 'everybody exits' or 'nobody exits').")
  criterion.check(thresholds)
  return thresholds


def _check_cost(cost: ArrayLike, n_exits: int) -> np.ndarray:
  """(N,) float64 cumulative cost per exit."""
  cost = np.asarray(cost, dtype=np.float64)
  if cost.shape != (n_exits,):
    raise ValueError(f"cost has shape {cost.shape} but the scores have {n_exits} exits: give "
                     f"one cumulative cost per exit, shape ({n_exits},).")
  if not np.isfinite(cost).all():
    raise ValueError("cost must be finite.")
  return cost


def _check_open_unit(name: str, value: float) -> float:
  """`value` as a float, which must lie strictly between 0 and 1."""
  value = float(value)
  if not 0.0 < value < 1.0:
    raise ValueError(f"{name} must lie strictly between 0 and 1; got {value}.")
  return value


# ----------------------------------------------------------------------------------
# Evaluation.


def _cumsum0(mask: np.ndarray) -> np.ndarray:
  """Counts of True in each row's first k entries, for k = 0..S: (p, S) -> (p, S+1)."""
  out = np.zeros((mask.shape[0], mask.shape[1] + 1), np.int32)
  np.cumsum(mask, axis=1, dtype=np.int32, out=out[:, 1:])
  return out


def _prefix_exits(scores: np.ndarray, correct: np.ndarray, prefixes: np.ndarray,
                  criterion: Criterion) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Who leaves at each of the first m exits under p threshold prefixes.

  Args:
    scores: (m, S) scores of the first m exits.
    correct: (m, S) their correctness.
    prefixes: (p, m) thresholds of the first m exits.
    criterion: which way the scores are compared with the thresholds.

  Returns:
    still: (p, S) whether each sample is still in after exit m-1;
    counts: (p, m) how many leave at each exit;
    right: (p,) how many of those leavers are right.
  """
  p, m = prefixes.shape
  still = np.ones((p, scores.shape[1]), bool)
  counts = np.zeros((p, m), np.int64)
  right = np.zeros(p, np.int64)
  for n in range(m):
    t = prefixes[:, n, None]
    leave = still & criterion.exits(scores[n], t)
    counts[:, n] = np.count_nonzero(leave, axis=1)
    right += np.count_nonzero(leave & correct[n], axis=1)
    still &= ~leave
  return still, counts, right


def _exit_counts(scores: np.ndarray, correct: np.ndarray, thresholds: np.ndarray,
                 criterion: Criterion) -> tuple[np.ndarray, np.ndarray]:
  """Exact integer counts behind `evaluate_thresholds` (inputs already checked).

  The last thresholded exit ("pivot", N-2) is done by sorting instead of masks: with
  the samples ordered by pivot score, the leavers at the pivot are a contiguous run, so
  one cumulative count per distinct prefix t[:N-2] serves every pivot threshold through
  a binary search. The cost is O(P*S*N + (S + G)*log S) for P distinct prefixes; a cartesian
  grid has P = G / len(pivot values), and 2 exits have P = 1.

  Returns:
    counts: (G, N) int64, how many samples leave at each exit;
    right: (G,) int64, how many samples are right at their exit.
  """
  n_exits, n_samples = scores.shape
  pivot = n_exits - 2
  order = np.argsort(scores[pivot], kind="stable")
  scores, correct = scores[:, order], correct[:, order]

  # Sorted ascending: `score < t` holds on [0, k_left), `score > t` on [k_right, S).
  t_pivot = thresholds[:, pivot]
  split = np.searchsorted(scores[pivot], t_pivot, side="left" if criterion.exits_below else "right")

  if pivot:
    prefixes, group = np.unique(thresholds[:, :pivot], axis=0, return_inverse=True)
    group = group.reshape(-1)
  else:
    prefixes, group = np.zeros((1, 0)), np.zeros(len(thresholds), np.int64)
  by_group = np.argsort(group, kind="stable")
  group_start = np.searchsorted(group[by_group], np.arange(len(prefixes) + 1))

  counts = np.zeros((len(thresholds), n_exits), np.int64)
  right = np.zeros(len(thresholds), np.int64)
  rows = max(1, CHUNK_ELEMENTS // n_samples)
  chunks = range(0, len(prefixes), rows)
  for g0 in progress.bar(chunks, desc="screening", unit="chunk", leave=False, min_total=2):
    g1 = min(g0 + rows, len(prefixes))
    still, prefix_counts, prefix_right = _prefix_exits(
        scores[:pivot], correct[:pivot], prefixes[g0:g1], criterion)
    vecs = by_group[group_start[g0]:group_start[g1]]
    local, k = group[vecs] - g0, split[vecs]
    # For each vector: (still-in samples before the split, those after it), per statistic.
    halves = []
    for mask in (still, still & correct[pivot], still & correct[-1]):
      cum = _cumsum0(mask)
      below = cum[local, k]
      halves.append((below, cum[local, -1] - below))
    (in_lo, in_hi), (pivot_right_lo, pivot_right_hi), (last_right_lo, last_right_hi) = halves
    if criterion.exits_below:  # leave at the pivot below the split, stay to the last above
      leave, pivot_right, stay, last_right = in_lo, pivot_right_lo, in_hi, last_right_hi
    else:
      leave, pivot_right, stay, last_right = in_hi, pivot_right_hi, in_lo, last_right_lo
    counts[vecs, :pivot] = prefix_counts[local]
    counts[vecs, pivot] = leave
    counts[vecs, -1] = stay
    right[vecs] = prefix_right[local] + pivot_right + last_right
  return counts, right


def _figures(scores: np.ndarray, correct: np.ndarray, thresholds: np.ndarray, cost: np.ndarray,
             criterion: Criterion) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """(accuracy, exit_fractions, expected_cost) of checked inputs, as in `ScreenResult`."""
  counts, right = _exit_counts(scores, correct, thresholds, criterion)
  n_samples = scores.shape[1]
  return right / n_samples, counts / n_samples, (counts @ cost) / n_samples


def evaluate_thresholds(scores: ArrayLike, correct: ArrayLike, thresholds: ArrayLike,
                        cost: ArrayLike, *, criterion: Criterion | str) -> ScreenResult:
  """Accuracy, exit fractions and expected cost of every threshold vector of a grid.

  Exact (integer counts), vectorised and memory-bounded: the grid is processed in
  chunks so that no working array holds more than about `CHUNK_ELEMENTS` entries
  (or S, if larger). See `_exit_counts` for the method.

  Args:
    scores: (N, S) confidence score of each exit for each sample.
    correct: (N, S) bool, whether each exit's prediction is right.
    thresholds: (G, N-1) threshold vectors, or one (N-1,) vector (then G = 1).
    cost: (N,) cumulative cost up to and including each exit.
    criterion: the `criteria.Criterion` (or its name) the scores are of: which way
      they are compared and which thresholds make sense.

  Returns:
    `ScreenResult` with arrays of G rows.
  """
  criterion = criteria.get(criterion)
  scores, correct = _check_split(scores, correct)
  n_exits = scores.shape[0]
  thresholds = _check_thresholds(thresholds, n_exits, criterion)
  cost = _check_cost(cost, n_exits)
  return ScreenResult(thresholds, *_figures(scores, correct, thresholds, cost, criterion))


def apply_selection(scores: ArrayLike, correct: ArrayLike, thresholds: ArrayLike,
                    cost: ArrayLike, *, criterion: Criterion | str) -> dict:
  """Figures of one threshold vector on another split (typically the test split).

  Args:
    scores: (N, S) scores of that split.
    correct: (N, S) its correctness.
    thresholds: (N-1,) the vector, e.g. `Selection.thresholds`.
    cost: (N,) cumulative cost per exit.
    criterion: the criterion (or its name) the scores are of.

  Returns:
    ``{"accuracy": float, "expected_cost": float, "exit_fractions": [N floats]}``.
  """
  if np.ndim(thresholds) != 1:
    raise ValueError(f"apply_selection takes one threshold vector, shape (N_exits-1,); got "
                     f"shape {np.shape(thresholds)}. Use evaluate_thresholds for a grid.")
  result = evaluate_thresholds(scores, correct, thresholds, cost, criterion=criterion)
  return {"accuracy": float(result.accuracy[0]),
          "expected_cost": float(result.expected_cost[0]),
          "exit_fractions": [float(f) for f in result.exit_fractions[0]]}


def last_exit_accuracy(correct: ArrayLike) -> float:
  """Accuracy of the last exit alone: (N, S) correctness -> float."""
  correct = np.asarray(correct)
  if correct.ndim != 2:
    raise ValueError(f"correct must have shape (N_exits, S); got shape {correct.shape}.")
  return float(np.mean(correct[-1]))


# ----------------------------------------------------------------------------------
# Grids and the Pareto frontier.


def _never_exit(n_thresholds: int, criterion: Criterion) -> np.ndarray:
  """(N-1,) thresholds that no score can pass on any data: nobody exits early."""
  return np.full(n_thresholds, criterion.never_exit)


def grid(scores: ArrayLike, num: int = 50, *, criterion: Criterion | str) -> list[np.ndarray]:
  """Candidate thresholds for each early exit: quantiles of its scores plus the extremes.

  Each exit's values are `num` evenly spaced quantiles (from the minimum to the
  maximum) of its scores, plus the data-independent extremes "nobody exits"
  (`Criterion.never_exit`: 0 for entropy, +inf for max_prob) and "everybody exits"
  (`Criterion.always_exit`), sorted and deduplicated.

  Args:
    scores: (N, S) scores; the last row is not used (the last exit has no threshold).
    num: quantile levels per exit, >= 2.
    criterion: the criterion (or its name) the scores are of.

  Returns:
    N-1 one-dimensional arrays, at most num + 2 values each; combine with `cartesian`.
  """
  scores = np.asarray(scores, dtype=np.float64)
  if scores.ndim != 2 or scores.shape[0] < 2 or scores.shape[1] < 1:
    raise ValueError(f"scores must have shape (N_exits, S) with N_exits >= 2; got {scores.shape}.")
  if np.isnan(scores).any():
    raise ValueError("scores contain NaN; check the logits that produced them.")
  if int(num) != num or num < 2:
    raise ValueError(f"num must be an integer >= 2; got {num}.")
  criterion = criteria.get(criterion)
  levels = np.linspace(0.0, 1.0, int(num))
  extremes = [criterion.never_exit, criterion.always_exit]
  # Rounding must not put a quantile beyond `never_exit` (a negative entropy, say).
  clip = np.maximum if criterion.exits_below else np.minimum
  values = []
  for row in scores[:-1]:
    quantiles = clip(np.quantile(row, levels), criterion.never_exit)
    values.append(np.unique(np.concatenate([extremes, quantiles])))
  return values


def cartesian(values_per_exit: Sequence[ArrayLike]) -> np.ndarray:
  """Every combination of per-exit values: N-1 arrays of sizes V_n -> (prod V_n, N-1).

  The first exit's value varies slowest (row-major order).
  """
  values = [np.asarray(v, dtype=np.float64) for v in values_per_exit]
  if not values or any(v.ndim != 1 or v.size == 0 for v in values):
    raise ValueError("values_per_exit must be a non-empty sequence of non-empty 1-D arrays, "
                     "one per exit except the last.")
  mesh = np.meshgrid(*values, indexing="ij")
  return np.stack(mesh, axis=-1).reshape(-1, len(values))


def pareto_frontier(result: ScreenResult) -> np.ndarray:
  """Indices of the non-dominated vectors, sorted by expected cost ascending.

  A vector is dominated when another costs no more and is at least as accurate, and
  is strictly better in one of the two. Vectors with identical (cost, accuracy) are
  one point: the one with the smallest index represents it. Along the returned
  indices both cost and accuracy strictly increase.

  Returns:
    (F,) int64 indices into `result`'s rows.
  """
  cost, accuracy = result.expected_cost, result.accuracy
  # Cheapest first; at equal cost the most accurate first, then the smallest index.
  order = np.lexsort((np.arange(len(cost)), -accuracy, cost))
  best_before = np.maximum.accumulate(np.concatenate([[-np.inf], accuracy[order][:-1]]))
  return order[accuracy[order] > best_before]


# ----------------------------------------------------------------------------------
# Selection rules.


def _selection(result: ScreenResult, index: int, rule: str, params: dict) -> Selection:
  return Selection(rule=rule, params=params, index=int(index),
                   thresholds=result.thresholds[index].copy(),
                   accuracy=float(result.accuracy[index]),
                   expected_cost=float(result.expected_cost[index]),
                   exit_fractions=result.exit_fractions[index].copy())


def select_accuracy_drop(result: ScreenResult, epsilon: float,
                         reference_accuracy: float) -> Selection:
  """The cheapest vector whose accuracy is >= reference_accuracy - epsilon.

  Ties in cost go to the more accurate vector, then to the smaller index.

  Args:
    result: the screened grid (validation split).
    epsilon: allowed accuracy drop, in [0, 1).
    reference_accuracy: usually `last_exit_accuracy(correct)` on the same split.
  """
  epsilon = float(epsilon)
  if not 0.0 <= epsilon < 1.0:
    raise ValueError(f"epsilon must lie in [0, 1); got {epsilon}.")
  floor = float(reference_accuracy) - epsilon
  feasible = np.flatnonzero(result.accuracy >= floor - _SLACK)
  if not feasible.size:
    raise ValueError(
        f"no vector reaches accuracy {floor:.6f} (best: {result.accuracy.max():.6f}); include "
        "the no-early-exit vector in the grid (`grid` does) or raise epsilon.")
  best = feasible[np.lexsort((-result.accuracy[feasible], result.expected_cost[feasible]))[0]]
  return _selection(result, best, "accuracy_drop",
                    {"epsilon": epsilon, "reference_accuracy": float(reference_accuracy)})


def select_budget(result: ScreenResult, max_cost: float) -> Selection:
  """The most accurate vector with expected_cost <= max_cost.

  Ties in accuracy go to the cheaper vector, then to the smaller index.

  Args:
    result: the screened grid (validation split).
    max_cost: the budget, in the units of `cost`.
  """
  max_cost = float(max_cost)
  if not math.isfinite(max_cost):
    raise ValueError(f"max_cost must be finite; got {max_cost}.")
  feasible = np.flatnonzero(result.expected_cost <= max_cost + _SLACK * max(1.0, abs(max_cost)))
  if not feasible.size:
    raise ValueError(f"no vector costs <= {max_cost} (cheapest: {result.expected_cost.min()}); "
                     "raise max_cost or include the everybody-exits vector in the grid.")
  best = feasible[np.lexsort((result.expected_cost[feasible], -result.accuracy[feasible]))[0]]
  return _selection(result, best, "budget", {"max_cost": max_cost})


def binomial_p_values(losses: np.ndarray, n: int, epsilon: float) -> np.ndarray:
  """Exact p-values of H: E[loss] > epsilon for 0/1 losses: P(Binom(n, eps) <= losses)."""
  return stats.binom.cdf(losses, n, epsilon)


def hb_p_values(losses: np.ndarray, n: int, epsilon: float) -> np.ndarray:
  """Hoeffding-Bentkus p-values of H: E[loss] > epsilon (LTT paper, Prop. 3.2).

  ``min(exp(-n h(min(r, eps), eps)), e * P(Binom(n, eps) <= ceil(n r)))`` with r the
  mean loss and ``h(a, b) = a log(a/b) + (1-a) log((1-a)/(1-b))``; n r = losses is
  already an integer.
  """
  mean = np.minimum(losses / n, epsilon)
  h = special.xlogy(mean, mean / epsilon) + special.xlogy(1 - mean, (1 - mean) / (1 - epsilon))
  return np.minimum(np.exp(-n * h), math.e * stats.binom.cdf(losses, n, epsilon))


P_VALUES: dict[str, Callable[[np.ndarray, int, float], np.ndarray]] = {
    "binomial": binomial_p_values,
    "hb": hb_p_values,
}


def min_p_value(n_test: int, epsilon: float, method: str = "binomial") -> float:
  """The smallest p-value any candidate can get from `n_test` test samples: zero losses.

  Both methods give ``(1 - epsilon) ** n_test`` there (Hoeffding-Bentkus: the minimum
  of that and e times it), so no candidate is certified at ``delta`` below it.
  """
  return float(P_VALUES[method](np.zeros(1), int(n_test), _check_open_unit("epsilon", epsilon))[0])


def min_test_samples(epsilon: float, delta: float, method: str = "binomial") -> int:
  """The fewest test samples at which a loss-free candidate is certified: p <= delta.

  E.g. epsilon 0.001, delta 0.1: 2,302 (``ceil(log delta / log(1 - epsilon))``), so
  `select_risk_controlled` with its default split needs 4,603 calibration samples.
  """
  epsilon, delta = _check_open_unit("epsilon", epsilon), _check_open_unit("delta", delta)
  n = max(1, math.ceil(math.log(delta) / math.log1p(-epsilon)))
  while n > 1 and min_p_value(n - 1, epsilon, method) <= delta:  # Rounding, either way.
    n -= 1
  while min_p_value(n, epsilon, method) > delta:
    n += 1
  return n


def _no_loss(correct: np.ndarray) -> np.ndarray:
  """(N, S) relabelling under which "wrong at its exit" means "a loss" (see below).

  A sample is a loss when the last exit is right and its exit is wrong; the last
  exit's wrong samples can never be losses, wherever they leave.
  """
  return correct | ~correct[-1]


def _loss_counts(scores: np.ndarray, correct: np.ndarray, thresholds: np.ndarray,
                 criterion: Criterion) -> np.ndarray:
  """(G,) number of samples with the last exit right and the cascade wrong."""
  _, right = _exit_counts(scores, _no_loss(correct), thresholds, criterion)
  return scores.shape[1] - right


def select_risk_controlled(scores: ArrayLike, correct: ArrayLike, thresholds: ArrayLike,
                           cost: ArrayLike, epsilon: float, delta: float, *,
                           criterion: Criterion | str, method: str = "binomial",
                           ordering: ArrayLike | None = None, seed: int = 0) -> Selection:
  """The cheapest vector certified by Learn-then-Test to lose at most epsilon accuracy.

  Learn-then-Test (Angelopoulos, Bates, Candes, Jordan, Lei 2021) with fixed-sequence
  testing. The per-sample loss of a vector is ``l = 1[last exit right and cascade
  wrong]``; its mean upper-bounds the accuracy drop relative to the last exit,
  ``acc(last) - acc(cascade) = P(last right, cascade wrong) - P(last wrong, cascade
  right)``. For each candidate the null hypothesis ``E[l] > epsilon`` is tested with
  a p-value from the n test samples (losses k): "binomial" ``P(Binom(n, eps) <= k)``
  (exact for 0/1 losses) or "hb" Hoeffding-Bentkus (valid for any [0, 1] loss, more
  conservative). Candidates are tested in order, most expensive first; hypotheses
  are rejected while ``p <= delta``, and the walk stops at the first failure. The
  last rejected (cheapest certified) vector is returned.

  Ordering. With `ordering` None, the calibration samples are split in two halves by
  a permutation drawn with `seed`: the candidates are evaluated on the first half,
  restricted to its Pareto frontier of (expected cost, mean loss) - both low is good -
  and ordered by its expected cost, descending (so by mean loss, ascending); the
  tests use the second half only. The (cost, accuracy) frontier would be a poorer
  order: where early exits beat the last exit on confident samples, its most
  expensive point already exits many samples early and may carry a large loss,
  which stops the walk at once. A given `ordering` (indices into `thresholds`,
  most expensive first) must not depend on this calibration data; then every
  sample is used for the tests.

  Guarantee. If the calibration samples are i.i.d. from the distribution of future
  data, and the candidate vectors (and a given ordering) do not depend on the
  samples used for testing, then with probability at least 1 - delta over the draw
  of the calibration set the returned vector's expected loss E[l] is <= epsilon, so
  its true accuracy drop relative to the last exit (over that distribution, not on
  any finite test split) is <= epsilon. A grid built with `grid` from these same
  calibration scores breaks that premise slightly; build it from other data or from
  fixed values when the guarantee matters. If no candidate is certified, the
  no-early-exit vector (loss 0 on every sample, so it trivially keeps the promise)
  is returned with ``certified=False``.

  Args:
    scores: (N, S) calibration scores.
    correct: (N, S) calibration correctness.
    thresholds: (G, N-1) candidate vectors (a grid or a Pareto frontier).
    cost: (N,) cumulative cost per exit.
    epsilon: allowed accuracy drop, in (0, 1).
    delta: allowed probability of failure, in (0, 1).
    criterion: the criterion (or its name) the scores are of.
    method: "binomial" or "hb".
    ordering: (K,) candidate indices to test in this order, most expensive first.
    seed: seed of the calibration split when `ordering` is None.

  Returns:
    `Selection` with figures on the whole calibration set; `params` records the
    p-value of the returned vector, the number of candidates tested and rejected,
    and the sizes of the two halves.
  """
  criterion = criteria.get(criterion)
  scores, correct = _check_split(scores, correct)
  n_exits, n_samples = scores.shape
  thresholds = _check_thresholds(thresholds, n_exits, criterion)
  cost = _check_cost(cost, n_exits)
  epsilon = _check_open_unit("epsilon", epsilon)
  delta = _check_open_unit("delta", delta)
  if method not in P_VALUES:
    raise ValueError(f"Unknown method {method!r}; known: {sorted(P_VALUES)}.")

  if ordering is None:
    if n_samples < 2:
      raise ValueError("need at least 2 calibration samples to split them in two halves.")
    permutation = np.random.default_rng(seed).permutation(n_samples)
    order_half, test_half = permutation[:n_samples // 2], permutation[n_samples // 2:]
    # The frontier of (cost, loss) rather than (cost, accuracy): the walk then goes from
    # the no-loss end towards growing loss, which the fixed sequence needs to get far.
    # Mean loss = 1 - "accuracy" under the relabelling `_no_loss`.
    screened = ScreenResult(thresholds, *_figures(scores[:, order_half],
                                                  _no_loss(correct[:, order_half]), thresholds,
                                                  cost, criterion))
    ordering = pareto_frontier(screened)[::-1]
    split = {"ordering": "split", "seed": int(seed), "n_order": int(len(order_half))}
  else:
    ordering = np.asarray(ordering)
    if (ordering.ndim != 1 or not np.issubdtype(ordering.dtype, np.integer) or not ordering.size
        or ordering.min() < 0 or ordering.max() >= len(thresholds)):
      raise ValueError(f"ordering must be a non-empty 1-D array of indices into the "
                       f"{len(thresholds)} candidate vectors.")
    test_half = np.arange(n_samples)
    split = {"ordering": "given", "n_order": 0}

  losses = _loss_counts(scores[:, test_half], correct[:, test_half], thresholds[ordering],
                        criterion)
  p_values = P_VALUES[method](losses, len(test_half), epsilon)
  failures = np.flatnonzero(p_values > delta)
  num_rejected = int(failures[0]) if failures.size else len(ordering)

  certified = num_rejected > 0
  if certified:
    index = int(ordering[num_rejected - 1])
    chosen, p_value = thresholds[index], float(p_values[num_rejected - 1])
  else:
    index, chosen, p_value = None, _never_exit(n_exits - 1, criterion), None
  accuracy, fractions, expected_cost = _figures(scores, correct, chosen[None], cost, criterion)
  params = {"epsilon": epsilon, "delta": delta, "method": method, **split,
            "n_test": int(len(test_half)), "num_candidates": int(len(ordering)),
            "num_rejected": num_rejected, "p_value": p_value}
  return Selection(rule="risk_controlled", params=params, index=index, thresholds=chosen.copy(),
                   accuracy=float(accuracy[0]), expected_cost=float(expected_cost[0]),
                   exit_fractions=fractions[0], certified=certified)

