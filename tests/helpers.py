"""Helpers shared by the test files: mock-data training runs and small random networks."""

import math
import os
import pathlib
from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import tensorflow_datasets as tfds

from bnet_jax import cascade, nets, train
from experiments.configs import lenet_mnist

REPO = pathlib.Path(__file__).resolve().parents[1]

# The tie band of the cascade tests (docs/design.md): XLA may round differently at
# different batch sizes, so a score within BAND of its threshold may change exit.
BAND = 1e-4

# tfds.testing.mock_data ignores split slicing: every split, validation included, has
# MOCK_EXAMPLES rows, so training runs 4 steps of 256 per epoch.
MOCK_EXAMPLES = 1024


def small_config(**overrides):
  c = lenet_mnist.get_config("smoke")
  c.num_validation = 256
  c.data_dir = "/nonexistent-under-mock"
  c.download = False
  c.eval_batch_size = 128
  c.update(overrides)
  return c


def run(config, workdir):
  with tfds.testing.mock_data(num_examples=MOCK_EXAMPLES):
    return train.train_and_evaluate(config, str(workdir))


def snapshot(path):
  return {os.path.join(d, f): os.stat(os.path.join(d, f)).st_mtime_ns
          for d, _, files in os.walk(path) for f in files}


# ---- a small 3-exit network: a headless stage and BatchNorm in eval mode ----------

class ConvStage(nn.Module):
  """(B, 8, 8, 2) -> (B, 8, 8, 4)."""

  @nn.compact
  def __call__(self, x, train=False):
    return nn.relu(nn.Conv(4, (3, 3))(x))


class BatchNormStage(nn.Module):
  """(B, 8, 8, 4) -> (B, 4, 4, 6): conv, BatchNorm (running statistics unless train)."""

  @nn.compact
  def __call__(self, x, train=False):
    x = nn.Conv(6, (3, 3))(x)
    x = nn.BatchNorm(use_running_average=not train)(x)
    return nn.avg_pool(nn.relu(x), (2, 2), (2, 2))


class DenseStage(nn.Module):
  """(B, ...) -> (B, 16)."""

  @nn.compact
  def __call__(self, x, train=False):
    return nn.relu(nn.Dense(16)(x.reshape(x.shape[0], -1)))


class Head(nn.Module):
  """(B, ...) -> (B, 5) logits."""

  @nn.compact
  def __call__(self, x, train=False):
    return nn.Dense(5)(x.reshape(x.shape[0], -1))


def tiny_network() -> nets.Network:
  return nets.Network(
      name="tiny",
      stages=(nets.Stage(ConvStage(), Head()),
              nets.Stage(BatchNormStage()),  # No head: part of exit 1's segment.
              nets.Stage(DenseStage(), Head()),
              nets.Stage(DenseStage(), Head())),
      input_shape=(8, 8, 2), num_classes=5)


def random_variables(net: nets.Network, seed: int) -> nets.Variables:
  """Random variables of `net`'s shapes; numpy-drawn, since compiling Flax's
  truncated-normal initialisers takes seconds per shape on these machines."""
  shapes = jax.eval_shape(lambda key: nets.init(net, key), jax.random.key(0))
  rng = np.random.default_rng(seed)

  def draw(path, s):
    if jax.tree_util.keystr(path).endswith("['var']"):  # BatchNorm variance: positive.
      return jnp.asarray(rng.uniform(0.5, 2.0, s.shape), s.dtype)
    fan_in = math.prod(s.shape[:-1]) if len(s.shape) > 1 else 1
    # He scaling (biases: std sqrt 2): softmaxes neither near-uniform nor saturated.
    return jnp.asarray(rng.normal(size=s.shape) * math.sqrt(2 / fan_in), s.dtype)

  return jax.tree_util.tree_map_with_path(draw, shapes)


class Case(NamedTuple):
  """A network, its variables, 100 images and memoised reference outputs."""
  net: nets.Network
  variables: nets.Variables
  x: np.ndarray
  scores: dict  # criterion -> (E, 100) scores of every exit at batch 100.
  cascades: dict  # (criterion, mode) -> a Cascade shared by the tests.

  def all_scores(self, criterion: str) -> np.ndarray:
    if criterion not in self.scores:
      self.scores[criterion] = np.asarray(
          cascade.logits_and_scores(self.net, criterion, self.variables, jnp.asarray(self.x))[1])
    return self.scores[criterion]

  def cascade(self, criterion: str = "entropy", mode: str = "auto", buckets=None
              ) -> cascade.Cascade:
    key = (criterion, mode, buckets)
    if key not in self.cascades:
      self.cascades[key] = cascade.Cascade(
          self.net, self.variables, [0.0] * (self.net.num_exits - 1), criterion=criterion,
          latency_mode=mode, buckets=buckets)
    return self.cascades[key]


def random_thresholds(scores, rng):
  """E-1 thresholds, each midway across the widest gap between the sorted scores of its
  exit in a random window of 10 (between the 20% and 80% quantiles)."""
  out = []
  for s in scores[:-1]:
    s = np.sort(s)
    i = rng.integers(len(s) // 5, 7 * len(s) // 10)
    i += np.argmax(np.diff(s[i:i + 11]))
    out.append(float((s[i] + s[i + 1]) / 2))
  return out
