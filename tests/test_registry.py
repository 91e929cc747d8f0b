"""Layer implementations chosen per platform ("auto"), and that every choice computes the same."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bnet_jax import nets
from bnet_jax.nets import onednn

PLATFORMS = ("cpu", "gpu", "tpu")
TIERS = (1, 2, 64, 256, 2048)
AUTODIFF = {"conv1_kernel_grad": "autodiff", "conv_kernel_grad": "autodiff"}
XLA = {"conv1_impl": "xla", "conv_impl": "xla", **AUTODIFF}
CPU_TRAIN = {"conv1_impl": "im2col_batch_last", "conv1_kernel_grad": "autodiff",
             "conv_impl": "xla_channels_pad8", "conv_kernel_grad": "dot"}
CPU_INFERENCE = {
    1: {"conv1_impl": "pool_phase", "exit_conv_impl": "all_taps_matmul",
        "conv_impl": "all_taps_matmul", **AUTODIFF},
    2: {"conv1_impl": "pool_phase", "exit_conv_impl": "xla", "conv_impl": "xla_channels_pad8",
        **AUTODIFF},
    64: {"conv1_impl": "pool_phase", "exit_conv_impl": "xla", "conv_impl": "pool_phase_im2col",
         **AUTODIFF},
    256: {"conv1_impl": "pool_phase", "exit_conv_impl": "xla", "conv_impl": "xla_channels_pad8",
          **AUTODIFF},
    2048: {"conv1_impl": "pool_phase", "exit_conv_impl": "xla", "conv_impl": "xla_channels_pad8",
           **AUTODIFF},
}
# Each implementation name used before the kernel gradient was an option of its own, as
# configs and workdirs (config.json, runs.json) hold them, and what it means now.
OLD_NAMES = {
    "xla": {"impl": "xla"},
    "im2col": {"impl": "im2col"},
    "shifted": {"impl": "shifted_sum", "kernel_grad": "autodiff"},
    "tapwise": {"impl": "all_taps_matmul", "kernel_grad": "autodiff"},
    "batch_minor": {"impl": "im2col_batch_last", "kernel_grad": "autodiff"},
    "xla_pad8": {"impl": "xla_channels_pad8", "kernel_grad": "autodiff"},
    "xla_dotgrad": {"impl": "xla", "kernel_grad": "dot"},
    "shifted_dotgrad": {"impl": "shifted_sum", "kernel_grad": "dot"},
    "xla_pad8_dotgrad": {"impl": "xla_channels_pad8", "kernel_grad": "dot"},
    "phase": {"impl": "pool_phase", "kernel_grad": "autodiff"},
    "phase_im2col": {"impl": "pool_phase_im2col", "kernel_grad": "autodiff"},
}


def test_training_choices_per_platform(monkeypatch):
  monkeypatch.setattr(onednn, "available", lambda: False)
  auto = {"conv1_impl": "auto", "conv_impl": "auto"}
  assert nets.resolve_options("b_lenet", auto, platform_name="cpu") == CPU_TRAIN
  for accelerator in ("gpu", "tpu"):
    assert nets.resolve_options("b_lenet", auto, platform_name=accelerator) == XLA
  strided = {"strided_conv_impl": "xla", "strided_conv_kernel_grad": "autodiff"}
  for name in ("b_alexnet", "b_resnet", "resnet", "alexnet"):
    for platform in PLATFORMS:
      want = {"conv_impl": "xla", "conv_kernel_grad": "autodiff", "depth": 8,
              **(strided | {"norm_impl": "flax"} if "resnet" in name else {})}
      if "resnet" in name and platform == "cpu":
        want["strided_conv_impl"] = "space_to_depth"
      assert nets.resolve_options(name, {"conv_impl": "auto", "depth": 8},
                                  platform_name=platform) == want
      if "resnet" in name:  # Inference keeps XLA's strided convolution everywhere.
        assert nets.inference_options(name, 256, platform)["strided_conv_impl"] == "xla"


@pytest.mark.parametrize("devices", [1, 2])
def test_onednn_trains_the_cifar_families_on_one_cpu_device(monkeypatch, devices):
  monkeypatch.setattr(onednn, "available", lambda: True)
  monkeypatch.setattr(jax, "device_count", lambda: devices)
  for name in ("b_alexnet", "alexnet", "b_resnet", "resnet"):
    impls = {k: v for k, v in nets.resolve_options(name, {}, platform_name="cpu").items()
             if k.endswith("_impl")}
    if devices == 1:  # Several devices: the FFI call has no partitioning rule.
      assert set(impls.values()) == {"onednn"}
      assert len(impls) == (3 if "resnet" in name else 1)  # BatchNorm too.
    else:
      assert "onednn" not in impls.values()
    for platform in ("gpu", "tpu"):
      assert set(nets.resolve_options(name, {}, platform_name=platform).values()) <= {
          "xla", "autodiff", "flax"}
    for b in TIERS:  # Inference keeps XLA's convolutions: not measured with oneDNN.
      assert "onednn" not in nets.inference_options(name, b, "cpu").values()
  assert "onednn" not in nets.resolve_options("b_lenet", {}, platform_name="cpu").values()


def test_inference_choices_per_platform_and_batch():
  for b, want in CPU_INFERENCE.items():
    assert nets.inference_options("b_lenet", b, "cpu") == want
    assert nets.inference_options("lenet", b, "cpu") == {
        k: v for k, v in want.items() if k != "exit_conv_impl"}
  assert nets.inference_options("b_lenet", None, "cpu") == CPU_INFERENCE[2048]
  for accelerator in ("gpu", "tpu"):
    for b in TIERS:
      assert nets.inference_options("b_lenet", b, accelerator) == XLA
      assert nets.inference_options("b_resnet", b, accelerator) == {
          "conv_impl": "xla", "conv_kernel_grad": "autodiff", "strided_conv_impl": "xla",
          "strided_conv_kernel_grad": "autodiff", "norm_impl": "flax"}


def test_explicit_choices_are_kept_and_absent_ones_filled():
  given = {"conv1_impl": "im2col", "conv_impl": "auto"}
  assert nets.resolve_options("b_lenet", given, platform_name="tpu") == {
      **XLA, "conv1_impl": "im2col"}
  # A given implementation gets "autodiff" unless its kernel gradient is given too.
  assert nets.resolve_options("b_lenet", given, platform_name="cpu") == {
      **CPU_TRAIN, "conv1_impl": "im2col"}
  assert nets.resolve_options("b_lenet", {"conv_impl": "xla", "conv1_kernel_grad": "dot"},
                              platform_name="cpu") == {
      **CPU_TRAIN, "conv_impl": "xla", "conv_kernel_grad": "autodiff", "conv1_kernel_grad": "dot"}
  assert nets.resolve_options("b_lenet", {}, platform_name="cpu") == CPU_TRAIN
  assert given == {"conv1_impl": "im2col", "conv_impl": "auto"}  # Not modified.
  trunk = nets.get("b_lenet").stages[1].trunk  # This CPU.
  assert (trunk.conv_impl, trunk.conv_kernel_grad) == ("xla_channels_pad8", "dot")


def test_old_names_map_to_their_name_and_kernel_gradient():
  for old, new in OLD_NAMES.items():
    want = {"conv_impl": new["impl"], "depth": 8}
    if "kernel_grad" in new:
      want["conv_kernel_grad"] = new["kernel_grad"]
    assert nets.canonical_options("b_resnet", {"conv_impl": old, "depth": 8}) == want
  assert nets.canonical_options("b_lenet", None) == {}
  assert nets.canonical_options("lenet", {"conv_impl": "auto"}) == {"conv_impl": "auto"}
  assert nets.canonical_options("b_lenet", {"exit_conv_impl": "phase",
                                            "conv_kernel_grad": "dot"}) == {
      "exit_conv_impl": "pool_phase", "exit_conv_kernel_grad": "autodiff",
      "conv_kernel_grad": "dot"}
  assert nets.canonical_options("b_alexnet", {"conv1_impl": "phase"}) == {
      "conv1_impl": "phase"}  # Not an option of B-AlexNet: left for it to refuse.
  with pytest.raises(ValueError, match="implies conv_kernel_grad='dot'"):
    nets.canonical_options("b_lenet", {"conv_impl": "xla_dotgrad",
                                       "conv_kernel_grad": "autodiff"})


def test_workdir_options_with_old_names_resolve():
  """What runs.json and config.json hold from before the rename resolve as they did."""
  old_train = {"conv1_impl": "batch_minor", "conv_impl": "xla_pad8_dotgrad"}
  for platform in PLATFORMS:
    assert nets.resolve_options("b_lenet", old_train, platform_name=platform) == CPU_TRAIN
  old_tier = {"conv1_impl": "phase", "exit_conv_impl": "tapwise", "conv_impl": "tapwise"}
  assert nets.resolve_options("b_lenet", old_tier, platform_name="tpu") == {
      **CPU_INFERENCE[1], "exit_conv_kernel_grad": "autodiff"}
  config = {"conv1_impl": "auto", "conv_impl": "xla_dotgrad"}
  assert nets.resolve_options("b_lenet", config, platform_name="cpu") == {
      "conv1_impl": "im2col_batch_last", "conv1_kernel_grad": "autodiff", "conv_impl": "xla",
      "conv_kernel_grad": "dot"}
  assert nets.resolve_options("b_resnet", {"depth": 8, "conv_impl": "xla_pad8"},
                              platform_name="gpu") == {
      "depth": 8, "conv_impl": "xla_channels_pad8", "conv_kernel_grad": "autodiff",
      "strided_conv_impl": "xla", "strided_conv_kernel_grad": "autodiff", "norm_impl": "flax"}
  assert nets.get("b_lenet", **old_train) == nets.get("b_lenet", **CPU_TRAIN)


@pytest.mark.parametrize("old", OLD_NAMES)
def test_every_old_name_builds_its_canonical_network(old):
  """Old names in every B-LeNet convolution (all pooled) build the network of their new
  names, which computes XLA's values and gradients (jitted: eager took minutes)."""
  new = OLD_NAMES[old]
  grad = new.get("kernel_grad", "autodiff")
  net = nets.get("b_lenet", conv1_impl=old, conv_impl=old, exit_conv_impl=old)
  assert net == nets.get("b_lenet", conv1_impl=new["impl"], conv_impl=new["impl"],
                         exit_conv_impl=new["impl"], conv1_kernel_grad=grad,
                         conv_kernel_grad=grad, exit_conv_kernel_grad=grad)
  xla = nets.get("b_lenet", conv1_impl="xla", conv_impl="xla")
  variables = nets.init(xla, jax.random.key(0))
  x = jax.random.uniform(jax.random.key(1), (3, 28, 28, 1))
  loss = lambda net: lambda p: jnp.sum(nets.forward(net, {"params": p}, x)[0].logits ** 2)
  logits = lambda net: jax.jit(lambda v: nets.forward(net, v, x)[0].logits)(variables)
  np.testing.assert_allclose(logits(net), logits(xla), rtol=2e-5, atol=2e-5)
  got, want = (jax.jit(jax.grad(loss(n)))(variables["params"]) for n in (net, xla))
  for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-4 * float(jnp.max(jnp.abs(w))))


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
  logits = lambda net: jax.jit(lambda v, x: nets.forward(net, v, x)[0].logits)(variables, x)
  want, got = logits(xla), logits(nets.get("b_lenet", **options))
  np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-5)
