"""Process and backend settings: what each platform gets, chosen where it is known.

Three kinds of settings, each applied only where it helps and never where it could
break a process:

- XLA compiler options by platform (`XLA_OPTIONS`). They are passed to each program
  the library compiles (`jit`, `compiler_options`), not through the ``XLA_FLAGS``
  environment variable: XLA parses that once, when a backend starts, for every
  backend, and aborts the process on a flag its version does not know. Per
  program, the options apply to the running platform only, and the running
  jaxlib is asked once per process whether it knows each one (a trivial compile);
  one it rejects is left out with a warning.
- CPU client settings (`configure`: asynchronous dispatch off, cores pinned).
  They must precede the backend's start, so they are decided from the platform
  the process is about to use (`expected_platform`) and skipped elsewhere.
- The compute dtype (`compute_dtype`): bfloat16 on TPU, float32 on CPU and GPU.
"""

from __future__ import annotations

import functools
import glob
import importlib.metadata
import logging
import os
from collections.abc import Callable
from typing import Any

# Compiler options by platform, as XLA's DebugOptions fields.
XLA_OPTIONS: dict[str, dict[str, Any]] = {
    # YNNPACK fusion off: it slows the shifted-sum convolutions down on CPU.
    "cpu": {"xla_cpu_experimental_ynn_fusion_type": ""},
}

COMPUTE_DTYPES = ("auto", "float32", "bfloat16")

# Distributions that add an accelerator platform to JAX, and the device files that
# show the accelerator is there.
_PLUGINS = {"gpu": ("jax-cuda12-plugin", "jax-cuda13-plugin", "jax-rocm6-plugin",
                    "jax-rocm7-plugin"),
            "tpu": ("libtpu", "libtpu-nightly")}
_DEVICE_FILES = {"gpu": ("/dev/nvidia[0-9]*", "/dev/kfd"),
                 "tpu": ("/dev/accel[0-9]*", "/dev/vfio/[0-9]*")}


def _backends_started() -> bool:
  import jax._src.xla_bridge as xb  # noqa: PLC0415

  return bool(getattr(xb, "_backends", None))


def _requested_platforms() -> str:
  """``jax.config.jax_platforms`` (set from ``JAX_PLATFORMS``), or ""."""
  import jax  # noqa: PLC0415

  return jax.config.jax_platforms or os.environ.get("JAX_PLATFORMS", "")


def platform() -> str:
  """The platform JAX computes on: "cpu", "gpu" or "tpu" (starts the backends)."""
  import jax  # noqa: PLC0415

  return jax.default_backend()


def expected_platform() -> str:
  """The platform this process will compute on, decided without starting a backend.

  The running backend if one has started; else the first of ``JAX_PLATFORMS`` (or
  ``jax.config.jax_platforms``); else an accelerator whose JAX plugin is installed and
  whose device files exist; else "cpu". A wrong guess costs only speed: it decides
  CPU-only settings.
  """
  if _backends_started():
    return platform()
  chosen = _requested_platforms()
  if chosen:
    first = chosen.split(",")[0].strip().lower()
    return {"cuda": "gpu", "rocm": "gpu"}.get(first, first)
  installed = {d.metadata["Name"].lower().replace("_", "-")
               for d in importlib.metadata.distributions() if d.metadata["Name"]}
  for name in ("tpu", "gpu"):
    if installed.intersection(_PLUGINS[name]) and any(
        glob.glob(pattern) for pattern in _DEVICE_FILES[name]):
      return name
  return "cpu"


def configure(latency: bool = False, cores: int | None = None) -> str:
  """Applies the process-wide settings for the platform about to be used.

  Call before the first JAX computation: CPU client settings are read when the CPU
  backend starts. On GPU and TPU both arguments are ignored (they tune the CPU client).

  Args:
    latency: turn CPU asynchronous dispatch off. For small-batch inference this
      roughly halves the fixed cost of a call; for training and large batches leave
      it on, so the host can run ahead of the device.
    cores: run the process on this many of the CPU cores it may use (None or 0: all).
      XLA sizes its CPU thread pool from them when its backend starts; at batch 1 a
      single core avoids waking pool threads between tiny ops.

  Returns:
    The expected platform ("cpu", "gpu" or "tpu").
  """
  import jax  # noqa: PLC0415

  expected = expected_platform()
  if expected != "cpu":
    if cores or latency:
      logging.info("bnet_jax: %s: CPU settings (cores=%s, latency=%s) not applied.",
                   expected, cores, latency)
    return expected
  if _backends_started():
    logging.warning("bnet_jax.runtime.configure: JAX's backend has started already, so "
                    "cores=%s and latency=%s may not take effect; call it first.", cores,
                    latency)
  if cores:
    allowed = sorted(os.sched_getaffinity(0))
    if cores > len(allowed):
      raise ValueError(f"cores={cores}, but this process may use only {len(allowed)} "
                       f"CPU core(s) ({allowed}).")
    os.sched_setaffinity(0, allowed[:cores])
  if latency:
    jax.config.update("jax_cpu_enable_async_dispatch", False)
  return expected


@functools.cache
def accepted_options(platform_name: str) -> tuple[tuple[str, Any], ...]:
  """The options of `XLA_OPTIONS[platform_name]` that the running jaxlib knows."""
  import jax  # noqa: PLC0415
  import jax.numpy as jnp  # noqa: PLC0415

  accepted = []
  for name, value in XLA_OPTIONS.get(platform_name, {}).items():
    try:
      jax.jit(lambda x: x + 1, compiler_options={name: value}).lower(
          jnp.zeros((), jnp.float32)).compile()
    except Exception as e:  # noqa: BLE001 -- jaxlib's error types vary by version.
      logging.warning("bnet_jax: this jaxlib does not know XLA option %s (%s); left out.",
                      name, str(e).splitlines()[0][:200])
      continue
    accepted.append((name, value))
  return tuple(accepted)


def compiler_options() -> dict[str, Any]:
  """The XLA options for programs on the running platform that its jaxlib accepts."""
  return dict(accepted_options(platform()))


def jit(fun: Callable, **kwargs: Any) -> Any:
  """`jax.jit` with the running platform's `compiler_options` (call after `configure`)."""
  import jax  # noqa: PLC0415

  return jax.jit(fun, compiler_options=compiler_options() or None, **kwargs)


def compute_dtype(name: str = "auto", platform_name: str | None = None) -> str:
  """A config's ``compute_dtype`` resolved: "auto" is bfloat16 on TPU, else float32.

  Args:
    name: "auto", "float32" or "bfloat16".
    platform_name: the platform for "auto" (None: the running backend).
  """
  if name not in COMPUTE_DTYPES:
    raise ValueError(f"compute_dtype must be one of {COMPUTE_DTYPES}; got {name!r}.")
  if name != "auto":
    return name
  return "bfloat16" if (platform_name or platform()) == "tpu" else "float32"
