"""Process set-up per platform: XLA options, CPU settings, compute dtype, the tcmalloc restart."""

import fnmatch
import os
import pathlib
import subprocess
import sys

import pytest

from bnet_jax import runtime

REPO = pathlib.Path(__file__).resolve().parents[1]


def test_configure_pins_cores_and_refuses_more_than_allowed():
  allowed = len(os.sched_getaffinity(0))
  code = ("import os; from bnet_jax import runtime; runtime.configure(cores=1); "
          "print(len(os.sched_getaffinity(0)))")
  result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          check=True)
  assert result.stdout.split() == ["1"]
  with pytest.raises(ValueError, match=f"may use only {allowed} CPU core"):
    runtime.configure(cores=allowed + 1)


def test_experiments_restart_with_tcmalloc_once():
  """CI installs libtcmalloc-minimal4 (scripts/setup.sh): the restart must load it."""
  code = ("from experiments import preload; preload.reexec_with_tcmalloc(); "
          "print(open('/proc/self/maps').read().count('tcmalloc') > 0)")
  env = {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", "BNET_TCMALLOC")}
  run = lambda env: subprocess.run([sys.executable, "-c", code], capture_output=True,  # noqa: E731
                                   text=True, check=True, cwd=REPO, env=env).stdout.split()
  assert run(env) == ["True"]
  assert run({**env, "BNET_TCMALLOC": "0"}) == ["False"]


def _fresh(code: str, **env: str) -> list[str]:
  """Runs `code` in a fresh Python process (no JAX backend started); its stdout lines."""
  result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          check=True, cwd=REPO, timeout=120, env={**os.environ, **env})
  return result.stdout.split()


@pytest.mark.newest
def test_compiler_options_are_accepted_by_this_jaxlib_and_leave_xla_flags_alone():
  # Both tested jaxlibs (lowest and newest) know the CPU option; configure() must not
  # touch XLA_FLAGS, which XLA parses for every backend and aborts on when unknown.
  code = ("import os; from bnet_jax import runtime; runtime.configure(latency=True); "
          "import jax.numpy as jnp; print(os.environ.get('XLA_FLAGS', '<unset>')); "
          "print(sorted(runtime.compiler_options())); "
          "print(float(runtime.jit(lambda x: x + 1)(jnp.ones(2)).sum()))")
  out = _fresh(code, XLA_FLAGS="--xla_dump_hlo_as_text=false")
  assert out[0] == "--xla_dump_hlo_as_text=false"
  assert out[1] == str(sorted(runtime.XLA_OPTIONS["cpu"])).replace(" ", "")
  assert out[2] == "4.0"


def test_an_option_this_jaxlib_does_not_know_is_left_out_not_fatal(monkeypatch, caplog):
  monkeypatch.setitem(runtime.XLA_OPTIONS, "cpu",
                      {"xla_cpu_no_such_option_anywhere": "1", **runtime.XLA_OPTIONS["cpu"]})
  runtime.accepted_options.cache_clear()
  try:
    options = runtime.compiler_options()
    assert "xla_cpu_no_such_option_anywhere" not in options
    assert set(options) == set(runtime.XLA_OPTIONS["cpu"]) - {"xla_cpu_no_such_option_anywhere"}
    assert "does not know XLA option xla_cpu_no_such_option_anywhere" in caplog.text
    assert float(runtime.jit(lambda x: 2 * x)(3.0)) == 6.0
  finally:
    runtime.accepted_options.cache_clear()


def test_options_of_other_platforms_are_never_applied(monkeypatch):
  monkeypatch.setitem(runtime.XLA_OPTIONS, "gpu", {"xla_gpu_no_such_option": "1"})
  monkeypatch.setitem(runtime.XLA_OPTIONS, "tpu", {"xla_tpu_no_such_option": "1"})
  runtime.accepted_options.cache_clear()
  try:
    assert runtime.compiler_options() == runtime.XLA_OPTIONS["cpu"]
  finally:
    runtime.accepted_options.cache_clear()


@pytest.mark.parametrize("platforms, want", [("cpu", "cpu"), ("cuda", "gpu"), ("tpu", "tpu"),
                                             ("rocm,cpu", "gpu")])
def test_expected_platform_from_jax_platforms_starts_no_backend(platforms, want):
  code = ("import jax._src.xla_bridge as xb; from bnet_jax import runtime; "
          "print(runtime.expected_platform()); print(bool(xb._backends))")
  assert _fresh(code, JAX_PLATFORMS=platforms) == [want, "False"]


@pytest.mark.parametrize("plugin, device, want", [
    ("libtpu", "/dev/vfio/0", "tpu"),           # Recent TPU VMs (v5e, v6e).
    ("libtpu", "/dev/accel0", "tpu"),           # Older TPU VMs.
    ("jax-cuda12-plugin", "/dev/nvidia0", "gpu"),
    ("jax-cuda12-plugin", None, "cpu"),         # A plugin but no device: CPU.
    (None, "/dev/nvidia0", "cpu"),              # A device but no plugin: JAX uses the CPU.
])
def test_expected_platform_from_plugins_and_devices(plugin, device, want, monkeypatch):
  class Dist:
    metadata = {"Name": plugin}
  monkeypatch.setattr(runtime, "_backends_started", lambda: False)
  monkeypatch.setattr(runtime, "_requested_platforms", lambda: "")
  monkeypatch.setattr(runtime.importlib.metadata, "distributions",
                      lambda: [Dist()] if plugin else [])
  monkeypatch.setattr(runtime.glob, "glob",
                      lambda pattern: [device] if device and fnmatch.fnmatch(device, pattern)
                      else [])
  assert runtime.expected_platform() == want


def test_configure_skips_cpu_settings_on_an_accelerator():
  code = ("import os; from bnet_jax import runtime; print(runtime.configure(latency=True, "
          "cores=1)); print(len(os.sched_getaffinity(0)))")
  assert _fresh(code, JAX_PLATFORMS="tpu") == ["tpu", str(len(os.sched_getaffinity(0)))]


@pytest.mark.parametrize("name, platform, want", [
    ("auto", "cpu", "float32"), ("auto", "gpu", "float32"), ("auto", "tpu", "bfloat16"),
    ("float32", "tpu", "float32"), ("bfloat16", "cpu", "bfloat16")])
def test_compute_dtype_resolution(name, platform, want):
  assert runtime.compute_dtype(name, platform) == want


def test_compute_dtype_rejects_unknown_names():
  with pytest.raises(ValueError, match="compute_dtype must be one of"):
    runtime.compute_dtype("float16", "cpu")
