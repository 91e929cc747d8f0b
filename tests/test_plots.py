"""Figures from synthetic cached exits: one panel per exit, saved without a display."""

import matplotlib
import numpy as np
import pytest

from bnet_jax import cascade, criteria, plots, screening, selection
from bnet_jax.evaluate import CachedExits

pytestmark = pytest.mark.newest


@pytest.fixture
def cached():
  rng = np.random.default_rng(0)
  labels = rng.integers(0, 10, 300).astype(np.int32)
  logits = rng.normal(size=(3, 300, 10)).astype(np.float32)
  logits[np.arange(3)[:, None], np.arange(300)[None], labels[None]] += np.array([[1.], [2.], [4.]])
  return CachedExits(logits, labels)


def test_figures_never_touch_the_pyplot_backend(cached, tmp_path):
  backend = matplotlib.get_backend()
  fig = plots.score_histograms(cached)
  assert len(fig.axes) == 3
  assert [ax.get_title().split(":")[0] for ax in fig.axes] == ["exit 1", "exit 2", "exit 3"]
  fig.savefig(tmp_path / "h.png")
  assert (tmp_path / "h.png").stat().st_size > 5_000
  assert matplotlib.get_backend() == backend


def test_confusion_matrices_count_every_sample(cached):
  fig = plots.confusion_matrices(cached)
  right = (np.argmax(cached.logits, -1) == cached.labels).sum(axis=1)
  assert [ax.get_title() for ax in fig.axes] == [f"exit {k + 1}: {r}/300 right"
                                                  for k, r in enumerate(right)]


def test_exit_examples_titles_show_exit_and_prediction():
  images = np.zeros((5, 28, 28, 1), np.uint8)
  pred = cascade.Prediction(np.array([1, 2, 3, 4, 5]), np.array([0, 0, 1, 1, 1]), np.zeros(5))
  fig = plots.exit_examples(images, np.array([1, 2, 3, 4, 0]), pred, columns=4)
  titles = [ax.get_title() for ax in fig.axes if ax.get_title()]
  assert titles == ["exit 1: 1", "exit 1: 2", "exit 2: 3", "exit 2: 4", "exit 2: 5"]
  wrong = [ax for ax in fig.axes if ax.get_title() == "exit 2: 5"][0]
  assert matplotlib.colors.to_hex(wrong.title.get_color()) == matplotlib.colors.to_hex("tab:red")


def test_accuracy_vs_cost_and_threshold_sweep(cached, tmp_path):
  costs = [1.0, 2.0, 3.0]
  grid = selection.candidates(cached, "entropy", "accuracy_drop", 10)
  result = selection.screen(cached, "entropy", costs, grid)
  fig = plots.accuracy_vs_cost(result, 6.0, 0.9, [], None)
  assert len(fig.axes) == 1 and not list(tmp_path.iterdir())
  grid_result = screening.ScreenResult(np.zeros((3, 2)), np.array([0.80, 0.85, 0.90]),
                                       np.full((3, 3), 1 / 3), np.array([2.0, 3.0, 6.0]))
  above = {"label": "test", "cost": 3.0, "accuracy": 0.95}  # Test beats every validation point.
  fig = plots.accuracy_vs_cost(grid_result, 6.0, 0.9, [above], str(tmp_path / "a.png"))
  assert fig.axes[0].get_ylim()[1] > 95  # Not clipped off the top.
  assert (tmp_path / "a.png").exists()
  values = np.array([0.0, 0.1, 1.0, np.inf])
  vectors = np.stack([values, np.full(4, 0.5)], axis=1)
  fig = plots.threshold_sweep(values, selection.screen(cached, "entropy", costs, vectors), 6.0,
                              chosen=0.1)
  top, bottom = fig.axes
  assert len(top.lines[0].get_xdata()) == 2  # 0 and inf cannot sit on a log axis.
  assert len(bottom.get_legend().get_texts()) == 4  # Three exits and the cost.
  assert bottom.get_xscale() == "log" and bottom.get_xlabel() == "entropy threshold of exit 1"


def test_threshold_sweep_is_linear_for_scores_not_bounded_below_by_zero(cached):
  values = np.array([np.inf, 0.9, 0.5, -0.2, -np.inf])  # Negative scores on a linear axis.
  vectors = np.stack([values, np.full(5, 0.5)], axis=1)
  result = selection.screen(cached, criteria.MAX_PROB, [1.0, 2.0, 3.0], vectors)
  top, bottom = plots.threshold_sweep(values, result, 6.0, criteria.MAX_PROB).axes
  assert bottom.get_xscale() == "linear" and len(top.lines[0].get_xdata()) == 3
  assert bottom.get_xlabel() == "max_prob threshold of exit 1"
