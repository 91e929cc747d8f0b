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

# Layer implementations for inference (same parameters as training). B-LeNet's were
# measured with `experiments.benchmark` runs: conv1 + pool computed by pooling
# phase was 7x faster at batch 256 than XLA's 1-channel convolution, and XLA's own
# convolution beat im2col and shifted forms for the wider layers at batch 1 and 256.
_INFERENCE_OPTIONS: dict[str, dict[str, str]] = {
    "b_lenet": {"conv1_impl": "phase", "conv_impl": "xla", "exit_conv_impl": "xla"},
    "lenet": {"conv1_impl": "phase", "conv_impl": "xla"},
}


def inference_options(name: str) -> dict[str, str]:
  """The fastest known layer options for inference with network `name` (may be empty)."""
  return dict(_INFERENCE_OPTIONS.get(name, {}))


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
