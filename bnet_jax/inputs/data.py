"""Datasets through TFDS: loading, pixel scaling and deterministic batching.

Splits are read once into host memory as uint8 arrays (MNIST-sized datasets are
tens of MB) with `tfds.data_source`, which needs no TensorFlow. The validation
split is held out from the end of TFDS's train split (``train[-N:]``), so threshold
screening never touches the test split. Shuffling is a permutation drawn from
(seed, epoch): a resumed run sees exactly the batches it would have seen.
"""

from __future__ import annotations

import dataclasses
import os
import socket
from collections.abc import Iterator, Sequence

import numpy as np


@dataclasses.dataclass(frozen=True)
class DatasetSpec:
  """What the library needs to know about a dataset.

  Attributes:
    image_shape: (H, W, C).
    num_classes: number of labels.
    mean, std: per-channel normalisation applied after scaling to [0, 1]
      (None: the [0, 1] scaling alone, as the paper does for MNIST).
    download_host: the host TFDS downloads the dataset from (checked before a
      download, so that an offline machine fails at once).
  """
  image_shape: tuple[int, int, int]
  num_classes: int
  mean: tuple[float, ...] | None = None
  std: tuple[float, ...] | None = None
  download_host: str = "storage.googleapis.com"


DATASETS: dict[str, DatasetSpec] = {
    "mnist": DatasetSpec((28, 28, 1), 10),
    "fashion_mnist": DatasetSpec(
        (28, 28, 1), 10, download_host="fashion-mnist.s3-website.eu-central-1.amazonaws.com"),
    "cifar10": DatasetSpec((32, 32, 3), 10, mean=(0.4914, 0.4822, 0.4465),
                           std=(0.2470, 0.2435, 0.2616), download_host="www.cs.toronto.edu"),
}

# The prepared data dir of a source checkout (scripts/setup.sh builds it there).
REPO_DATA_DIR = os.path.join(os.path.abspath(os.path.join(__file__, *[os.pardir] * 3)), ".tfds")


@dataclasses.dataclass(frozen=True)
class Split:
  """A split, or one process's contiguous part of it, in host memory.

  Attributes:
    images: (N, H, W, C) uint8 (float32 once preprocessed).
    labels: (N,) int32.
    offset: index of the first row in the whole split (0 unless a part).
    total: size of the whole split (None: these rows are the whole split).
  """
  images: np.ndarray
  labels: np.ndarray
  offset: int = 0
  total: int | None = None

  def __len__(self) -> int:
    return len(self.labels)


class DataNotFoundError(FileNotFoundError):
  """The dataset is not prepared in the TFDS data directory."""


def spec(dataset: str) -> DatasetSpec:
  """The `DatasetSpec` of `dataset`; a ValueError lists the known ones otherwise."""
  if dataset not in DATASETS:
    raise ValueError(f"Unknown dataset {dataset!r}; supported: {sorted(DATASETS)}.")
  return DATASETS[dataset]


def resolve_data_dir(data_dir: str | os.PathLike | None = None) -> str:
  """The absolute TFDS data dir: `data_dir` if given, else $TFDS_DATA_DIR, else the
  checkout's prepared `REPO_DATA_DIR` if it exists, else TFDS's default folder."""
  repo = REPO_DATA_DIR if os.path.isdir(REPO_DATA_DIR) else None
  data_dir = data_dir or os.environ.get("TFDS_DATA_DIR") or repo or "~/tensorflow_datasets"
  return os.path.abspath(os.path.expanduser(os.fspath(data_dir)))


def reachable(host: str, port: int = 443, timeout: float = 2.0) -> bool:
  """Whether a TCP connection to `host` opens within `timeout` seconds (DNS included)."""
  try:
    with socket.create_connection((host, port), timeout=timeout):
      return True
  except OSError:
    return False


def _prepare_hint(dataset: str, data_dir: str) -> str:
  return (f"Offline, build it from local IDX files: python -m experiments.prepare_data "
          f"--dataset={dataset} --from_dir=DIR --data_dir={data_dir} (or set TFDS_DATA_DIR / "
          f"--config.data_dir).")


def _source(dataset: str, split: str, data_dir: str, download: bool):
  """A random-access TFDS data source of the split (array_record format).

  A prepared (or mocked) dataset is read as it is. Otherwise, before a download, a
  2-second connection to the dataset's host: offline, TFDS would retry for minutes
  before failing.
  """
  import tensorflow_datasets as tfds  # Heavy import, needed only here.

  try:
    return tfds.data_source(dataset, split=split, data_dir=data_dir, download=False)
  except Exception as e:  # TFDS raises several types; all mean "not readable here".
    error = e
  if download:
    host = spec(dataset).download_host
    if not reachable(host):
      raise DataNotFoundError(
          f"Dataset {dataset!r} is not prepared in {data_dir} and {host} cannot be reached "
          f"to download it. {_prepare_hint(dataset, data_dir)}")
    try:
      return tfds.data_source(dataset, split=split, data_dir=data_dir, download=True)
    except Exception as e:  # noqa: BLE001 -- as above.
      error = e
  builder = tfds.builder(dataset, data_dir=data_dir)
  if builder.is_prepared():
    raise DataNotFoundError(
        f"{dataset!r} is prepared in {data_dir} in {builder.info.file_format.value} format, "
        f"but bnet-jax reads array_record. Delete {builder.data_dir} and rerun with "
        f"--config.download=True, or use another data_dir.") from error
  how = (f"Download failed: {error}\n" if download else
         "With internet, rerun with --config.download=True. ")
  raise DataNotFoundError(
      f"Dataset {dataset!r} is not prepared in {data_dir}. {how}"
      f"{_prepare_hint(dataset, data_dir)}") from error


