"""Progress bars for training, evaluation and screening, quiet where nobody watches.

Bars are drawn on an interactive terminal and in Jupyter (as widgets when
ipywidgets is installed, as in Colab) and are off otherwise: logs, pipes, CI and
pytest get no carriage-return noise. ``BNET_PROGRESS=1`` or ``=0`` forces them
on or off.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterable
from typing import Any

from tqdm.auto import tqdm


def enabled() -> bool:
  """Whether bars are drawn: $BNET_PROGRESS if set, else on a TTY or in a Jupyter kernel."""
  forced = os.environ.get("BNET_PROGRESS")
  if forced is not None:
    return forced.strip().lower() not in ("", "0", "false", "no", "off")
  return _in_kernel() or sys.stderr.isatty()


def _in_kernel() -> bool:
  """Whether this is a Jupyter (or Colab) kernel, not merely a process that imported one."""
  ipython = sys.modules.get("IPython")
  shell = ipython.get_ipython() if ipython is not None else None
  return getattr(shell, "kernel", None) is not None  # Terminal IPython has no kernel.


def bar(iterable: Iterable | None = None, *, total: int | None = None, desc: str = "",
        unit: str = "it", leave: bool = True, min_total: int = 1) -> Any:
  """A tqdm bar, disabled unless `enabled()` and `total` is at least `min_total`.

  Args:
    iterable: what to iterate over, or None for a bar advanced with ``update``.
    total: number of steps (default: ``len(iterable)`` where defined).
    desc: label in front of the bar.
    unit: what one step is called.
    leave: keep the finished bar on screen.
    min_total: hide the bar for shorter work (e.g. a single chunk).

  Returns:
    A `tqdm` object; a disabled one iterates and updates at no cost.
  """
  if total is None and hasattr(iterable, "__len__"):
    total = len(iterable)
  show = enabled() and (total is None or total >= min_total)
  return tqdm(iterable, total=total, desc=desc, unit=unit, leave=leave, disable=not show,
              dynamic_ncols=True)


def write(line: str) -> None:
  """Prints `line` above any bar being drawn (plain print when none is)."""
  tqdm.write(line)
  sys.stdout.flush()
