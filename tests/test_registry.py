"""Layer implementations chosen per platform ("auto"), and that every choice computes the same."""

import jax
import numpy as np
import pytest

from bnet_jax import nets

PLATFORMS = ("cpu", "gpu", "tpu")
TIERS = (1, 2, 64, 256, 2048)
CPU_TRAIN = {"conv1_impl": "batch_minor", "conv_impl": "xla_pad8_dotgrad"}
CPU_INFERENCE = {
    1: {"conv1_impl": "phase", "exit_conv_impl": "tapwise", "conv_impl": "tapwise"},
    2: {"conv1_impl": "phase", "exit_conv_impl": "xla", "conv_impl": "xla_pad8"},
    64: {"conv1_impl": "phase", "exit_conv_impl": "xla", "conv_impl": "phase_im2col"},
    256: {"conv1_impl": "phase", "exit_conv_impl": "xla", "conv_impl": "xla_pad8"},
    2048: {"conv1_impl": "phase", "exit_conv_impl": "xla", "conv_impl": "xla_pad8"},
}


def test_training_choices_per_platform():
  auto = {"conv1_impl": "auto", "conv_impl": "auto"}
  assert nets.resolve_options("b_lenet", auto, platform_name="cpu") == CPU_TRAIN
  for accelerator in ("gpu", "tpu"):
    assert nets.resolve_options("b_lenet", auto, platform_name=accelerator) == {
        "conv1_impl": "xla", "conv_impl": "xla"}
  for name in ("b_alexnet", "b_resnet", "resnet", "alexnet"):
    for platform in PLATFORMS:
      assert nets.resolve_options(name, {"conv_impl": "auto", "depth": 8},
                                  platform_name=platform) == {"conv_impl": "xla", "depth": 8}


def test_inference_choices_per_platform_and_batch():
  for b, want in CPU_INFERENCE.items():
    assert nets.inference_options("b_lenet", b, "cpu") == want
    assert nets.inference_options("lenet", b, "cpu") == {
        k: v for k, v in want.items() if k != "exit_conv_impl"}
  assert nets.inference_options("b_lenet", None, "cpu") == CPU_INFERENCE[2048]
  for accelerator in ("gpu", "tpu"):
    for b in TIERS:
      assert nets.inference_options("b_lenet", b, accelerator) == {
          "conv1_impl": "xla", "conv_impl": "xla"}
      assert nets.inference_options("b_resnet", b, accelerator) == {"conv_impl": "xla"}


def test_explicit_choices_are_kept_and_absent_ones_filled():
  given = {"conv1_impl": "im2col", "conv_impl": "auto"}
  assert nets.resolve_options("b_lenet", given, platform_name="tpu") == {
      "conv1_impl": "im2col", "conv_impl": "xla"}
  assert nets.resolve_options("b_lenet", {}, platform_name="cpu") == CPU_TRAIN
  assert given == {"conv1_impl": "im2col", "conv_impl": "auto"}  # Not modified.
  assert nets.get("b_lenet").stages[0].trunk.conv_impl == "batch_minor"  # This CPU.


def _choices():
  """Every distinct B-LeNet option set any platform or tier can choose."""
  seen = []
  for platform in PLATFORMS:
    for options in ([nets.resolve_options("b_lenet", {}, platform_name=platform)]
                    + [nets.inference_options("b_lenet", b, platform) for b in TIERS]):
      if options not in seen:
        seen.append(options)
  return seen


@pytest.mark.parametrize("options", _choices(), ids=lambda o: "/".join(sorted(o.values())))
def test_every_choice_computes_what_xla_convolutions_compute(options):
  xla = nets.get("b_lenet", conv1_impl="xla", conv_impl="xla")
  variables = nets.init(xla, jax.random.key(0))
  x = jax.random.uniform(jax.random.key(1), (5, 28, 28, 1))
  want = nets.forward(xla, variables, x)[0].logits
  got = nets.forward(nets.get("b_lenet", **options), variables, x)[0].logits
  np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-5)
