"""Data parallelism over a device mesh, on one host or many, with JAX's own machinery.

A `Mesh` with one axis, ``"data"``, spans every device of every process; arrays are
either split along their batch axis over it (`data_sharding`) or replicated
(`replicated`). Under `jax.jit` with these shardings XLA inserts the collectives (the
gradient all-reduce of training, the gathers of the cascade), so the same program
runs on one CPU, eight GPUs or a pod slice. `jax.distributed` joins the processes,
one per host, into one JAX program (`initialize`).

Two ways to build a global array from host data:

- `shard_batch`: each process passes only *its own rows* (training: every host reads
  its own slice of the data); process p's rows are the p-th block of the global batch.
- `put`: every process passes the *same whole array* and each device receives its
  part (evaluation and the cascade: small arrays that every host holds).

`fetch` brings a result back to every host, gathering across processes if needed.
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

DATA_AXIS = "data"


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None) -> None:
  """Joins this process to a multi-process JAX run (before any other JAX call).

  With no arguments JAX detects the cluster (Cloud TPU pod slices, SLURM, Open MPI);
  elsewhere pass all three, the same coordinator on every process.

  Args:
    coordinator_address: ``host:port`` of process 0, reachable from every process.
    num_processes: how many processes take part.
    process_id: this process's index, 0..num_processes-1.
  """
  jax.distributed.initialize(coordinator_address, num_processes, process_id)


def make_mesh(devices: list[jax.Device] | None = None) -> Mesh:
  """A one-axis ``"data"`` mesh over `devices` (default: every device of every process).

  Devices are ordered by process, so each process's devices hold one contiguous block
  of every data-sharded batch.
  """
  devices = jax.devices() if devices is None else list(devices)
  devices = sorted(devices, key=lambda d: (d.process_index, d.id))
  return Mesh(np.array(devices), (DATA_AXIS,))


def data_sharding(mesh: Mesh, axis: int = 0) -> NamedSharding:
  """Splits axis `axis` (the batch axis) of an array over the mesh's data axis."""
  return NamedSharding(mesh, PartitionSpec(*[None] * axis, DATA_AXIS))


def replicated(mesh: Mesh) -> NamedSharding:
  """A whole copy on every device of the mesh."""
  return NamedSharding(mesh, PartitionSpec())


def check_batch_size(batch_size: int, mesh: Mesh, what: str = "batch_size") -> None:
  """Raises a ValueError unless the global `batch_size` splits evenly over the mesh."""
  d = mesh.size
  if batch_size % d:
    lower = batch_size // d * d
    fits = f"{lower} or {lower + d}" if lower else f"{d}"
    raise ValueError(f"{what} {batch_size} does not split over the {d} devices of the mesh: "
                     f"use a multiple of {d}, e.g. {fits}.")


def _num_local(mesh: Mesh) -> int:
  return sum(d.process_index == jax.process_index() for d in mesh.devices.flat)


def local_batch_size(batch_size: int, mesh: Mesh) -> int:
  """Rows of a global batch of `batch_size` that this process supplies to `shard_batch`."""
  check_batch_size(batch_size, mesh)
  return batch_size // mesh.size * _num_local(mesh)


def shard_batch(batch: Any, mesh: Mesh) -> Any:
  """Global arrays, split along axis 0, from this process's rows of each.

  Args:
    batch: a pytree of numpy arrays (b, ...), b = `local_batch_size` of the global
      batch; process p's rows become the p-th block of the global batch.
    mesh: the mesh.

  Returns:
    The same pytree of global `jax.Array`s (B, ...), split over the data axis.
  """
  local = _num_local(mesh)

  def make(x):
    x = np.asarray(x)
    shape = (x.shape[0] * mesh.size // local, *x.shape[1:])
    return jax.make_array_from_process_local_data(data_sharding(mesh), x, shape)

  return jax.tree.map(make, batch)


def put(x: np.ndarray, sharding: NamedSharding) -> jax.Array:
  """A global array from a host array that every process holds whole."""
  x = np.asarray(x)
  return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])


def replicate(tree: Any, mesh: Mesh) -> Any:
  """Replicates a pytree on every device of `mesh`; every process must pass equal values.

  PRNG keys are moved as their raw key data (multi-process `device_put` takes only
  plain arrays).
  """
  sharding = replicated(mesh)

  def move(x):
    if isinstance(x, jax.Array) and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
      data = jax.device_put(jax.random.key_data(x), sharding)
      return jax.random.wrap_key_data(data, impl=jax.random.key_impl(x))
    return jax.device_put(x, sharding)

  return jax.tree.map(move, tree)


def wait_each_step() -> bool:
  """Whether a loop must wait for each step before dispatching the next.

  XLA:CPU's cross-process collectives (gloo) deadlocked here with tens of training
  steps in flight (jax 0.10.2, 2 processes x 4 CPU devices); waiting for each step
  never did. Accelerators keep asynchronous dispatch.
  """
  return jax.process_count() > 1 and jax.default_backend() == "cpu"


def fetch(x: jax.Array) -> np.ndarray:
  """The whole value of a global array as numpy, on every process."""
  if x.is_fully_addressable or x.is_fully_replicated:
    return np.asarray(x)
  return np.asarray(multihost_utils.process_allgather(x, tiled=True))

