"""Process-wide JAX/XLA settings that the experiments apply before any computation."""

import os

# XLA aborts at start-up on a flag it does not know: these exist in the jaxlib the
# project pins, and tests/test_layers.py checks that they are accepted.
XLA_FLAGS: tuple[str, ...] = (
    # YNNPACK fusion off: it made the shifted convolutions 2-3x slower.
    "--xla_cpu_experimental_ynn_fusion_type=",
)


def configure(latency: bool = False, cores: int | None = None) -> None:
  """Applies the library's XLA settings (call before the first JAX computation).

  Flags are appended to any `XLA_FLAGS` the user set; a flag the user already set
  keeps the user's value.

  Args:
    latency: also turn CPU asynchronous dispatch off. For small-batch inference
      this cut B-LeNet's batch-1 path from 0.27 to 0.17 ms here; for training
      and large batches leave it on, so the host can run ahead of the device.
    cores: run the process on this many of the CPU cores it may use (None or 0:
      all). XLA sizes its CPU thread pool from them when its backend starts. At
      batch 1 a single core avoids waking pool threads between tiny ops: B-LeNet's
      exit-1 path took 72-90 us on one core against 125-170 us on two (2026-11-30);
      batched inference and training want every core.
  """
  if cores:
    allowed = sorted(os.sched_getaffinity(0))
    if cores > len(allowed):
      raise ValueError(f"cores={cores}, but this process may use only {len(allowed)} "
                       f"CPU core(s) ({allowed}).")
    os.sched_setaffinity(0, allowed[:cores])
  user = os.environ.get("XLA_FLAGS", "")
  ours = [f for f in XLA_FLAGS if f.split("=")[0] + "=" not in user]
  os.environ["XLA_FLAGS"] = " ".join([user, *ours]).strip()
  if latency:
    import jax  # noqa: PLC0415 -- imported late so XLA_FLAGS is set first.
    jax.config.update("jax_cpu_enable_async_dispatch", False)
