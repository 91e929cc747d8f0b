"""Tests of bnet_jax.offline: real MNIST / Fashion-MNIST built offline into TFDS.

MNIST comes from ../shared/datasets/mnist beside the repository (override with
$BNET_MNIST_DIR); Fashion-MNIST from `apt-get install dataset-fashion-mnist`
(override with $BNET_FASHION_MNIST_DIR). Each real dataset is built once.
"""

import gzip
import logging
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from bnet_jax import offline

REPO = Path(__file__).resolve().parents[1]
MNIST_DIR = Path(os.environ.get("BNET_MNIST_DIR")
                 or REPO.parent / "shared" / "datasets" / "mnist")
FASHION_MNIST_DIR = Path(os.environ.get("BNET_FASHION_MNIST_DIR")
                         or "/usr/share/datasets/fashion-mnist")
FILES = ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz",
         "t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")


def _raw(src: Path, prefix: str) -> tuple[np.ndarray, np.ndarray]:
  """Images (N, 28, 28) and labels (N,) of an IDX split, read directly."""
  images = np.frombuffer(gzip.open(src / f"{prefix}-images-idx3-ubyte.gz").read(),
                         np.uint8, offset=16).reshape(-1, 28, 28)
  labels = np.frombuffer(gzip.open(src / f"{prefix}-labels-idx1-ubyte.gz").read(),
                         np.uint8, offset=8)
  return images, labels


def _build(dataset: str, src: Path, data_dir: Path) -> float:
  """Prepares `dataset` with every network path of TFDS made to fail; returns seconds."""
  from tensorflow_datasets.core.download import downloader
  from tensorflow_datasets.core.utils import gcs_utils

  def no_network(*args, **kwargs):
    raise AssertionError("TFDS tried to use the network")

  with pytest.MonkeyPatch.context() as mp:
    mp.setattr(downloader._Downloader, "download", no_network)
    mp.setattr(gcs_utils, "is_dataset_on_gcs", no_network)
    start = time.perf_counter()
    assert offline.prepare(dataset, src, data_dir) == str(data_dir)
    return time.perf_counter() - start


def _check_built(dataset: str, src: Path, data_dir: Path) -> None:
  """Sizes, shapes and labels of the built dataset, read through tfds.data_source."""
  import tensorflow_datasets as tfds

  assert tfds.builder(dataset, data_dir=data_dir).is_prepared()
  for split, prefix, n in (("train", "train", 60000), ("test", "t10k", 10000)):
    source = tfds.data_source(dataset, split=split, data_dir=data_dir)
    assert len(source) == n
    images, labels = _raw(src, prefix)
    index_of = {img.tobytes(): i for i, img in enumerate(images)}  # TFDS reorders.
    for i in np.random.default_rng(0).choice(n, 8, replace=False):
      example = source[int(i)]
      image, label = example["image"], int(example["label"])
      assert image.shape == (28, 28, 1) and image.dtype == np.uint8
      assert 0 <= label <= 9
      assert label == labels[index_of[image[..., 0].tobytes()]]


def _assert_no_dataset(data_dir: Path, before: set[str] = frozenset()) -> None:
  """`data_dir` holds what it held before (nothing if it did not exist)."""
  if not before:
    assert not data_dir.exists(), sorted(data_dir.rglob("*"))
  else:
    assert {p.name for p in data_dir.iterdir()} == before


@pytest.fixture(scope="module")
def mnist_dir(tmp_path_factory) -> Path:
  """A data dir with MNIST built once from the real files."""
  assert MNIST_DIR.is_dir(), f"MNIST files not found in {MNIST_DIR} (set $BNET_MNIST_DIR)"
  data_dir = tmp_path_factory.mktemp("mnist_data")
  seconds = _build("mnist", MNIST_DIR, data_dir)
  print(f"\nmnist built in {seconds:.1f} s")
  return data_dir


@pytest.fixture
def src(tmp_path) -> Path:
  """A writable copy of the real MNIST files."""
  copy = tmp_path / "src"
  copy.mkdir()
  for name in FILES:
    shutil.copyfile(MNIST_DIR / name, copy / name)
  return copy


def test_mnist_builds_offline(mnist_dir):
  _check_built("mnist", MNIST_DIR, mnist_dir)
  assert sorted(p.name for p in mnist_dir.iterdir()) == ["mnist"]  # No leftovers.


