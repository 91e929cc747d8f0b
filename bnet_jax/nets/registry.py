"""Networks by name. A new family registers its constructors here.

Every constructor takes the keyword options ``input_shape`` ((H, W, C)) and
``num_classes``, which `training.checkpoint.network` fills from the config's dataset.
"""

from collections.abc import Callable, Mapping
from typing import Any

from bnet_jax.nets import alexnet, lenet, onednn, resnet
from bnet_jax.nets.core import Network

_REGISTRY: dict[str, Callable[..., Network]] = {
    "b_lenet": lenet.b_lenet,
    "lenet": lenet.lenet,
    # Options: placement ("code" | "paper"), exit_heads ("authors" | "trunk"), conv_*.
    "b_alexnet": alexnet.b_alexnet,
    "alexnet": alexnet.alexnet,
    # Options: depth (6n+2, default 110), placement, exit_heads, conv_*.
    "b_resnet": resnet.b_resnet,
    "resnet": resnet.resnet,
}

AUTO = "auto"

# The layer-implementation options of each network that "auto" (or absence) chooses;
# configs give "auto". Each "<conv>_impl" (a `layers.CONV_IMPLS` name; for
# "strided_conv_impl" a `layers.STRIDED_CONV_IMPLS` one) is chosen with its
# "<conv>_kernel_grad" (a `layers.KERNEL_GRADS` name, `_kernel_grad_field`).
_IMPL_FIELDS: dict[str, tuple[str, ...]] = {
    "b_lenet": ("conv1_impl", "conv_impl"),
    "lenet": ("conv1_impl", "conv_impl"),
    "b_alexnet": ("conv_impl",),
    "alexnet": ("conv_impl",),
    "b_resnet": ("conv_impl", "strided_conv_impl"),
    "resnet": ("conv_impl", "strided_conv_impl"),
}
# BatchNorm implementation options (`layers.NORM_IMPLS` names; no kernel gradient).
_NORM_FIELDS: dict[str, tuple[str, ...]] = {
    "b_resnet": ("norm_impl",),
    "resnet": ("norm_impl",),
}
# Implementation options that "auto" leaves alone: unless given, they follow another
# (exit 1's convolution follows conv_impl and conv_kernel_grad).
_FOLLOWING_FIELDS: dict[str, tuple[str, ...]] = {
    "b_lenet": ("exit_conv_impl",),
    "lenet": ("exit_conv_impl",),
}

# Measured choices, by platform then network: "train" for the joint train step,
# "inference" as (largest batch, options) tiers, the last for every larger batch;
# options not named are "xla" with "autodiff". Measured on CPU only (docs/performance.md):
# B-LeNet's conv1 by pooling phase or batch-last im2col avoids XLA:CPU's slow
# one-input-channel convolution; the all-taps matmul wins at batch 1, channel padding
# from batch 2, pooling-phase im2col for the small buckets of samples that continue past
# exit 1; the "dot" kernel gradient avoids XLA:CPU's slow kernel-gradient convolution.
# Platforms and networks without an entry get XLA's own convolution ("xla": cuDNN on GPU,
# the matrix units on TPU).
_MEASURED: dict[str, dict[str, dict]] = {
    "cpu": {
        "b_lenet": {
            "train": {"conv1_impl": "im2col_batch_last", "conv_impl": "xla_channels_pad8",
                      "conv_kernel_grad": "dot"},
            "inference": (
                (1, {"conv1_impl": "pool_phase", "exit_conv_impl": "all_taps_matmul",
                     "conv_impl": "all_taps_matmul"}),
                (2, {"conv1_impl": "pool_phase", "exit_conv_impl": "xla",
                     "conv_impl": "xla_channels_pad8"}),
                (64, {"conv1_impl": "pool_phase", "exit_conv_impl": "xla",
                      "conv_impl": "pool_phase_im2col"}),
                (None, {"conv1_impl": "pool_phase", "exit_conv_impl": "xla",
                        "conv_impl": "xla_channels_pad8"}),
            ),
        },
    },
}
# ResNet's stride-2 convolutions by space-to-depth in training (their gradients are
# XLA:CPU loop nests); inference keeps XLA's, whose forward is fast.
_MEASURED["cpu"]["b_resnet"] = _MEASURED["cpu"]["resnet"] = {
    "train": {"strided_conv_impl": "space_to_depth"}, "inference": ((None, {}),)}
_MEASURED["cpu"]["lenet"] = {  # B-LeNet's choices without exit 1's.
    "train": {k: v for k, v in _MEASURED["cpu"]["b_lenet"]["train"].items()
              if not k.startswith("exit_")},
    "inference": tuple((b, {k: v for k, v in o.items() if not k.startswith("exit_")})
                       for b, o in _MEASURED["cpu"]["b_lenet"]["inference"]),
}

# Training on one CPU device where oneDNN's operations build (`onednn.available`):
# oneDNN's convolutions replace XLA:CPU's, whose convolutions and kernel-gradient
# transposes take most of these networks' train steps, and its batch normalization
# XLA's slow BatchNorm sums. Several devices keep XLA's: the FFI call has no
# partitioning rule, so XLA would gather the batch onto every device around it.
_ONEDNN_TRAIN: dict[str, dict[str, str]] = {
    "b_resnet": {"conv_impl": "onednn", "strided_conv_impl": "onednn", "norm_impl": "onednn"},
    "resnet": {"conv_impl": "onednn", "strided_conv_impl": "onednn", "norm_impl": "onednn"},
    "b_alexnet": {"conv_impl": "onednn"},
    "alexnet": {"conv_impl": "onednn"},
}

