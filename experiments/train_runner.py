"""What the training benchmarks share: KEY=VALUE network options, and our jitted joint
train step on a fixed random batch, ready to time.

`experiments.benchmark_stages`, `benchmark_train` and `benchmark_pytorch` time the same
step (Adam, lr 1e-3, constant schedule, every exit weighted 1), so their figures compare.
This module defines no flags, so each of them can import it.
"""

import ast
from collections.abc import Callable

import jax
import ml_collections
import numpy as np
from absl import app

from bnet_jax import data, nets, train


def parse_options(items: list[str]) -> dict:
  """["depth=110", "placement=paper"] -> {"depth": 110, "placement": "paper"}."""
  options = {}
  for item in items:
    key, sep, value = item.partition("=")
    if not sep:
      raise app.UsageError(f"--options takes KEY=VALUE items; got {item!r}.")
    try:
      options[key] = ast.literal_eval(value)
    except (ValueError, SyntaxError):
      options[key] = value  # A bare string such as paper.
  return options


def network_options(items: list[str], dataset: str) -> dict:
  """`--options` items (`parse_options`) sized for `dataset`'s images and classes
  (``input_shape``, ``num_classes``) unless they set them; with `dataset` "", as given."""
  options = parse_options(items)
  if not dataset:
    return options
  spec = data.spec(dataset)
  return {"input_shape": spec.image_shape, "num_classes": spec.num_classes, **options}


def random_batch(net: nets.Network, batch_size: int) -> dict[str, np.ndarray]:
  """A fixed batch: (B, H, W, C) float32 normal images, (B,) int32 labels."""
  rng = np.random.default_rng(0)
  return {"image": rng.standard_normal((batch_size, *net.input_shape)).astype(np.float32),
          "label": rng.integers(0, net.num_classes, batch_size).astype(np.int32)}


def joint_step_runner(net: nets.Network, batch: dict[str, np.ndarray], steps: int,
                      variables: nets.Variables | None = None) -> Callable[[], None]:
  """A callable that runs `steps` joint train steps on `batch` and waits for them.

  Starts from `variables` (default: `nets.init` with key 0); the step donates its
  state, so `variables` are used up by the first call.
  """
  phase = train.Phase("joint", net, (1.0,) * net.num_exits, 0, 1)
  config = ml_collections.ConfigDict(dict(optimizer="adam", learning_rate=1e-3, beta1=0.9,
                                          beta2=0.999, weight_decay=0.0,
                                          lr_schedule="constant"))
  tx = train.make_optimizer(config, 1)
  if variables is None:
    variables = nets.init(net, jax.random.key(0))
  state = [train.initial_state(phase, tx, variables, 0)]
  step = train.make_train_step(phase, tx)
  key = jax.random.key(0)

  def run() -> None:
    for _ in range(steps):
      state[0], metrics = step(state[0], batch, key)
    jax.block_until_ready(metrics)

  return run