def load(dataset: str, split: str, data_dir: str | None = None, *,
         download: bool = False, shard: tuple[int, int] = (0, 1)) -> Split:
  """Reads a TFDS split, or one contiguous part of it, into memory.

  Args:
    dataset: a key of `DATASETS`.
    split: a TFDS split string, slicing allowed (``"train[:-5000]"``).
    data_dir: TFDS data directory (see `resolve_data_dir`).
    download: download and prepare the dataset if it is missing (needs internet
      and TensorFlow).
    shard: (index, count): read only rows ``[index * N // count, (index + 1) * N //
      count)`` of the split's N, e.g. (process index, process count) so that each
      host reads only its own part. Records are read by index from the
      array_record files; nothing else is decoded.

  Returns:
    The rows' images (n, H, W, C) uint8 and labels (n,) int32, with their `offset`
    in the split and the split's `total` size N.
  """
  spec(dataset)
  index, count = shard
  if not 0 <= index < count:
    raise ValueError(f"shard must be (index, count) with 0 <= index < count; got {shard}.")
  source = _source(dataset, split, resolve_data_dir(data_dir), download)
  total = len(source)
  rows = range(index * total // count, (index + 1) * total // count)
  try:
    examples = source.__getitems__(rows)  # One batched read, not a read per example.
  except TypeError:  # tfds.testing.mock_data's __getitems__ is not bound to its source.
    examples = [source[i] for i in rows]
  images = np.stack([e["image"] for e in examples]).astype(np.uint8)
  return Split(images, np.array([e["label"] for e in examples], np.int32), rows.start, total)


def load_splits(dataset: str, num_validation: int, data_dir: str | None = None, *,
                download: bool = False, train_shard: tuple[int, int] = (0, 1),
                only: Sequence[str] | None = None) -> dict[str, Split]:
  """Train (minus the held-out tail), validation (the tail) and test splits.

  `train_shard` = (index, count) reads only that part of the train split (see
  `load`); validation and test are always read whole. `only` names the splits to
  read (default: all three; evaluation need not decode the train split).
  """
  if num_validation < 0:
    raise ValueError(f"num_validation must be >= 0; got {num_validation}.")
  train = "train" if num_validation == 0 else f"train[:-{num_validation}]"
  names = {"train": train, "test": "test"}
  if num_validation:
    names["validation"] = f"train[-{num_validation}:]"
  return {k: load(dataset, s, data_dir, download=download,
                  shard=train_shard if k == "train" else (0, 1))
          for k, s in names.items() if only is None or k in only}


def preprocess(dataset: str, images: np.ndarray) -> np.ndarray:
  """uint8 images (..., H, W, C) -> float32 scaled to [0, 1], normalised if the spec says."""
  s = spec(dataset)
  if images.shape[-3:] != s.image_shape:
    raise ValueError(f"{dataset} images are {s.image_shape}; got {images.shape[-3:]}.")
  x = np.asarray(images, np.float32) / 255.0
  if s.mean is not None:
    x = (x - np.asarray(s.mean, np.float32)) / np.asarray(s.std, np.float32)
  return x


def epoch_permutation(num_examples: int, seed: int, epoch: int) -> np.ndarray:
  """The training order of epoch `epoch`: a permutation drawn from (seed, epoch)."""
  return np.random.default_rng([seed, epoch]).permutation(num_examples)


def train_batches(split: Split, batch_size: int, seed: int, start_step: int = 0,
                  steps_per_epoch: int | None = None
                  ) -> Iterator[tuple[int, np.ndarray, np.ndarray]]:
  """Yields (step, images, labels) from `start_step` on, forever.

  Step s of an epoch takes the s-th slice of that epoch's permutation; the last
  partial batch of every epoch is dropped, so every batch has `batch_size` rows.

  A part of a split (`Split.offset`, `Split.total`: one process's rows) takes its
  rows in the order they appear in the whole split's (seed, epoch) permutation: the
  parts of all processes together follow one permutation, and a part that is the
  whole split gives exactly the unsharded order. Parts may differ in size by a row,
  so every process must pass the same `steps_per_epoch` (default
  ``len(split) // batch_size``).
  """
  steps_per_epoch = steps_per_epoch or len(split) // batch_size
  if steps_per_epoch == 0:
    raise ValueError(f"batch_size {batch_size} exceeds the {len(split)} training examples.")
  if steps_per_epoch * batch_size > len(split):
    raise ValueError(f"{steps_per_epoch} steps per epoch of batch_size {batch_size} exceed "
                     f"the {len(split)} training examples of this part of the split.")
  total = len(split) if split.total is None else split.total
  step = start_step
  while True:
    epoch, i = divmod(step, steps_per_epoch)
    order = epoch_permutation(total, seed, epoch)
    if total != len(split):
      order = order[(order >= split.offset) & (order < split.offset + len(split))] - split.offset
    for i in range(i, steps_per_epoch):
      idx = order[i * batch_size:(i + 1) * batch_size]
      yield step, split.images[idx], split.labels[idx]
      step += 1