def test_fashion_mnist_builds_offline(tmp_path):
  assert FASHION_MNIST_DIR.is_dir(), (
      f"Fashion-MNIST files not found in {FASHION_MNIST_DIR}: run "
      f"`apt-get install dataset-fashion-mnist` (or set $BNET_FASHION_MNIST_DIR).")
  seconds = _build("fashion_mnist", FASHION_MNIST_DIR, tmp_path / "data")
  print(f"\nfashion_mnist built in {seconds:.1f} s")
  _check_built("fashion_mnist", FASHION_MNIST_DIR, tmp_path / "data")


def test_second_prepare_is_a_fast_no_op(mnist_dir, caplog):
  version_dir = next((mnist_dir / "mnist").iterdir())
  before = {p.name: p.stat().st_mtime_ns for p in version_dir.iterdir()}
  caplog.set_level(logging.INFO, logger=offline.__name__)
  start = time.perf_counter()
  # The source is not even read: the dataset is there already.
  assert offline.prepare("mnist", "no/such/dir", mnist_dir) == str(mnist_dir)
  assert time.perf_counter() - start < 5
  assert "already prepared" in caplog.text
  assert {p.name: p.stat().st_mtime_ns for p in version_dir.iterdir()} == before


def test_validate_idx_files_returns_the_four_paths():
  paths = offline.validate_idx_files("mnist", MNIST_DIR)
  assert {k: p.name for k, p in paths.items()} == {
      "train_images": FILES[0], "train_labels": FILES[1],
      "test_images": FILES[2], "test_labels": FILES[3]}


def _truncate(path: Path) -> None:
  path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _not_gzip(path: Path) -> None:
  path.write_bytes(gzip.decompress(path.read_bytes()))


def _regzip(path: Path, edit) -> None:
  data = bytearray(gzip.decompress(path.read_bytes()))
  edit(data)
  path.write_bytes(gzip.compress(bytes(data), compresslevel=1, mtime=0))


def _magic_2051(data: bytearray) -> None:
  data[2:4] = (2051).to_bytes(2, "big")


def _label_10(data: bytearray) -> None:
  data[8 + 123] = 10


def _swap_labels(data: bytearray) -> None:  # Still valid IDX, but not MNIST.
  data[8], data[9] = data[9], data[8]


def _short_idx(data: bytearray) -> None:
  del data[-784:]


BAD_FILES = {
    # case: (file, how to damage it, words the message must contain)
    "missing": (FILES[1], Path.unlink, ["missing", "copy"]),
    "truncated": (FILES[0], _truncate,
                  ["truncated", "expected 47040016 decompressed bytes, got", "re-copy"]),
    "not_gzip": (FILES[2], _not_gzip, ["not a gzip file", "re-copy"]),
    "count_mismatch": (FILES[1], lambda p: shutil.copyfile(MNIST_DIR / FILES[3], p),
                       ["count mismatch", "10000 labels", "60000 images", "re-copy"]),
    "wrong_magic": (FILES[1], lambda p: _regzip(p, _magic_2051),
                    ["wrong magic number 2051, expected 2049", "re-copy"]),
    "label_out_of_range": (FILES[3], lambda p: _regzip(p, _label_10),
                           ["label 10 out of range", "re-copy"]),
    "short_idx": (FILES[2], lambda p: _regzip(p, _short_idx),
                  ["truncated", "expected 7840016 bytes, got 7839232", "re-copy"]),
    "not_published": (FILES[3], lambda p: _regzip(p, _swap_labels),
                      ["not the published mnist file", "sha256", "re-copy"]),
}


@pytest.mark.parametrize("case", sorted(BAD_FILES))
@pytest.mark.parametrize("data_dir_exists", [False, True])
def test_bad_file_raises_and_writes_nothing(case, data_dir_exists, src, tmp_path):
  name, damage, words = BAD_FILES[case]
  damage(src / name)
  data_dir = tmp_path / "data"
  before = set()
  if data_dir_exists:
    data_dir.mkdir()
    (data_dir / "other.txt").write_text("not ours")
    before = {"other.txt"}
  with pytest.raises(offline.OfflineDataError) as e:
    offline.prepare("mnist", src, data_dir)
  message = str(e.value)
  assert str(src / name) in message
  for word in words:
    assert word in message
  _assert_no_dataset(data_dir, before)


