"""Networks by name. A new family registers its constructors here."""

from collections.abc import Callable

from bnet_jax.nets import alexnet, lenet, resnet
from bnet_jax.nets.core import Network

_REGISTRY: dict[str, Callable[..., Network]] = {
    "b_lenet": lenet.b_lenet,
    "lenet": lenet.lenet,
    "b_alexnet": alexnet.b_alexnet,  # Options: placement ("code" | "paper"), conv_impl.
    "alexnet": alexnet.alexnet,
    "b_resnet": resnet.b_resnet,  # Options: depth (6n+2, default 110), placement, conv_impl.
    "resnet": resnet.resnet,
}

# Layer implementations for inference (same parameters as training), by batch size:
# (largest batch, options) tiers, the last for every larger batch. B-LeNet's were
# measured segment by segment (the segment programs of `cascade`, activations
# returned) at batch 1 on one core and 8 to 2048 on two (2026-11-30): conv1 + pool
# by pooling phase beat XLA's one-channel convolution everywhere (7x at batch 256);
# XLA's own convolution was fastest for exit 1 (22.7 us per sample at 256 against
# 26.2 by pooling phase and 35.2 channel-padded); stage 2 ran fastest with
# channel-padded XLA convolutions ("xla_pad8": 132 vs 160 us at batch 1, 46 vs 60
# per sample at 256 and 2048) except from 3 to 64 rows, the buckets of the samples
# that continue past exit 1, where pooling-phase im2col won (43 vs 78 per sample at 32).
# At batch 1 "tapwise" convolutions beat both for exit 1 and stage 2 (exit-1 program
# 46 vs 64-68 us, main path 147 vs 162 us, one core, trained B-LeNet, 2026-11-30);
# at batch 256 they were 3x slower.
_INFERENCE_OPTIONS: dict[str, tuple[tuple[int | None, dict[str, str]], ...]] = {
    "b_lenet": (
        (1, {"conv1_impl": "phase", "exit_conv_impl": "tapwise", "conv_impl": "tapwise"}),
        (2, {"conv1_impl": "phase", "exit_conv_impl": "xla", "conv_impl": "xla_pad8"}),
        (64, {"conv1_impl": "phase", "exit_conv_impl": "xla", "conv_impl": "phase_im2col"}),
        (None, {"conv1_impl": "phase", "exit_conv_impl": "xla", "conv_impl": "xla_pad8"}),
    ),
}
_INFERENCE_OPTIONS["lenet"] = tuple(
    (b, {k: v for k, v in o.items() if k != "exit_conv_impl"})
    for b, o in _INFERENCE_OPTIONS["b_lenet"])


def inference_options(name: str, batch_size: int | None = None) -> dict[str, str]:
  """The fastest known layer options for inference with network `name` (may be empty).

  Args:
    name: a registered network name.
    batch_size: the batch the options should suit (None: large batches).
  """
  for most, options in _INFERENCE_OPTIONS.get(name, ()):
    if most is None or (batch_size is not None and batch_size <= most):
      return dict(options)
  return {}


def names() -> list[str]:
  """Registered network names."""
  return sorted(_REGISTRY)


def get(name: str, **options) -> Network:
  """Builds the network registered as `name` with its keyword `options`."""
  if name not in _REGISTRY:
    raise ValueError(f"Unknown model {name!r}; registered models: {names()}.")
  try:
    return _REGISTRY[name](**options)
  except TypeError as e:
    raise ValueError(f"Bad options {options} for model {name!r}: {e}") from e
