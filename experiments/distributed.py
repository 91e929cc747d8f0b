"""Flags that join an experiment to a multi-process JAX run (one process per host).

  # Cloud TPU VM pod slice, SLURM, Open MPI: JAX finds the coordinator itself.
  python -m experiments.train --distributed ...
  # Elsewhere, on every host i of N (the same address everywhere):
  python -m experiments.train --coordinator_address=HOST0:1234 --num_processes=N \
      --process_id=i ...
"""

from absl import flags

from bnet_jax import parallel

_DISTRIBUTED = flags.DEFINE_bool(
    "distributed", False, "Join a multi-process JAX run. Alone, JAX detects the cluster "
    "(Cloud TPU pod slice, SLURM, Open MPI); elsewhere give the three flags below.")
_COORDINATOR = flags.DEFINE_string(
    "coordinator_address", None, "host:port of process 0, the same on every process "
    "(implies --distributed).")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Processes in the run.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index, 0..N-1.")


def initialize() -> None:
  """Calls `parallel.initialize` if the flags ask for several processes (before any JAX work)."""
  if _DISTRIBUTED.value or _COORDINATOR.value is not None:
    parallel.initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
