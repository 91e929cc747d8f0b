"""Figures: accuracy against inference cost as in the paper's screening plots, and
the notebooks' views of a trained model (score histograms, confusion, exits taken).

Figures are built with matplotlib's object API, never pyplot: nothing here touches
the global backend, so the same code saves files on a server and displays inline
in a notebook (each function returns its `Figure`).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from matplotlib.figure import Figure

from bnet_jax import criteria
from bnet_jax.thresholds import screening
from bnet_jax.inference.cascade import Prediction
from bnet_jax.criteria import Criterion
from bnet_jax.training.evaluate import CachedExits


def accuracy_vs_cost(result: screening.ScreenResult, full_cost: float, baseline_accuracy: float,
                     points: Sequence[dict], path: str | None, title: str = "") -> Figure:
  """The validation grid, its Pareto frontier and labelled points; saved to `path` (PNG).

  Args:
    result: the screened validation grid.
    full_cost: per-sample FLOPs of the full network (costs are shown relative to it).
    baseline_accuracy: validation accuracy of the last exit alone.
    points: dicts with ``label``, ``cost`` (FLOPs), ``accuracy`` and optionally
      ``marker`` — e.g. the chosen thresholds on validation and on test.
    path: output file, or None to only return the figure.
    title: figure title.

  Returns:
    The figure.
  """
  rel = result.expected_cost / full_cost
  frontier = screening.pareto_frontier(result)
  fig = Figure(figsize=(6.4, 4.4), dpi=120)
  ax = fig.subplots()
  ax.scatter(rel, 100 * result.accuracy, s=6, c="0.75", label="screened thresholds (validation)")
  ax.plot(rel[frontier], 100 * result.accuracy[frontier], "-", c="tab:blue", lw=1.5,
          label="Pareto frontier (validation)")
  ax.axhline(100 * baseline_accuracy, c="0.4", ls=":", lw=1, label="last exit alone (validation)")
  for p in points:
    ax.plot(p["cost"] / full_cost, 100 * p["accuracy"], p.get("marker", "o"), ms=8,
            label=p["label"])
  ax.set_xlabel("expected FLOPs per sample / full network")
  ax.set_ylabel("accuracy (%)")
  lo = np.percentile(100 * result.accuracy[frontier], 5)
  hi = max(result.accuracy.max(), baseline_accuracy, *(p["accuracy"] for p in points))
  ax.set_ylim(max(lo - 0.5, 0), min(100 * hi + 0.3, 100))  # Test points may beat validation.
  ax.set_xlim(0, 1.05)
  ax.grid(alpha=0.3)
  ax.legend(fontsize=7, loc="lower right")
  if title:
    ax.set_title(title, fontsize=9)
  fig.tight_layout()
  if path:
    fig.savefig(path)
  return fig


def score_histograms(cached: CachedExits, criterion: Criterion | str = "entropy",
                     bins: int = 40) -> Figure:
  """Per exit, the histogram of the criterion score of right and of wrong predictions.

  The paper's argument in one picture: at an early exit the confident samples
  (low entropy) are almost all right, so a threshold can let them leave.

  Args:
    cached: a split's cached all-exits outputs.
    criterion: a `criteria.Criterion`, or a name in `criteria.CRITERIA`.
    bins: bins per exit, shared by its right and wrong samples.

  Returns:
    One panel per exit, counts on a log scale.
  """
  criterion = criteria.get(criterion)
  scores, correct = cached.scores(criterion), cached.correct()
  num_exits = scores.shape[0]
  fig = Figure(figsize=(3.4 * num_exits, 2.9), dpi=100)
  axes = fig.subplots(1, num_exits, squeeze=False)[0]
  for k, ax in enumerate(axes):
    edges = np.histogram_bin_edges(scores[k], bins)
    ax.hist(scores[k][correct[k]], bins=edges, color="tab:blue", alpha=0.6,
            label=f"right ({np.count_nonzero(correct[k])})")
    ax.hist(scores[k][~correct[k]], bins=edges, color="tab:red", alpha=0.6,
            label=f"wrong ({np.count_nonzero(~correct[k])})")
    ax.set_yscale("log")
    ax.set_xlabel(criterion.name)
    ax.set_title(f"exit {k + 1}: accuracy {100 * np.mean(correct[k]):.2f}%", fontsize=9)
    ax.legend(fontsize=7)
  axes[0].set_ylabel("samples")
  fig.tight_layout()
  return fig


def confusion_matrices(cached: CachedExits, class_names: Sequence[str] | None = None) -> Figure:
  """Per exit, the confusion matrix of its predictions on every sample of the split.

  Rows are true classes, columns predicted ones; colour is the row-normalised rate
  and off-diagonal cells show their counts.

  Args:
    cached: a split's cached all-exits outputs.
    class_names: tick labels (default: class indices).

  Returns:
    One panel per exit.
  """
  num_exits, _, num_classes = cached.logits.shape
  predicted = np.argmax(cached.logits, -1)
  names = list(class_names) if class_names is not None else [str(c) for c in range(num_classes)]
  fig = Figure(figsize=(3.6 * num_exits, 3.5), dpi=100)
  axes = fig.subplots(1, num_exits, squeeze=False)[0]
  for k, ax in enumerate(axes):
    counts = np.zeros((num_classes, num_classes), np.int64)
    np.add.at(counts, (cached.labels, predicted[k]), 1)
    rates = counts / np.maximum(counts.sum(axis=1, keepdims=True), 1)
    ax.imshow(rates, cmap="Blues", vmin=0, vmax=1)
    for i, j in zip(*np.nonzero(counts)):
      if i != j:
        ax.text(j, i, str(counts[i, j]), ha="center", va="center", fontsize=6, color="tab:red")
    ax.set_xticks(range(num_classes), names, fontsize=7)
    ax.set_yticks(range(num_classes), names, fontsize=7)
    ax.set_xlabel("predicted")
    ax.set_title(f"exit {k + 1}: {int(np.trace(counts))}/{counts.sum()} right", fontsize=9)
  axes[0].set_ylabel("true")
  fig.tight_layout()
  return fig


def exit_examples(images: np.ndarray, labels: np.ndarray, prediction: Prediction,
                  columns: int = 8) -> Figure:
  """A grid of samples, each titled with the exit it left at and its prediction.

  Args:
    images: (N, H, W, C) images as stored (uint8), for display.
    labels: (N,) true labels.
    prediction: the cascade's `Prediction` for these images.
    columns: images per row.

  Returns:
    The grid; wrong predictions are titled in red.
  """
  n = len(images)
  rows = -(-n // columns)
  fig = Figure(figsize=(1.2 * columns, 1.35 * rows), dpi=100)
  axes = fig.subplots(rows, columns, squeeze=False).reshape(-1)
  for i, ax in enumerate(axes):
    ax.axis("off")
    if i >= n:
      continue
    image = images[i]
    ax.imshow(image[..., 0] if image.shape[-1] == 1 else image, cmap="gray")
    ok = prediction.label[i] == labels[i]
    ax.set_title(f"exit {prediction.exit[i] + 1}: {prediction.label[i]}", fontsize=8,
                 color="black" if ok else "tab:red")
  fig.tight_layout()
  return fig


def threshold_sweep(values: np.ndarray, result: screening.ScreenResult, full_cost: float,
                    criterion: Criterion | str = "entropy", exit_index: int = 0,
                    chosen: float | None = None) -> Figure:
  """Accuracy, exit fractions and cost as one exit's threshold moves.

  Args:
    values: (G,) the thresholds of exit `exit_index`, in the order of `result`'s rows.
    result: the screened vectors (the other exits' thresholds held fixed).
    full_cost: per-sample cost of the full network (cost is shown relative to it).
    criterion: the criterion (or its name) the thresholds apply to: axis label, and a
      log scale for scores bounded below by 0 that exit below the threshold (entropy).
    exit_index: which exit's threshold `values` are (0-based).
    chosen: a threshold to mark, e.g. the selected one.

  Returns:
    Two panels sharing the threshold axis: accuracy above; exit fractions and the
    relative cost below.
  """
  criterion = criteria.get(criterion)
  # Entropy: the interesting range is near 0, its most confident score.
  log_scale = criterion.exits_below and criterion.never_exit == 0.0

  def plottable(v):
    return np.isfinite(v) & ((v > 0) if log_scale else True)

  values = np.asarray(values, np.float64)
  shown = plottable(values)
  fig = Figure(figsize=(6.4, 4.6), dpi=100)
  top, bottom = fig.subplots(2, 1, sharex=True)
  top.plot(values[shown], 100 * result.accuracy[shown], c="tab:blue")
  top.set_ylabel("accuracy (%)")
  for k in range(result.exit_fractions.shape[1]):
    bottom.plot(values[shown], 100 * result.exit_fractions[shown, k],
                label=f"leave at exit {k + 1}")
  bottom.plot(values[shown], 100 * result.expected_cost[shown] / full_cost, "k--",
              label="cost / full network")
  bottom.set_ylabel("%")
  bottom.set_xlabel(f"{criterion.name} threshold of exit {exit_index + 1}")
  bottom.legend(fontsize=7)
  if log_scale:
    bottom.set_xscale("log")
  for ax in (top, bottom):
    ax.grid(alpha=0.3)
    if chosen is not None and plottable(chosen):
      ax.axvline(chosen, c="0.4", ls=":", lw=1)
  fig.tight_layout()
  return fig
