"""Shared fixtures: a prepared real-MNIST TFDS data dir (helpers.py has the rest)."""

import os

import pytest

from helpers import REPO

SHARED_MNIST = REPO.parent / "shared" / "datasets" / "mnist"


@pytest.fixture(scope="session")
def mnist_data_dir(tmp_path_factory) -> str:
  """A TFDS data dir holding real MNIST: $TFDS_DATA_DIR if prepared there, else built."""
  import tensorflow_datasets as tfds

  from bnet_jax import offline

  env = os.environ.get("TFDS_DATA_DIR")
  if env and tfds.builder("mnist", data_dir=env).is_prepared():
    return env
  source = os.environ.get("BNET_MNIST_DIR", str(SHARED_MNIST))
  return offline.prepare("mnist", source, tmp_path_factory.mktemp("tfds"))