def test_missing_folder_and_fashion_hint(tmp_path):
  with pytest.raises(offline.OfflineDataError, match="apt-get install dataset-fashion-mnist"):
    offline.validate_idx_files("fashion_mnist", tmp_path / "nowhere")
  with pytest.raises(offline.OfflineDataError, match=r"nowhere: folder not found"):
    offline.prepare("mnist", tmp_path / "nowhere", tmp_path / "data")
  _assert_no_dataset(tmp_path / "data")


def test_uncompressed_file_gets_a_gzip_hint(src):
  (src / FILES[1]).write_bytes(gzip.decompress((src / FILES[1]).read_bytes()))
  (src / FILES[1]).rename(src / FILES[1].removesuffix(".gz"))
  with pytest.raises(offline.OfflineDataError, match="missing.*gzip -nk"):
    offline.validate_idx_files("mnist", src)


@pytest.mark.parametrize("dataset", ["cifar10", "MNIST"])
def test_unsupported_dataset(dataset, tmp_path):
  with pytest.raises(ValueError, match="supported: mnist, fashion_mnist") as e:
    offline.prepare(dataset, MNIST_DIR, tmp_path / "data")
  assert "cifar10 cannot be prepared offline" in str(e.value)
  _assert_no_dataset(tmp_path / "data")


def _fail_split_generators(monkeypatch):
  from tensorflow_datasets.image_classification import mnist

  def boom(self, dl_manager):
    raise RuntimeError("build failed")

  monkeypatch.setattr(mnist.MNIST, "_split_generators", boom)


def test_failed_build_leaves_nothing(monkeypatch, tmp_path):
  _fail_split_generators(monkeypatch)
  data_dir = tmp_path / "a" / "data"
  with pytest.raises(RuntimeError, match="build failed"):
    offline.prepare("mnist", MNIST_DIR, data_dir)
  assert list(tmp_path.iterdir()) == []  # Not even the folders it created.


def test_failed_overwrite_keeps_the_old_dataset(monkeypatch, mnist_dir, tmp_path):
  data_dir = tmp_path / "data"
  shutil.copytree(mnist_dir, data_dir)
  before = sorted(p.relative_to(data_dir) for p in data_dir.rglob("*"))
  _fail_split_generators(monkeypatch)
  with pytest.raises(RuntimeError, match="build failed"):
    offline.prepare("mnist", MNIST_DIR, data_dir, overwrite=True)
  assert sorted(p.relative_to(data_dir) for p in data_dir.rglob("*")) == before


def test_overwrite_rebuilds(monkeypatch, mnist_dir, tmp_path):
  import itertools

  import tensorflow_datasets as tfds
  from tensorflow_datasets.image_classification import mnist

  data_dir = tmp_path / "data"
  shutil.copytree(mnist_dir, data_dir)
  generate = mnist.MNIST._generate_examples
  monkeypatch.setattr(mnist.MNIST, "_generate_examples",  # A quick, visibly new build.
                      lambda self, **kw: itertools.islice(generate(self, **kw), 3))
  offline.prepare("mnist", MNIST_DIR, data_dir, overwrite=True)
  assert len(tfds.data_source("mnist", split="train", data_dir=data_dir)) == 3
  assert sorted(p.name for p in data_dir.iterdir()) == ["mnist"]


def _run_cli(*args: str) -> subprocess.CompletedProcess:
  return subprocess.run([sys.executable, "-m", "experiments.prepare_data", *args],
                        cwd=REPO, capture_output=True, text=True, timeout=300)


def test_cli_missing_file_exits_2(src, tmp_path):
  (src / FILES[0]).unlink()
  result = _run_cli("--dataset=mnist", f"--from_dir={src}", f"--data_dir={tmp_path / 'data'}")
  assert result.returncode == 2, result.stderr
  assert f"error: {src / FILES[0]}: missing. Fix:" in result.stderr
  assert "Traceback" not in result.stderr
  _assert_no_dataset(tmp_path / "data")


def test_cli_reports_prepared_dataset(mnist_dir):
  result = _run_cli("--dataset=mnist", f"--from_dir={MNIST_DIR}", f"--data_dir={mnist_dir}")
  assert result.returncode == 0, result.stderr
  assert f"in {mnist_dir}: train 60000, test 10000 examples" in result.stdout
  assert "already prepared" in result.stderr
