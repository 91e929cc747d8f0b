"""Offline preparation of the TFDS `mnist` and `fashion_mnist` datasets.

Machines without internet cannot let TFDS download MNIST or Fashion-MNIST, but
they may hold the four standard IDX ``.gz`` files. `prepare` builds the genuine
TFDS dataset from them with TFDS's own builder, in array_record format (what
`tfds.data_source` reads), so the result is the dataset users with internet get.

How: TFDS does not download a file that its download cache already holds. A
cached download is ``<download_dir>/<dataset>/<name>``, where ``<name>`` is derived
from the file's URL and the sha256 that TFDS registers for it, with a JSON
``<name>.INFO`` file beside it; TFDS takes such a file as verified without
hashing it. Local copies often differ from upstream in the gzip header alone, so
their own sha256 does not match the registered one (which rules out TFDS's
``manual_dir``); they are staged in a download cache under the registered names.

Because TFDS trusts the staged files, `validate_idx_files` checks them first:
gzip integrity, IDX magic numbers, image size, counts, exact byte lengths, label
range, and last the sha256 of the decompressed contents, which must be those of
the published datasets (so Fashion-MNIST files cannot become ``mnist``).

Nothing is written before every check passes. The build runs in a staging folder
inside ``data_dir`` and is moved into place only once it succeeded, so a failed
build leaves ``data_dir`` as it was. Building needs TensorFlow (``tensorflow-cpu``);
reading the result does not.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import shutil
import tempfile
import zlib
from pathlib import Path

import numpy as np

from bnet_jax.inputs import data

SUPPORTED = ("mnist", "fashion_mnist")

_log = logging.getLogger(__name__)

# role -> (file name, split prefix, IDX magic number)
_FILES = {
    "train_images": ("train-images-idx3-ubyte.gz", "train", 2051),
    "train_labels": ("train-labels-idx1-ubyte.gz", "train", 2049),
    "test_images": ("t10k-images-idx3-ubyte.gz", "t10k", 2051),
    "test_labels": ("t10k-labels-idx1-ubyte.gz", "t10k", 2049),
}
_IMAGES_MAGIC = 2051
_COUNTS = {"train": 60000, "t10k": 10000}
_ROWS = _COLS = 28
_NUM_CLASSES = 10
_GZIP_MAGIC = b"\x1f\x8b"

# sha256 of the *decompressed* files as published (MNIST: LeCun, Cortes, Burges;
# Fashion-MNIST: Zalando Research). Gzip headers differ between copies; contents do not.
_CONTENT_SHA256 = {
    "mnist": {
        "train-images-idx3-ubyte.gz": "ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db",
        "train-labels-idx1-ubyte.gz": "65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5",
        "t10k-images-idx3-ubyte.gz": "0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7",
        "t10k-labels-idx1-ubyte.gz": "ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2",
    },
    "fashion_mnist": {
        "train-images-idx3-ubyte.gz": "c59f468a2f672dc815687fe0f83887768d799fd8a3f3276145d20f83aa44d888",
        "train-labels-idx1-ubyte.gz": "bad3541b69d912435c50bb6ba87bec294ff4f6a2e1246121d8633921760443d9",
        "t10k-images-idx3-ubyte.gz": "5b4141f0afbad91edebe8549f8fcffe087ea10ca49f1dbef5c9a5cd8815ce37b",
        "t10k-labels-idx1-ubyte.gz": "0402a96d92fd2663957122ceb108a494c5af83dab82d92729df917d7dec38c34",
    },
}

# How to get the files in the first place, and how to repair a bad one.
_GET = {
    "mnist": "copy the four MNIST IDX .gz files (train-images-idx3-ubyte.gz, "
             "train-labels-idx1-ubyte.gz, t10k-images-idx3-ubyte.gz, "
             "t10k-labels-idx1-ubyte.gz) into that folder",
    "fashion_mnist": "apt-get install dataset-fashion-mnist (it installs the four "
                     "files in /usr/share/datasets/fashion-mnist)",
}
_REPAIR = {
    "mnist": "re-copy the file from a good MNIST copy",
    "fashion_mnist": "reinstall it (apt-get install --reinstall dataset-fashion-mnist) "
                     "or re-copy the file",
}


class OfflineDataError(ValueError):
  """A dataset cannot be prepared offline; the message says why and how to fix it."""


def _check_supported(dataset: str) -> None:
  if dataset not in SUPPORTED:
    raise OfflineDataError(
        f"Cannot prepare {dataset!r} offline; supported: {', '.join(SUPPORTED)}. "
        f"cifar10 cannot be prepared offline because no local copy exists: with "
        f"internet, TFDS downloads it directly.")


def _fail(dataset: str, path: Path, problem: str) -> OfflineDataError:
  return OfflineDataError(f"{path}: {problem}. Fix: {_REPAIR[dataset]}.")


def _gunzip(dataset: str, path: Path, expected_len: int) -> bytes:
  """The decompressed contents of gzip file `path` (all members), checked for damage."""
  raw = path.read_bytes()
  if raw[:2] != _GZIP_MAGIC:
    raise _fail(dataset, path, "not a gzip file (it does not start with the gzip "
                               "magic bytes 1f 8b)")
  chunks = []
  while raw:
    if raw[:2] != _GZIP_MAGIC:
      raise _fail(dataset, path, f"{len(raw)} unexpected bytes after the gzip data")
    d = zlib.decompressobj(wbits=16 + zlib.MAX_WBITS)
    try:
      chunks.append(d.decompress(raw))
    except zlib.error as e:
      raise _fail(dataset, path, f"corrupt gzip data ({e})") from None
    if not d.eof:
      got = sum(map(len, chunks)) + len(d.flush())
      raise _fail(dataset, path, f"truncated: the gzip data ends early; expected "
                                 f"{expected_len} decompressed bytes, got {got}")
    raw = d.unused_data.lstrip(b"\0")  # Like gzip, accept zero padding.
  return b"".join(chunks)


def _layout(magic: int) -> tuple[str, int, int]:
  """(kind, header bytes, bytes per item) of an IDX images or labels file."""
  return ("images", 16, _ROWS * _COLS) if magic == _IMAGES_MAGIC else ("labels", 8, 1)


def _check_idx(dataset: str, path: Path, data: bytes, magic: int) -> int:
  """Checks an IDX file's header and exact length; returns its item count."""
  kind, header_len, item = _layout(magic)
  if len(data) < header_len:
    raise _fail(dataset, path, f"truncated: {len(data)} bytes, shorter than the "
                               f"{header_len}-byte IDX {kind} header")
  header = np.frombuffer(data, ">u4", count=header_len // 4)
  if header[0] != magic:
    raise _fail(dataset, path, f"wrong magic number {header[0]}, expected {magic} "
                               f"(IDX {kind}): not the right file")
  count = int(header[1])
  if magic == _IMAGES_MAGIC and tuple(header[2:]) != (_ROWS, _COLS):
    raise _fail(dataset, path, f"images are {header[2]}x{header[3]}, expected "
                               f"{_ROWS}x{_COLS}")
  expected = header_len + count * item
  if len(data) != expected:
    problem = "truncated" if len(data) < expected else "too long"
    raise _fail(dataset, path, f"{problem}: its header announces {count} {kind}, so "
                               f"expected {expected} bytes, got {len(data)}")
  if magic != _IMAGES_MAGIC:
    top = int(np.frombuffer(data, np.uint8, offset=header_len).max(initial=0))
    if top >= _NUM_CLASSES:
      raise _fail(dataset, path, f"label {top} out of range, labels must be in "
                                 f"0..{_NUM_CLASSES - 1}")
  return count


def validate_idx_files(dataset: str, from_dir: str | os.PathLike) -> dict[str, Path]:
  """Checks the four IDX ``.gz`` files of `dataset` in `from_dir`.

  Args:
    dataset: one of `SUPPORTED`.
    from_dir: folder holding train-images-idx3-ubyte.gz, train-labels-idx1-ubyte.gz,
      t10k-images-idx3-ubyte.gz and t10k-labels-idx1-ubyte.gz.

  Returns:
    Their paths, keyed by "train_images", "train_labels", "test_images" and
    "test_labels".

  Raises:
    OfflineDataError: a file is missing, not gzip, truncated or corrupt, has a
      wrong IDX magic number, image size, count or label, its images and labels
      disagree in count, or its contents are not those of the published dataset.
      The message names the file, the problem and the fix.
  """
  _check_supported(dataset)
  from_dir = Path(from_dir).expanduser()
  if not from_dir.is_dir():
    raise OfflineDataError(f"{from_dir}: folder not found. Fix: {_GET[dataset]}.")
  paths = {role: from_dir / name for role, (name, _, _) in _FILES.items()}
  for path in paths.values():
    if not path.is_file():
      plain = path.with_suffix("")
      hint = (f"compress the uncompressed {plain.name} found there (gzip -nk {plain})"
              if plain.is_file() else _GET[dataset])
      raise OfflineDataError(f"{path}: missing. Fix: {hint}.")

  counts, digests = {}, {}
  for role, (_, split, magic) in _FILES.items():
    _, header_len, item = _layout(magic)
    data = _gunzip(dataset, paths[role], header_len + _COUNTS[split] * item)
    counts[role] = _check_idx(dataset, paths[role], data, magic)
    digests[role] = hashlib.sha256(data).hexdigest()

  for split, prefix in (("train", "train"), ("test", "t10k")):
    images, labels = f"{split}_images", f"{split}_labels"
    if counts[images] != counts[labels]:
      raise _fail(dataset, paths[labels],
                  f"count mismatch: it holds {counts[labels]} labels but "
                  f"{paths[images].name} holds {counts[images]} images")
    if counts[images] != _COUNTS[prefix]:
      raise _fail(dataset, paths[images],
                  f"wrong count: {counts[images]} images, expected {_COUNTS[prefix]} "
                  f"for the {split} split")
  for role, (name, _, _) in _FILES.items():
    want = _CONTENT_SHA256[dataset][name]
    if digests[role] != want:
      raise _fail(dataset, paths[role],
                  f"not the published {dataset} file: the sha256 of its decompressed "
                  f"contents is {digests[role]}, expected {want} (another dataset's "
                  f"file, or modified?)")
  return paths


def _stage_downloads(builder, files: dict[str, Path], download_dir: Path) -> None:
  """Puts `files` in `download_dir` as TFDS's cached downloads of `builder`'s URLs."""
  from tensorflow_datasets.core.download import resource

  by_name = {path.name: path for path in files.values()}
  url_infos = builder.url_infos
  if sorted(info.filename for info in url_infos.values()) != sorted(by_name):
    raise RuntimeError(f"TFDS registers unexpected files for {builder.name}: "
                       f"{sorted(url_infos)}; this TFDS version is not supported.")
  for url, info in url_infos.items():
    # Same layout as DownloadManager._get_dl_path: <download_dir>/<dataset>/<name>.
    dst = download_dir / builder.name / resource.get_dl_fname(url, info.checksum)
    dst.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(by_name[info.filename], dst)
    # What DownloadManager writes after a download; its presence marks dst cached.
    meta = {"dataset_names": [builder.name], "original_fname": info.filename,
            "url_info": info.asdict(), "urls": [url]}
    dst.with_name(dst.name + ".INFO").write_text(json.dumps(meta, sort_keys=True))


def _install(built: Path, final: Path, staging: Path) -> None:
  """Moves the built dataset folder to `final`, replacing (atomically per rename) any old one."""
  final.parent.mkdir(parents=True, exist_ok=True)
  previous = None
  if final.exists():
    previous = staging / "previous"
    os.replace(final, previous)
  try:
    os.replace(built, final)
  except BaseException:
    if previous is not None:
      os.replace(previous, final)
    raise


def prepare(dataset: str, from_dir: str | os.PathLike,
            data_dir: str | os.PathLike | None = None, *, overwrite: bool = False) -> str:
  """Builds TFDS's `dataset` in `data_dir` from local IDX files, with no network.

  Afterwards ``tfds.data_source(dataset, split=..., data_dir=data_dir)`` and
  ``tfds.builder(dataset, data_dir=data_dir)`` work offline. If the dataset is
  already prepared there, nothing is done (unless `overwrite`).

  Args:
    dataset: one of `SUPPORTED` ("mnist", "fashion_mnist").
    from_dir: folder with the four IDX ``.gz`` files (see `validate_idx_files`).
    data_dir: TFDS data directory; default $TFDS_DATA_DIR, else ~/tensorflow_datasets.
    overwrite: rebuild even if the dataset is already prepared; the old copy is
      replaced only once the new one is built.

  Returns:
    The data directory used (absolute).

  Raises:
    OfflineDataError: unsupported dataset, unusable files (nothing is written
      then), or TensorFlow missing.
  """
  _check_supported(dataset)
  data_dir = data.resolve_data_dir(data_dir)
  import tensorflow_datasets as tfds  # Heavy import, needed only here.

  builder = tfds.builder(dataset, data_dir=data_dir)
  if builder.is_prepared() and not overwrite:
    _log.info("%s is already prepared in %s; nothing to do (overwrite=True rebuilds "
              "it).", dataset, builder.data_dir)
    if builder.info.file_format.value != "array_record":
      _log.warning("%s in %s is in %s format, which tfds.data_source cannot read; "
                   "overwrite=True rebuilds it as array_record.", dataset, data_dir,
                   builder.info.file_format.value)
    return data_dir

  files = validate_idx_files(dataset, from_dir)
  if importlib.util.find_spec("tensorflow") is None:
    raise OfflineDataError("Building a TFDS dataset needs TensorFlow. Fix: pip install "
                           "tensorflow-cpu (or the package's [prepare] extra).")

  root = Path(data_dir)
  created = [p for p in (*reversed(root.parents), root, root / builder.name)
             if not p.exists()]  # Removed again if the build fails.
  root.mkdir(parents=True, exist_ok=True)
  staging = Path(tempfile.mkdtemp(prefix=f".{dataset}-offline-", dir=root))
  done = False
  try:
    _log.info("Building %s from %s in %s.", dataset, from_dir, data_dir)
    downloads = staging / "downloads"
    _stage_downloads(builder, files, downloads)
    staged = tfds.builder(dataset, data_dir=staging / "data")
    staged.download_and_prepare(
        download_dir=downloads,
        # No GCS lookup: it needs the network even for array_record.
        download_config=tfds.download.DownloadConfig(try_download_gcs=False),
        file_format="array_record")
    _install(Path(staged.data_dir), Path(builder.data_dir), staging)
    done = True
  finally:
    shutil.rmtree(staging, ignore_errors=True)
    if not done:
      for path in reversed(created):
        if path.is_dir() and not any(path.iterdir()):
          path.rmdir()
  return data_dir
