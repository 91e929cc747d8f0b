r"""Joint training throughput (images/s) of a network, layer implementations side by side.

  python -m experiments.benchmark_train --model=b_lenet --batch_size=512 \
      --variants=im2col_batch_last/xla_channels_pad8:dot,im2col_batch_last/xla:dot,xla/xla \
      [--json=throughput.json]
  python -m experiments.benchmark_train --model=b_resnet --options=depth=20,exit_heads=trunk \
      --dataset=fashion_mnist --batch_size=128 --steps=3 \
      --variants=auto,conv_impl=onednn+strided_conv_impl=onednn,strided_conv_impl=space_to_depth

A variant is "auto" (the platform's choice), OPTION=VALUE items joined by "+" (the
network's layer-implementation options), or for B-LeNet and LeNet CONV1/CONV, each
IMPL or IMPL:KERNEL_GRAD (`layers.CONV_IMPLS`, `layers.KERNEL_GRADS`; old names such
as xla_pad8_dotgrad still work). `--options` go to every variant. Each variant's
jitted joint train step is compiled and warmed up, then the variants are timed in
rotation (so drift hits all alike); each figure is the median over repeats of
`--steps` synchronised steps. Data is random: throughput does not depend on it.
"""

if __name__ == "__main__":  # Before JAX loads: restart with tcmalloc (experiments/preload.py).
  from experiments import preload
  preload.reexec_with_tcmalloc()

import json
from collections.abc import Callable

import jax
from absl import flags

from bnet_jax import nets, runtime, timing
from experiments import errors, train_runner

_MODEL = flags.DEFINE_string("model", "b_lenet", "Registered network name.")
_OPTIONS = flags.DEFINE_list("options", [], "Options of every variant as KEY=VALUE, e.g. "
                             "depth=20,exit_heads=trunk.")
_DATASET = flags.DEFINE_string("dataset", "", "Size the network for this dataset's images and "
                               "classes (e.g. fashion_mnist); default: the network's own.")
_BATCH = flags.DEFINE_integer("batch_size", 512, "Training batch size.")
_VARIANTS = flags.DEFINE_list(
    "variants", ["im2col_batch_last/xla_channels_pad8:dot", "im2col_batch_last/xla:dot",
                 "xla/xla"],
    "auto, OPTION=VALUE[+OPTION=VALUE...], or CONV1/CONV (each IMPL or IMPL:KERNEL_GRAD) "
    "for B-LeNet; the first is b_lenet's CPU default.")
_STEPS = flags.DEFINE_integer("steps", 20, "Train steps per timed repeat.")
_REPEATS = flags.DEFINE_integer("repeats", 5, "Timed repeats per variant.")
_JSON = flags.DEFINE_string("json", None, "Write the results here as JSON.")


def variant_options(variant: str) -> dict[str, str]:
  """A variant's layer options: "auto" -> {}; "conv_impl=onednn+strided_conv_impl=xla" ->
  those two; "im2col_batch_last/xla:dot" -> conv1_impl, conv_impl and conv_kernel_grad."""
  if variant == nets.AUTO:
    return {}
  if "=" in variant:
    return train_runner.parse_options(variant.split("+"))
  options = {}
  for field, part in zip(("conv1", "conv"), variant.split("/")):
    impl, _, kernel_grad = part.partition(":")
    options[f"{field}_impl"] = impl
    if kernel_grad:
      options[f"{field}_kernel_grad"] = kernel_grad
  return options


def _make_runner(model: str, options: dict, batch_size: int) -> Callable[[], None]:
  net = nets.get(model, **options)
  return train_runner.joint_step_runner(net, train_runner.random_batch(net, batch_size),
                                        _STEPS.value)


def main(argv: list[str]) -> None:
  del argv
  if _JSON.value:
    errors.check_output(_JSON.value, "json")
  errors.check_model(_MODEL.value)
  shared = train_runner.network_options(_OPTIONS.value, _DATASET.value)
  runtime.configure()
  options = {v: {**shared, **variant_options(v)} for v in _VARIANTS.value}
  for v in _VARIANTS.value:
    errors.check_network("variants", lambda v=v: nets.get(_MODEL.value, **options[v]))
  runners = {v: _make_runner(_MODEL.value, options[v], _BATCH.value) for v in _VARIANTS.value}
  seconds = timing.interleaved_medians(runners, repeats=_REPEATS.value, warmup=2)
  rows = []
  for variant, sec in seconds.items():
    rate = _STEPS.value * _BATCH.value / sec
    rows.append({"model": _MODEL.value, "variant": variant, "options": options[variant],
                 "dataset": _DATASET.value or None, "batch_size": _BATCH.value,
                 "images_per_s": rate, "device": jax.devices()[0].device_kind})
    print(f"{_MODEL.value:10s} {variant:40s} batch {_BATCH.value:5d}: {rate:8.0f} images/s")
  if _JSON.value:
    with open(_JSON.value, "w") as f:
      json.dump({"rows": rows}, f, indent=2)


if __name__ == "__main__":
  errors.run(main)
