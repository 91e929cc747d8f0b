r"""Early-exit predictions for a whole split of a trained workdir, and their speed.

  python -m experiments.predict --workdir=W [--split=test] [--batch_size=2048] \
      [--criterion=entropy] [--thresholds=T1,...] [--repeats=5]

Puts the split on every device once, runs the early-exit cascade over it in batches
and writes W/predictions_{split}.npz (per example: predicted label, exit, score and
true label). Prints accuracy, exit fractions and images/s of the cascade against the
all-exits pass (every exit for every example) on the same devices. Thresholds come
from --thresholds, else from W/thresholds.json (experiments.benchmark). Data-parallel
over every device; across hosts, add the flags of experiments/distributed.py on each.
"""

if __name__ == "__main__":  # Before JAX loads: restart with tcmalloc (experiments/preload.py).
  from experiments import preload
  preload.reexec_with_tcmalloc()

import jax
from absl import flags, logging

from bnet_jax import criteria, parallel, predict, runtime, tables
from experiments import distributed, errors

_WORKDIR = flags.DEFINE_string("workdir", None, "A trained workdir (experiments.train).")
_SPLIT = flags.DEFINE_string("split", "test", "test, validation or train.")
_BATCH = flags.DEFINE_integer("batch_size", 2048,
                              "Rows per cascade chunk and per all-exits batch, over all devices.")
_CRITERION = flags.DEFINE_enum("criterion", "entropy", list(criteria.CRITERIA),
                               "Exit criterion.")
_THRESHOLDS = flags.DEFINE_list(
    "thresholds", None, "One per exit but the last (default: W/thresholds.json, written by "
    "experiments.benchmark).")
_REPEATS = flags.DEFINE_integer("repeats", 5, "Timed passes of each kind, after a warm-up.")
_DTYPE = flags.DEFINE_enum("compute_dtype", None, ["float32", "bfloat16"],
                           "Compute dtype of both passes (default: the one the workdir "
                           "trained in).")
flags.mark_flag_as_required("workdir")


def summary(result: dict) -> str:
  """A one-row table of a `predict.predict_split` result: accuracy, exits, images/s."""
  speed = result["images_per_second"]
  row = [result["split"], result["num_examples"], f"{100 * result['accuracy']:.2f}",
         "/".join(f"{100 * f:.1f}" for f in result["exit_fractions"]),
         f"{speed['cascade']:,.0f}", f"{speed['all_exits']:,.0f}",
         f"{speed['cascade'] / speed['all_exits']:.2f}x"]
  return tables.format_table(["split", "examples", "acc %", "exit %", "cascade img/s",
                              "all exits img/s", "ratio"], [row])


def main(argv: list[str]) -> None:
  del argv
  errors.check_workdir(_WORKDIR.value, write=True)
  errors.at_least("batch_size", _BATCH.value, 1)
  errors.at_least("repeats", _REPEATS.value, 1)
  thresholds = (None if _THRESHOLDS.value is None
                else errors.floats("thresholds", _THRESHOLDS.value))
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)
  runtime.configure()
  distributed.initialize()
  result = predict.predict_split(_WORKDIR.value, _SPLIT.value, batch_size=_BATCH.value,
                                 criterion=_CRITERION.value, thresholds=thresholds,
                                 mesh=parallel.make_mesh(), repeats=_REPEATS.value,
                                 compute_dtype=_DTYPE.value)
  if jax.process_index() != 0:  # Process 0 wrote the file.
    return
  device = jax.devices()[0]
  print(f"{result['devices']} x {device.platform}:{device.device_kind}, batch "
        f"{result['batch_size']}, {result['compute_dtype']}, checkpoint step {result['step']}, "
        f"{result['criterion']} "
        f"thresholds {', '.join(f'{t:.4g}' for t in result['thresholds'])}; without early "
        f"exit {100 * result['last_exit_accuracy']:.2f}% accurate")
  print(summary(result))
  print(f"wrote {result['path']}")


if __name__ == "__main__":
  errors.run(main)