# Implementation names from before the kernel gradient was an option of its own, as
# older configs and workdirs (config.json, runs.json) hold them: old name -> (name, the
# kernel gradient the old name implied).
_RENAMED: dict[str, tuple[str, str]] = {
    "shifted": ("shifted_sum", "autodiff"),
    "tapwise": ("all_taps_matmul", "autodiff"),
    "batch_minor": ("im2col_batch_last", "autodiff"),
    "xla_pad8": ("xla_channels_pad8", "autodiff"),
    "xla_dotgrad": ("xla", "dot"),
    "shifted_dotgrad": ("shifted_sum", "dot"),
    "xla_pad8_dotgrad": ("xla_channels_pad8", "dot"),
    "phase": ("pool_phase", "autodiff"),
    "phase_im2col": ("pool_phase_im2col", "autodiff"),
}


def _kernel_grad_field(impl_field: str) -> str:
  """The kernel-gradient option of an implementation option: "conv_impl" -> "conv_kernel_grad"."""
  return impl_field.removesuffix("_impl") + "_kernel_grad"


def canonical_options(name: str, options: Mapping[str, Any] | None) -> dict[str, Any]:
  """`options` with every old implementation name replaced by its name and kernel gradient.

  Configs and workdirs written before the kernel gradient became an option of its own
  name implementations such as "xla_pad8_dotgrad"; this maps each implementation
  option "<conv>_impl" of network `name` that holds such a name to the current name,
  and sets "<conv>_kernel_grad" to the gradient the old name implied, so they build the
  same network. Current names, "auto" and every other option pass unchanged.
  `nets.get` and `resolve_options` apply it.

  Args:
    name: a network name (an unregistered one has no implementation options).
    options: its keyword options (e.g. a config's or runs.json's ``model_options``).

  Returns:
    A new dict, e.g. {"conv_impl": "xla_pad8_dotgrad"} -> {"conv_impl":
    "xla_channels_pad8", "conv_kernel_grad": "dot"}.

  Raises:
    ValueError: an old name with a different kernel gradient given beside it.
  """
  options = dict(options or {})
  for field in _IMPL_FIELDS.get(name, ()) + _FOLLOWING_FIELDS.get(name, ()):
    value = options.get(field)
    if not (isinstance(value, str) and value in _RENAMED):
      continue
    impl, grad = _RENAMED[value]
    grad_field = _kernel_grad_field(field)
    if options.get(grad_field, AUTO) not in (AUTO, grad):
      raise ValueError(f"{field}={value!r} implies {grad_field}={grad!r}, but "
                       f"{grad_field}={options[grad_field]!r} is given.")
    options.update({field: impl, grad_field: grad})
  return options


def platform() -> str:
  """The platform JAX computes on: "cpu", "gpu" or "tpu" (initialises the backends)."""
  import jax  # noqa: PLC0415 -- the registry itself does not need JAX at import.
  return jax.default_backend()


def _onednn_trains(name: str, platform_name: str) -> bool:
  """Whether "auto" trains `name` with oneDNN's convolutions (`_ONEDNN_TRAIN`)."""
  if name not in _ONEDNN_TRAIN or platform_name != "cpu":
    return False
  import jax  # noqa: PLC0415 -- the registry itself does not need JAX at import.
  return jax.device_count() == 1 and onednn.available()


def _choices(name: str, platform_name: str, batch_size: int | None) -> dict[str, str]:
  """Every implementation and kernel-gradient field of `name` as chosen for a platform and batch."""
  measured = _MEASURED.get(platform_name, {}).get(name)
  chosen = {}
  for field in _IMPL_FIELDS.get(name, ()):
    chosen.update({field: "xla", _kernel_grad_field(field): "autodiff"})
  chosen.update({field: "flax" for field in _NORM_FIELDS.get(name, ())})
  if batch_size is None and _onednn_trains(name, platform_name):
    return {**chosen, **_ONEDNN_TRAIN[name]}
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
  runs with any of them. Old implementation names are mapped first
  (`canonical_options`). A kernel gradient that is "auto" or absent is chosen with
  its implementation; beside an implementation that is given, it is "autodiff".

  Args:
    name: a registered network name.
    options: the network's keyword options (e.g. a config's ``model_options``).
    platform_name: "cpu", "gpu", "tpu" (None: the running backend).
    batch_size: choose for inference at this batch (None: for training).

  Returns:
    A new dict: `options` with every implementation and kernel-gradient field set
    explicitly.
  """
  options = canonical_options(name, options)
  chosen = None
  for field in _IMPL_FIELDS.get(name, ()):
    grad_field = _kernel_grad_field(field)
    if options.get(field, AUTO) == AUTO:
      chosen = chosen or _choices(name, platform_name or platform(), batch_size)
      options[field] = chosen[field]
      if options.get(grad_field, AUTO) == AUTO:
        options[grad_field] = chosen[grad_field]
    elif options.get(grad_field, AUTO) == AUTO:
      options[grad_field] = "autodiff"
  for field in _NORM_FIELDS.get(name, ()):
    if options.get(field, AUTO) == AUTO:
      chosen = chosen or _choices(name, platform_name or platform(), batch_size)
      options[field] = chosen[field]
  return options


def inference_options(name: str, batch_size: int | None = None,
                      platform_name: str | None = None) -> dict[str, str]:
  """The fastest known layer implementations for inference with `name` (every field).

  Kernel gradients are "autodiff": inference computes none.

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
  on the running platform, and old implementation names mapped (`resolve_options`).
  """
  if name not in _REGISTRY:
    raise ValueError(f"Unknown model {name!r}; registered models: {names()}.")
  options = resolve_options(name, options)
  try:
    return _REGISTRY[name](**options)
  except TypeError as e:
    raise ValueError(f"Bad options {options} for model {name!r}: {e}") from e
