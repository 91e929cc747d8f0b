"""Process-wide JAX/XLA settings that the experiments apply before any computation."""

import os

# XLA aborts at start-up on a flag it does not know: these exist in the jaxlib the
# project pins, and tests/test_layers.py checks that they are accepted.
XLA_FLAGS: tuple[str, ...] = (
    # YNNPACK fusion off: it made the shifted convolutions 2-3x slower.
    "--xla_cpu_experimental_ynn_fusion_type=",
)


def configure(latency: bool = False) -> None:
  """Applies the library's XLA settings (call before the first JAX computation).

  Flags are appended to any `XLA_FLAGS` the user set; a flag the user already set
  keeps the user's value.

  Args:
    latency: also turn CPU asynchronous dispatch off. For small-batch inference
      this cut B-LeNet's batch-1 path from 0.27 to 0.17 ms here; for training
      and large batches leave it on, so the host can run ahead of the device.
  """
  user = os.environ.get("XLA_FLAGS", "")
  ours = [f for f in XLA_FLAGS if f.split("=")[0] + "=" not in user]
  os.environ["XLA_FLAGS"] = " ".join([user, *ours]).strip()
  if latency:
    import jax  # noqa: PLC0415 -- imported late so XLA_FLAGS is set first.
    jax.config.update("jax_cpu_enable_async_dispatch", False)
