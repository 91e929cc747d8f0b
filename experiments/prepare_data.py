r"""Prepares MNIST or Fashion-MNIST for TFDS offline, from local IDX .gz files.

  python -m experiments.prepare_data --dataset=mnist --from_dir=DIR \
      [--data_dir=DIR] [--overwrite]

DIR holds train-images-idx3-ubyte.gz, train-labels-idx1-ubyte.gz,
t10k-images-idx3-ubyte.gz and t10k-labels-idx1-ubyte.gz (Fashion-MNIST: after
`apt-get install dataset-fashion-mnist`, /usr/share/datasets/fashion-mnist). The
dataset is written in array_record format to --data_dir (default $TFDS_DATA_DIR,
else ~/tensorflow_datasets). Unusable files or flags: one line on stderr and exit
status 2 (experiments/errors.py).
"""

import os

from absl import app, flags

from bnet_jax import offline
from experiments import errors

_DATASET = flags.DEFINE_string(
    "dataset", None, f"TFDS dataset to prepare, one of {', '.join(offline.SUPPORTED)}.")
_FROM_DIR = flags.DEFINE_string("from_dir", None, "Folder with the four IDX .gz files.")
_DATA_DIR = flags.DEFINE_string(
    "data_dir", None, "TFDS data directory (default $TFDS_DATA_DIR, else "
    "~/tensorflow_datasets).")
_OVERWRITE = flags.DEFINE_bool("overwrite", False, "Rebuild even if already prepared.")
flags.mark_flags_as_required(["dataset", "from_dir"])


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  if _DATASET.value not in offline.SUPPORTED:
    raise ValueError(f"--dataset={_DATASET.value} cannot be prepared offline; use one of "
                     f"{', '.join(offline.SUPPORTED)}.")
  if not os.path.isdir(_FROM_DIR.value):
    raise ValueError(f"--from_dir={_FROM_DIR.value} is not a directory: pass the folder "
                     f"holding the four IDX .gz files.")
  data_dir = offline.prepare(_DATASET.value, _FROM_DIR.value, _DATA_DIR.value,
                             overwrite=_OVERWRITE.value)
  import tensorflow_datasets as tfds

  info = tfds.builder(_DATASET.value, data_dir=data_dir).info
  sizes = ", ".join(f"{name} {split.num_examples}" for name, split in info.splits.items())
  print(f"{info.full_name} ({info.file_format.value}) in {data_dir}: {sizes} examples.")


if __name__ == "__main__":
  errors.run(main)
