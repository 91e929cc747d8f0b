r"""Runs the all-exits pass of a trained workdir once and caches it.

  python -m experiments.evaluate --workdir=W

Writes W/exits_validation.npz and W/exits_test.npz (per-exit logits and labels),
from which screening, selection and the benchmark's accuracy figures are computed
without rerunning the network, and prints per-exit accuracy. Batches are
data-parallel over every device; across hosts, add the flags of
experiments/distributed.py on each host.
"""

if __name__ == "__main__":  # Before JAX loads: restart with tcmalloc (experiments/preload.py).
  from experiments import preload
  preload.reexec_with_tcmalloc()

import jax
from absl import flags, logging

from bnet_jax import evaluate, parallel, runtime, tables
from experiments import distributed, errors

_WORKDIR = flags.DEFINE_string("workdir", None, "A directory written by experiments.train.")
_BATCH = flags.DEFINE_integer("batch_size", 1000,
                              "Rows per compiled call over all devices (rounded up to a "
                              "multiple of the device count).")
_DTYPE = flags.DEFINE_enum("compute_dtype", None, ["float32", "bfloat16"],
                           "Compute dtype (default: the one the workdir trained in).")
flags.mark_flag_as_required("workdir")


def main(argv: list[str]) -> None:
  del argv
  errors.check_workdir(_WORKDIR.value, write=True)
  errors.at_least("batch_size", _BATCH.value, 1)
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)
  runtime.configure()
  distributed.initialize()
  cached = evaluate.cache_exits(_WORKDIR.value, batch_size=_BATCH.value,
                                mesh=parallel.make_mesh(), compute_dtype=_DTYPE.value)
  if jax.process_index() != 0:  # Process 0 wrote the files.
    return
  results = {split: {"num_examples": len(c.labels),
                     "accuracy_per_exit": evaluate.accuracy_per_exit(c.logits, c.labels)}
             for split, c in cached.items()}
  print(tables.accuracy_table(results))
  print(f"wrote {', '.join(evaluate.exits_path(_WORKDIR.value, s) for s in cached)}"
        f" (checkpoint step {next(iter(cached.values())).step})")


if __name__ == "__main__":
  errors.run(main)
