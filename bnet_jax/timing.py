"""Timing helpers for benchmarks: warm up, interleave variants, take medians."""

import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any


def stream(predict: Callable[[Any], Any], batches: Sequence[Any]) -> None:
  """Runs `predict` on each batch in turn, as a serving loop does, keeping no result.

  Keeping every result would also time Python's garbage collector, which a list of
  GC-tracked `Prediction` tuples charges to the cascade and not to the baselines.
  """
  for batch in batches:
    predict(batch)


def interleaved_medians(runners: dict[str, Callable[[], None]], *, repeats: int,
                        warmup: int = 1) -> dict[str, float]:
  """Median wall time in seconds of each runner, timed in rotation.

  Every runner must block until its work is done (`jax.block_until_ready`). Each
  is first called `warmup` times (compilation, caches); then the runners are called
  in turn `repeats` times, so machine drift affects all of them alike.
  """
  for run in runners.values():
    for _ in range(warmup):
      run()
  times: dict[str, list[float]] = {name: [] for name in runners}
  for _ in range(repeats):
    for name, run in runners.items():
      t0 = time.perf_counter()
      run()
      times[name].append(time.perf_counter() - t0)
  return {name: statistics.median(ts) for name, ts in times.items()}
