"""Restarts an experiment with tcmalloc preloaded, before JAX is imported.

XLA's CPU runtime allocates and frees large buffers on every step. With glibc's
malloc those allocations go straight to the kernel (mmap/munmap) and the page faults
took 22% of the CPU time of B-LeNet's training step; with tcmalloc
(Debian: ``libtcmalloc-minimal4``) the same step ran 31% faster (1,647 -> 2,156
images/s at batch 512 on 2 CPU cores, `experiments.benchmark_train`, 2026-11-30).
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
