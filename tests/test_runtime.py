"""Process set-up: pinning cores (`runtime.configure`) and the tcmalloc restart."""

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
