"""Networks by name. A new family registers its constructors here."""

from collections.abc import Callable

from bnet_jax.nets import lenet
from bnet_jax.nets.core import Network

_REGISTRY: dict[str, Callable[..., Network]] = {
    "b_lenet": lenet.b_lenet,
    "lenet": lenet.lenet,
}


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
