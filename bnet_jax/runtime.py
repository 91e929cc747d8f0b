"""Process-wide JAX/XLA settings that the experiments apply before any computation."""

import os


def configure() -> None:
  """Applies the library's XLA settings (call before the first JAX computation)."""
  os.environ.setdefault("XLA_FLAGS", "")
