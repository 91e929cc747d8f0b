r"""Trains a multi-exit network and writes checkpoints and eval.json to --workdir.

  python -m experiments.train --config=experiments/configs/lenet_mnist.py:tuned \
      --workdir=workdirs/lenet_mnist_tuned [--config.FIELD=VALUE ...]

Rerunning with the same --workdir resumes from its newest checkpoint. Training
curves (per-exit loss and accuracy, learning rate) go to --workdir/tensorboard.
Training is data-parallel over every device; across hosts, add --distributed (TPU
pod slices, SLURM) or --coordinator_address, --num_processes and --process_id on
each host (see experiments/distributed.py and WORKSPACE.md).
"""

if __name__ == "__main__":  # Before JAX loads: restart with tcmalloc (experiments/preload.py).
  from experiments import preload
  preload.reexec_with_tcmalloc()

import sys

import jax
from absl import app, flags, logging
from ml_collections import config_flags

from bnet_jax import checkpoint, data, runtime, summary, tables, train
from experiments import distributed

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file (path[:variant]).",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints and results.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  if not flags.FLAGS["verbosity"].present:  # Orbax logs every save at INFO.
    logging.set_verbosity(logging.WARNING)
  runtime.configure()
  distributed.initialize()
  try:
    results = train.train_and_evaluate(_CONFIG.value, _WORKDIR.value)
  except (ValueError, data.DataNotFoundError, checkpoint.CheckpointMismatchError) as e:
    logging.error("%s", e)
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
  if results and jax.process_index() == 0:
    print(tables.accuracy_table(results))
    print(f"wrote {_WORKDIR.value}/eval.json; curves: tensorboard --logdir "
          f"{summary.logdir(_WORKDIR.value)}")


if __name__ == "__main__":
  app.run(main)
