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

AUTO = "auto"

# The layer-implementation options of each network ("auto" by default in configs).
_IMPL_FIELDS: dict[str, tuple[str, ...]] = {
    "b_lenet": ("conv1_impl", "conv_impl"),  # exit_conv_impl follows conv_impl unless given.
    "lenet": ("conv1_impl", "conv_impl"),
    "b_alexnet": ("conv_impl",),
    "alexnet": ("conv_impl",),
    "b_resnet": ("conv_impl",),
    "resnet": ("conv_impl",),
}

# Measured choices, by platform then network: "train" for the joint train step,
# "inference" as (largest batch, options) tiers, the last for every larger batch.
# Measured on a 2-core CPU only (docs/performance.md): B-LeNet's conv1 by pooling phase
# or batch-last im2col avoids XLA:CPU's slow one-input-channel convolution; "tapwise"
# wins at batch 1, channel padding ("xla_pad8") from batch 2, pooling-phase im2col for
# the small buckets of samples that continue past exit 1. Platforms and networks
# without an entry get XLA's own convolution ("xla": cuDNN on GPU, the matrix units on TPU).
_MEASURED: dict[str, dict[str, dict]] = {
    "cpu": {
        "b_lenet": {
            "train": {"conv1_impl": "batch_minor", "conv_impl": "xla_pad8_dotgrad"},
            "inference": (
                (1, {"conv1_impl": "phase", "exit_conv_impl": "tapwise", "conv_impl": "tapwise"}),
                (2, {"conv1_impl": "phase", "exit_conv_impl": "xla", "conv_impl": "xla_pad8"}),
                (64, {"conv1_impl": "phase", "exit_conv_impl": "xla",
                      "conv_impl": "phase_im2col"}),
                (None, {"conv1_impl": "phase", "exit_conv_impl": "xla", "conv_impl": "xla_pad8"}),
            ),
        },
    },
}
_MEASURED["cpu"]["lenet"] = {
    "train": {k: v for k, v in _MEASURED["cpu"]["b_lenet"]["train"].items()
              if k in _IMPL_FIELDS["lenet"]},
    "inference": tuple((b, {k: v for k, v in o.items() if k in _IMPL_FIELDS["lenet"]})
                       for b, o in _MEASURED["cpu"]["b_lenet"]["inference"]),
}


def platform() -> str:
  """The platform JAX computes on: "cpu", "gpu" or "tpu" (initialises the backends)."""
  import jax  # noqa: PLC0415 -- the registry itself does not need JAX at import.
  return jax.default_backend()


def _choices(name: str, platform_name: str, batch_size: int | None) -> dict[str, str]:
  """Every implementation field of `name` as chosen for a platform and batch."""
  measured = _MEASURED.get(platform_name, {}).get(name)
  chosen = {field: "xla" for field in _IMPL_FIELDS.get(name, ())}
  if measured is None:
    return chosen
  if batch_size is None:
    return {**chosen, **measured["train"]}
  for most, options in measured["inference"]:
    if most is None or batch_size <= most:
      return {**chosen, **options}
  return chosen


def resolve_options(name: str, options: dict | None = None, *, platform_name: str | None = None,
                    batch_size: int | None = None) -> dict:
  """`options` with each layer-implementation field that is "auto" or absent chosen.

  Only implementations are chosen; they never change parameters, so a checkpoint
  runs with any of them.

  Args:
    name: a registered network name.
    options: the network's keyword options (e.g. a config's ``model_options``).
    platform_name: "cpu", "gpu", "tpu" (None: the running backend).
    batch_size: choose for inference at this batch (None: for training).

  Returns:
    A new dict: `options` with every implementation field set explicitly.
  """
  options = dict(options or {})
  fields = [f for f in _IMPL_FIELDS.get(name, ()) if options.get(f, AUTO) == AUTO]
  if fields:
    chosen = _choices(name, platform_name or platform(), batch_size)
    options.update({f: chosen[f] for f in fields})
  return options


def inference_options(name: str, batch_size: int | None = None,
                      platform_name: str | None = None) -> dict[str, str]:
  """The fastest known layer implementations for inference with `name` (every field).

  Args:
    name: a registered network name.
    batch_size: the batch the options should suit (None: large batches).
    platform_name: "cpu", "gpu", "tpu" (None: the running backend).
  """
  return _choices(name, platform_name or platform(),
                  batch_size if batch_size is not None else 1 << 30)


def names() -> list[str]:
  """Registered network names."""
  return sorted(_REGISTRY)


def get(name: str, **options) -> Network:
  """Builds the network registered as `name` with its keyword `options`.

  Layer-implementation options that are "auto" or not given are chosen for training
  on the running platform (`resolve_options`).
  """
  if name not in _REGISTRY:
    raise ValueError(f"Unknown model {name!r}; registered models: {names()}.")
  options = resolve_options(name, options)
  try:
    return _REGISTRY[name](**options)
  except TypeError as e:
    raise ValueError(f"Bad options {options} for model {name!r}: {e}") from e
