"""Plain-text tables for the summaries that experiments print when they finish."""

from __future__ import annotations

from collections.abc import Sequence


def format_table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
  """Columns padded to their widest cell: text left-aligned, numbers right-aligned.

  Args:
    header: column titles.
    rows: cells, each row as long as `header`; floats should be formatted by the
      caller (strings), ints and strings print as they are.

  Returns:
    The header, a rule of dashes and one line per row, joined by newlines.

  Example::

    >>> print(format_table(["split", "examples"], [["test", 10000]]))
    split  examples
    -----  --------
    test      10000
  """
  cells = [[str(c) for c in header]] + [[str(c) for c in row] for row in rows]
  if any(len(r) != len(header) for r in cells):
    raise ValueError(f"Every row needs {len(header)} cells; got {[len(r) for r in cells]}.")
  widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
  numeric = [all(_is_number(r[i]) for r in cells[1:]) and len(cells) > 1
             for i in range(len(header))]

  def line(row: list[str]) -> str:
    return "  ".join(c.rjust(w) if num else c.ljust(w)
                     for c, w, num in zip(row, widths, numeric)).rstrip()

  return "\n".join([line(cells[0]), line(["-" * w for w in widths])]
                   + [line(r) for r in cells[1:]])


def accuracy_table(results: dict[str, dict]) -> str:
  """Per-exit accuracy by split, from eval.json-shaped results.

  Args:
    results: ``{split: {"num_examples": N, "accuracy_per_exit": [E fractions]}}``.

  Returns:
    A table with one row per split and one accuracy column (in %) per exit.
  """
  num_exits = max(len(r["accuracy_per_exit"]) for r in results.values())
  header = ["split", "examples"] + [f"exit {k + 1} acc %" for k in range(num_exits)]
  rows = [[split, r["num_examples"]] + [f"{100 * a:.2f}" for a in r["accuracy_per_exit"]]
          for split, r in results.items()]
  return format_table(header, rows)


def benchmark_table(rows: Sequence[dict]) -> str:
  """One line per benchmark row (`bnet_jax.benchmark.run`): main path against cascade.

  Columns: batch size, criterion, thresholds, exit fractions (%), test accuracy and
  ms per sample of the main path and of the cascade, measured and ideal (FLOP) speedup.
  """
  header = ["batch", "criterion", "thresholds", "exits %", "main acc %", "cascade acc %",
            "main ms", "cascade ms", "speedup", "ideal"]
  lines = [[r["batch_size"], r["criterion"], "/".join(f"{t:.3g}" for t in r["thresholds"]),
            "/".join(f"{100 * f:.1f}" for f in r["exit_fractions"]),
            f"{100 * r['baseline']['accuracy']:.2f}", f"{100 * r['branchy']['accuracy']:.2f}",
            f"{r['baseline']['ms_per_sample']:.4f}", f"{r['branchy']['ms_per_sample']:.4f}",
            f"{r['speedup']:.2f}x", f"{r['ideal_speedup']:.2f}x"] for r in rows]
  return format_table(header, lines)


def _is_number(cell: str) -> bool:
  """Whether a cell reads as a number, allowing a unit suffix such as % or x."""
  try:
    float(cell.rstrip("%x").replace(",", ""))
  except ValueError:
    return False
  return True
