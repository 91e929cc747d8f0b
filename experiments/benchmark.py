r"""Early exit against the full network: the paper's Table 1, measured here.

  python -m experiments.benchmark --workdir=W --batch_sizes=1,256,2048 \
      [--criteria=entropy,max_prob,margin] [--rule=accuracy_drop --epsilon=0.001]

Chooses thresholds on the validation split (W/thresholds.json), times the main
path and the early-exit cascade on the test split at each batch size, prints a
Table-1-style table and writes W/benchmark.json and W/accuracy_vs_cost.png.
"""

if __name__ == "__main__":  # Before JAX loads: restart with tcmalloc (experiments/preload.py).
  from experiments import preload
  preload.reexec_with_tcmalloc()

import sys

from absl import app, flags, logging

from bnet_jax import benchmark, runtime, selection, tables

_WORKDIR = flags.DEFINE_string("workdir", None, "A trained workdir (experiments.train).")
_BATCHES = flags.DEFINE_list("batch_sizes", ["1", "256", "2048"], "Batch sizes to time.")
_CRITERIA = flags.DEFINE_list("criteria", ["entropy"], "Exit criteria to benchmark.")
_RULE = flags.DEFINE_enum("rule", "accuracy_drop", selection.RULES, "Threshold selection rule.")
_EPSILON = flags.DEFINE_float("epsilon", 0.001, "Tolerated validation accuracy drop.")
_DELTA = flags.DEFINE_float("delta", 0.1, "Failure probability of the risk rule.")
_BUDGET = flags.DEFINE_float("max_cost_fraction", 0.5, "Budget rule: cost / full network.")
_REPEATS = flags.DEFINE_integer("repeats", 7, "Timed passes per variant.")
_OPTIONS = flags.DEFINE_multi_string(
    "model_option", [], "KEY=VALUE: inference layer option (default: the network's "
    "nets.inference_options for this platform); applies to baseline and cascade alike.")
_ASYNC = flags.DEFINE_bool(
    "async_dispatch", False, "Keep JAX's asynchronous CPU dispatch on (off by default: "
    "it costs latency at small batches); applies to baseline and cascade alike.")
_CORES = flags.DEFINE_integer(
    "cores", 0, "Run on this many CPU cores (0: all). One core gives the lowest batch-1 "
    "latency; time batch 1 with --cores=1 and the batched sizes in a second run: rows of "
    "other batch sizes already in benchmark.json are kept.")
_DTYPE = flags.DEFINE_enum("compute_dtype", None, ["float32", "bfloat16"],
                           "Compute dtype of baseline and cascade (default: the one the "
                           "workdir trained in).")
flags.mark_flag_as_required("workdir")


def main(argv: list[str]) -> None:
  del argv
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)
  runtime.configure(latency=not _ASYNC.value, cores=_CORES.value)
  options = dict(o.split("=", 1) for o in _OPTIONS.value) or None
  print(benchmark.HEADER, flush=True)
  try:
    results = benchmark.run(_WORKDIR.value, [int(b) for b in _BATCHES.value], _CRITERIA.value,
                            rule=_RULE.value, epsilon=_EPSILON.value, delta=_DELTA.value,
                            max_cost_fraction=_BUDGET.value, repeats=_REPEATS.value,
                            model_options=options, compute_dtype=_DTYPE.value)
  except (FileNotFoundError, ValueError) as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
  if results["rows"]:
    print(f"\nSummary ({results['rows'][0]['device']}, test split, ms per sample):")
    print(tables.benchmark_table(results["rows"]))
  print(f"wrote {_WORKDIR.value}/benchmark.json, thresholds.json, accuracy_vs_cost.png")


if __name__ == "__main__":
  app.run(main)
