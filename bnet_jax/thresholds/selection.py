"""Choosing exit thresholds for a trained model from its cached outputs.

Thresholds are screened and chosen on the validation split only; the test split
then reports what the chosen vector does. Rules (see `bnet_jax.screening`):

- ``accuracy_drop``: the cheapest vector whose validation accuracy is at least the
  last exit's minus `epsilon`;
- ``budget``: the most accurate vector whose expected cost is at most
  `max_cost_fraction` of the full network's;
- ``risk``: Learn-then-Test risk control: with probability at least 1 - `delta`
  over the validation draw, the accuracy drop relative to the last exit is at most
  `epsilon`. Its candidates come from a fixed, data-independent grid, so that the
  guarantee is not bent by a grid fitted to the same data.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import numpy as np

from bnet_jax import criteria
from bnet_jax.inference import cost
from bnet_jax.thresholds import screening
from bnet_jax.criteria import Criterion
from bnet_jax.training.evaluate import CachedExits

RULES = ("accuracy_drop", "budget", "risk")


def fixed_grid(criterion: Criterion | str, num_classes: int, num: int) -> np.ndarray:
  """Data-independent candidate thresholds for one exit: log-spaced near certainty.

  "Nobody exits" (`Criterion.never_exit`), then `num` values from the criterion's
  most confident score towards its least confident one (`Criterion.span`), spaced
  geometrically so that most lie near certainty, then "everybody exits".

  Returns:
    (num + 2,) thresholds, in the order nobody exits -> everybody exits.
  """
  criterion = criteria.get(criterion)
  most, least = criterion.span(num_classes)
  near = np.geomspace(1e-6, 1.0, num)
  return np.concatenate([[criterion.never_exit], most + near * (least - most),
                         [criterion.always_exit]])


def screen(cached: CachedExits, criterion: Criterion | str, segment_costs: Sequence[float],
           thresholds: np.ndarray) -> screening.ScreenResult:
  """Accuracy, exit fractions and expected FLOPs of every row of `thresholds` (G, E-1)."""
  return screening.evaluate_thresholds(
      cached.scores(criterion), cached.correct(), thresholds, cost.cumulative(segment_costs),
      criterion=criterion)


def candidates(cached: CachedExits, criterion: Criterion | str, rule: str,
               grid_size: int) -> np.ndarray:
  """The (G, E-1) threshold vectors a rule chooses among."""
  num_exits, _, num_classes = cached.logits.shape
  if rule == "risk":
    return screening.cartesian([fixed_grid(criterion, num_classes, grid_size)] * (num_exits - 1))
  return screening.cartesian(screening.grid(cached.scores(criterion), grid_size,
                                            criterion=criterion))


def choose(validation: CachedExits, test: CachedExits, criterion: Criterion | str,
           segment_costs: Sequence[float], *, rule: str = "accuracy_drop",
           epsilon: float = 0.001, delta: float = 0.1, max_cost_fraction: float = 0.5,
           grid_size: int = 60) -> dict:
  """Chooses thresholds on `validation` and reports them on `test`.

  Args:
    validation, test: cached all-exits outputs of the two splits.
    criterion: a `criteria.Criterion`, or a name in `criteria.CRITERIA`.
    segment_costs: (E,) per-sample FLOPs of each exit segment (`cost.segment_flops`).
    rule: one of `RULES`.
    epsilon: tolerated accuracy drop (``accuracy_drop`` and ``risk``).
    delta: failure probability of the ``risk`` guarantee.
    max_cost_fraction: the ``budget`` rule's limit, as a fraction of the cost of
      the full network (every sample at the last exit).
    grid_size: candidate values per exit.

  Returns:
    A JSON-serialisable record: criterion (its name), rule and its parameters, the
    split it was chosen on, the thresholds, and their validation and test figures
    (accuracy, exit fractions, expected FLOPs per sample). Rule ``risk`` adds
    ``certifiable`` (whether a loss-free candidate would be certified with this many
    validation samples; checked before screening, with a warning when not, since every
    candidate then falls back to no early exit) and ``samples_needed`` (validation
    samples that make it so: the test half of the split must hold
    `screening.min_test_samples`).
  """
  criterion = criteria.get(criterion)
  if rule not in RULES:
    raise ValueError(f"Unknown selection rule {rule!r}; known: {RULES}.")
  costs = cost.cumulative(segment_costs)
  scores, correct = validation.scores(criterion), validation.correct()
  grid = candidates(validation, criterion, rule, grid_size)
  risk = {}
  if rule == "risk":
    n = scores.shape[1]
    need = 2 * screening.min_test_samples(epsilon, delta) - 1  # Test half: n - n // 2.
    risk = {"certifiable": n >= need, "samples_needed": need}
    if not risk["certifiable"]:
      warnings.warn(
          f"Rule 'risk' cannot certify any early exit with {n} validation samples at "
          f"epsilon={epsilon}, delta={delta}: even zero losses on the {n - n // 2} test "
          f"samples give p = {screening.min_p_value(n - n // 2, epsilon):.3g} > {delta}. "
          f"It needs {need} samples (or a larger epsilon or delta); the result is the "
          "no-early-exit fallback.", stacklevel=2)
    chosen = screening.select_risk_controlled(scores, correct, grid, costs, epsilon, delta,
                                              criterion=criterion)
  else:
    result = screening.evaluate_thresholds(scores, correct, grid, costs, criterion=criterion)
    if rule == "accuracy_drop":
      chosen = screening.select_accuracy_drop(result, epsilon,
                                              screening.last_exit_accuracy(correct))
    else:
      chosen = screening.select_budget(result, max_cost_fraction * costs[-1])
  on_test = screening.apply_selection(test.scores(criterion), test.correct(),
                                      chosen.thresholds, costs, criterion=criterion)
  return {
      "criterion": criterion.name,
      "rule": rule,
      "params": {"epsilon": epsilon, "delta": delta, "max_cost_fraction": max_cost_fraction,
                 "grid_size": grid_size, **chosen.params},
      "chosen_on": "validation",
      "thresholds": [float(t) for t in chosen.thresholds],
      "certified": chosen.certified,
      **risk,
      "validation": {"accuracy": chosen.accuracy, "expected_flops": chosen.expected_cost,
                     "exit_fractions": [float(f) for f in chosen.exit_fractions],
                     "last_exit_accuracy": screening.last_exit_accuracy(correct)},
      "test": {"accuracy": float(on_test["accuracy"]),
               "expected_flops": float(on_test["expected_cost"]),
               "exit_fractions": [float(f) for f in on_test["exit_fractions"]],
               "last_exit_accuracy": screening.last_exit_accuracy(test.correct())},
  }
