"""Restarts an experiment with tcmalloc preloaded, before JAX is imported.

XLA's CPU runtime allocates and frees large buffers on every step; with glibc's
malloc they go straight to the kernel (mmap/munmap) and the page faults cost a
large share of a training step, which tcmalloc (Debian: ``libtcmalloc-minimal4``)
keeps in user space (docs/performance.md has the figures).
A library cannot swap the allocator of a running process, so each experiment's
``__main__`` calls `reexec_with_tcmalloc` first: it re-executes the same command
line with ``LD_PRELOAD`` set (once; a no-op when tcmalloc is absent, already loaded,
or ``BNET_TCMALLOC=0``). This module imports nothing heavy, so the restart costs
milliseconds.
"""

import ctypes.util
import os
import sys

LIBRARY = "tcmalloc_minimal"


def reexec_with_tcmalloc() -> None:
  """Re-executes the current command with tcmalloc in LD_PRELOAD, if worthwhile.

  Returns normally (and changes nothing) when tcmalloc is not installed, already
  preloaded, or disabled with the environment variable ``BNET_TCMALLOC=0``.
  """
  preload = os.environ.get("LD_PRELOAD", "")
  if os.environ.get("BNET_TCMALLOC", "1") == "0" or "tcmalloc" in preload:
    return
  lib = ctypes.util.find_library(LIBRARY)
  if lib is None:
    return
  env = dict(os.environ, LD_PRELOAD=" ".join(filter(None, [preload, lib])))
  sys.stdout.flush()
  sys.stderr.flush()
  os.execve(sys.executable, sys.orig_argv, env)
