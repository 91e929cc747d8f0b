r"""Trains a multi-exit network and writes checkpoints and eval.json to --workdir.

  python -m experiments.train --config=experiments/configs/lenet_mnist.py:tuned \
      --workdir=workdirs/lenet_mnist_tuned [--config.FIELD=VALUE ...]

Rerunning with the same --workdir resumes from its newest intact checkpoint; a
changed training-defining field is refused with exit status 2 unless
--config.allow_config_change=True (bnet_jax.train.TRAINING_FIELDS). Training
curves (per-exit loss and accuracy, learning rate) go to --workdir/tensorboard.
Training is data-parallel over every device; across hosts, add --distributed (TPU
pod slices, SLURM) or --coordinator_address, --num_processes and --process_id on
each host (see experiments/distributed.py and WORKSPACE.md).
"""

if __name__ == "__main__":  # Before JAX loads: restart with tcmalloc (experiments/preload.py).
  from experiments import preload
  preload.reexec_with_tcmalloc()

import os

import jax
from absl import app, flags, logging
from ml_collections import config_flags

from bnet_jax import runtime, summary, tables, train
from experiments import distributed, errors

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file (path[:variant]).",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints and results.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  if not flags.FLAGS["verbosity"].present:  # Orbax logs every save at INFO.
    logging.set_verbosity(logging.WARNING)
  if os.path.exists(_WORKDIR.value) and not os.path.isdir(_WORKDIR.value):
    raise ValueError(f"--workdir={_WORKDIR.value} is a file, not a directory: pass a new or "
                     f"existing directory.")
  runtime.configure()
  distributed.initialize()
  results = train.train_and_evaluate(_CONFIG.value, _WORKDIR.value)
  if results and jax.process_index() == 0:
    print(tables.accuracy_table(results))
    print(f"wrote {_WORKDIR.value}/eval.json; curves: tensorboard --logdir "
          f"{summary.logdir(_WORKDIR.value)}")


if __name__ == "__main__":
  errors.run(main)
