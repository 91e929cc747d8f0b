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

from absl import flags, logging

from bnet_jax import benchmark, checkpoint, criteria, runtime, selection, tables
from experiments import errors

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


def _check_selection_flags() -> None:
  """The rule's parameters in the ranges `selection.choose` accepts (ValueError else)."""
  for name in _CRITERIA.value:
    if name not in criteria.CRITERIA:
      raise ValueError(f"--criteria: unknown exit criterion {name!r}; use one or more of "
                       f"{','.join(criteria.CRITERIA)}.")
  if _RULE.value == "risk":
    for flag, value in (("epsilon", _EPSILON.value), ("delta", _DELTA.value)):
      if not 0 < value < 1:
        raise ValueError(f"--{flag} must lie strictly between 0 and 1 for --rule=risk; "
                         f"got {value}.")
  elif _RULE.value == "accuracy_drop" and not 0 <= _EPSILON.value < 1:
    raise ValueError(f"--epsilon must lie in [0, 1) for --rule=accuracy_drop; got "
                     f"{_EPSILON.value}.")
  elif _RULE.value == "budget" and not _BUDGET.value > 0:
    raise ValueError(f"--max_cost_fraction must be positive; got {_BUDGET.value}.")


def main(argv: list[str]) -> None:
  del argv
  workdir = errors.check_workdir(_WORKDIR.value, write=True)
  batch_sizes = errors.positive_ints("batch_sizes", _BATCHES.value)
  errors.at_least("repeats", _REPEATS.value, 1)
  errors.at_least("cores", _CORES.value, 0)
  _check_selection_flags()
  options = errors.key_values("model_option", _OPTIONS.value) or None
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)
  runtime.configure(latency=not _ASYNC.value, cores=_CORES.value)  # Before JAX starts.
  if options:
    config = checkpoint.read_config(workdir)
    errors.check_network("model_option", lambda: checkpoint.network(config, **options))
  print(benchmark.HEADER, flush=True)
  results = benchmark.run(workdir, batch_sizes, _CRITERIA.value,
                          rule=_RULE.value, epsilon=_EPSILON.value, delta=_DELTA.value,
                          max_cost_fraction=_BUDGET.value, repeats=_REPEATS.value,
                          model_options=options, compute_dtype=_DTYPE.value)
  if results["rows"]:
    print(f"\nSummary ({results['rows'][0]['device']}, test split, ms per sample):")
    print(tables.benchmark_table(results["rows"]))
  print(f"wrote {_WORKDIR.value}/benchmark.json, thresholds.json, accuracy_vs_cost.png")


if __name__ == "__main__":
  errors.run(main)
