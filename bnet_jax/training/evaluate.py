"""The all-exits pass over a whole split in fixed-size batches, and its cache on disk.

Batches are data-parallel over a device mesh (`parallel.make_mesh`; default: this
process's first device). The split is padded to whole global batches, so one
compiled program serves every batch; padding rows are masked out of the counts and
cut from the outputs, so results are exact and equal to one device's. In a
multi-process run every process passes the same whole split and runs the same
batches, feeding only its own devices' rows of each; every process gets the results.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable, Iterable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh
from scipy import special

from bnet_jax import criteria, nets, parallel, progress, runtime
from bnet_jax.inputs import data
from bnet_jax.training import checkpoint


@functools.lru_cache(maxsize=None)
def programs(net: nets.Network, mesh: Mesh) -> tuple[Callable, Callable]:
  """The jitted all-exits pass and per-exit correct counts, data-parallel over `mesh`."""
  rows, replicated = parallel.data_sharding(mesh), parallel.replicated(mesh)

  def outputs(variables, x):
    return nets.forward(net, variables, x)[0]

  def correct(variables, x, labels, mask):
    logits = nets.forward(net, variables, x)[0].logits
    hit = (jnp.argmax(logits, -1) == labels[None]) & mask[None]
    return jnp.sum(hit, axis=1, dtype=jnp.int32)

  return (runtime.jit(outputs, in_shardings=(replicated, rows),
                  out_shardings=parallel.data_sharding(mesh, axis=1)),
          runtime.jit(correct, in_shardings=(replicated, rows, rows, rows),
                  out_shardings=replicated))


def _prepare(net: nets.Network, variables: nets.Variables, images: np.ndarray,
             batch_size: int, mesh: Mesh | None, progress_desc: str | None
             ) -> tuple[tuple[Callable, Callable], nets.Variables, Any, int, Iterable[int]]:
  """What a pass over `images` needs: the programs, the replicated variables, the
  row sharding, the global batch (at most `batch_size`, cut to the split's size,
  rounded up to a multiple of the mesh's device count) and the start row of each
  batch. A ValueError refuses `batch_size` < 1 (a typo, not a request for one row)."""
  if batch_size < 1:
    raise ValueError(f"batch_size must be a positive number of rows; got {batch_size}.")
  nets.check_images(net, images)
  mesh = mesh or parallel.make_mesh(jax.local_devices()[:1])
  n, d = len(images), mesh.size
  batch_size = -(-max(1, min(batch_size, n)) // d) * d  # At least 1 row for an empty split.
  starts = range(0, n, batch_size)
  if progress_desc is not None:
    starts = progress.bar(starts, desc=progress_desc, unit="batch")
  return (programs(net, mesh), parallel.replicate(variables, mesh),
          parallel.data_sharding(mesh), batch_size, starts)


def _pad(x: np.ndarray, rows: int) -> np.ndarray:
  """`x` with zero rows appended up to `rows`."""
  return np.concatenate([x, np.zeros((rows - len(x), *x.shape[1:]), x.dtype)])


def all_exits(net: nets.Network, variables: nets.Variables, images: np.ndarray,
              batch_size: int = 1000, progress_desc: str | None = None,
              mesh: Mesh | None = None) -> nets.Outputs:
  """Every exit's logits and entropies for a whole split, as numpy arrays.

  The split is cut into global batches of exactly `batch_size` rows (rounded up to a
  multiple of the mesh's device count; the last batch padded), so one compiled
  program serves every batch.

  Args:
    net: the network.
    variables: its variables.
    images: (N, H, W, C) float images, preprocessed; the same on every process.
    batch_size: rows per compiled call, over all devices.
    progress_desc: label of a progress bar over the batches (None: no bar).
    mesh: devices to split each batch over (None: this process's first device).

  Returns:
    `Outputs` with logits (E, N, C) and entropy (E, N), numpy, on every process.
  """
  (forward, _), variables, rows, batch_size, starts = _prepare(
      net, variables, images, batch_size, mesh, progress_desc)
  chunks = []
  for start in starts:
    x = images[start:start + batch_size]
    out = forward(variables, parallel.put(_pad(x, batch_size), rows))
    chunks.append([parallel.fetch(a)[:, :len(x)] for a in out])
  if not chunks:
    e, c = net.num_exits, net.num_classes
    return nets.Outputs(np.zeros((e, 0, c), np.float32), np.zeros((e, 0), np.float32))
  return nets.Outputs(*(np.concatenate(parts, axis=1) for parts in zip(*chunks)))


def accuracy_per_exit(logits: np.ndarray, labels: np.ndarray) -> list[float]:
  """Fraction of correct argmax predictions per exit: (E, N, C), (N,) -> E floats."""
  return [float(a) for a in np.mean(np.argmax(logits, -1) == labels[None], axis=1)]


def loss_per_exit(logits: np.ndarray, labels: np.ndarray) -> list[float]:
  """Mean softmax cross-entropy (nats) per exit: (E, N, C), (N,) -> E floats."""
  logp = special.log_softmax(np.asarray(logits, np.float64), axis=-1)
  picked = np.take_along_axis(logp, np.asarray(labels)[None, :, None], axis=-1)[..., 0]
  return [float(v) for v in -picked.mean(axis=1)]


def correct_per_exit(net: nets.Network, variables: nets.Variables, images: np.ndarray,
                     labels: np.ndarray, batch_size: int = 1000, mesh: Mesh | None = None
                     ) -> np.ndarray:
  """How many of the split's examples each exit classifies correctly: (E,) int64.

  Counted on the devices: padding rows carry mask 0, so the counts are exact and
  nothing but E integers per batch returns to the host. Arguments as in `all_exits`,
  with labels (N,) int.
  """
  (_, count), variables, rows, batch_size, starts = _prepare(
      net, variables, images, batch_size, mesh, None)
  total = np.zeros(net.num_exits, np.int64)
  for start in starts:
    x, y = images[start:start + batch_size], np.asarray(labels[start:start + batch_size])
    mask = np.arange(batch_size) < len(x)
    total += parallel.fetch(count(variables, parallel.put(_pad(x, batch_size), rows),
                                  parallel.put(_pad(y.astype(np.int32), batch_size), rows),
                                  parallel.put(mask, rows)))
  return total


def evaluate_split(net: nets.Network, variables: nets.Variables, images: np.ndarray,
                   labels: np.ndarray, batch_size: int = 1000, mesh: Mesh | None = None) -> dict:
  """``{"num_examples": N, "accuracy_per_exit": [...]}`` of one split (see `correct_per_exit`)."""
  n = len(labels)
  correct = correct_per_exit(net, variables, images, labels, batch_size, mesh)
  return {"num_examples": int(n), "accuracy_per_exit": [float(c / n) for c in correct]}


def exits_path(workdir: str, split: str) -> str:
  """Where `cache_exits` stores a split's per-exit outputs."""
  return os.path.join(workdir, f"exits_{split}.npz")


def cache_exits(workdir: str, splits: Sequence[str] = ("validation", "test"),
                batch_size: int = 1000, mesh: Mesh | None = None,
                compute_dtype: str | None = None) -> dict[str, CachedExits]:
  """Runs the all-exits pass of `workdir`'s model once per split and saves it.

  Writes ``workdir/exits_{split}.npz`` (`exits_path`) with ``logits`` (E, N, C)
  float32, ``labels`` (N,) int32, ``step`` (the checkpoint used: the newest that
  reads back, `checkpoint.load_trained`) and ``compute_dtype`` (the workdir's unless
  `compute_dtype` overrides it). Screening, selection and the benchmark's accuracy
  figures read these instead of rerunning the network. With several processes, all
  of them compute and process 0 writes.

  Returns:
    What was written, by split (every process gets it).

  Raises:
    ValueError: `batch_size` < 1 (before anything is loaded), or a split the
      config does not hold.
  """
  if batch_size < 1:
    raise ValueError(f"batch_size must be a positive number of rows; got {batch_size}.")
  trained = checkpoint.load_trained(workdir, mesh=mesh, compute_dtype=compute_dtype)
  c = trained.config
  loaded = data.load_splits(c.dataset, c.num_validation, c.data_dir or None, download=c.download,
                            only=splits)
  cached = {}
  for split in splits:
    if split not in loaded:
      raise ValueError(f"Split {split!r} is not available (num_validation={c.num_validation}).")
    images = data.preprocess(c.dataset, loaded[split].images)
    out = all_exits(trained.net, trained.variables, images, batch_size,
                    progress_desc=f"all exits: {split}", mesh=mesh)
    cached[split] = CachedExits(out.logits.astype(np.float32), loaded[split].labels,
                                int(trained.step), str(trained.net.compute_dtype))
    if jax.process_index() == 0:
      np.savez(exits_path(workdir, split), logits=cached[split].logits,
               labels=cached[split].labels, step=cached[split].step,
               compute_dtype=cached[split].compute_dtype)
  return cached


class StaleExitsError(ValueError):
  """A cached ``exits_{split}.npz`` is not from the workdir's newest checkpoint (or
  not in the compute dtype asked for): figures from it would describe another model.
  `reason` is the problem alone, without the message's advice to rerun."""

  def __init__(self, reason: str, advice: str):
    super().__init__(f"{reason}: {advice}")
    self.reason = reason


class CachedExits(NamedTuple):
  """A split's cached all-exits outputs: logits (E, N, C), labels (N,), and the
  checkpoint step and compute dtype they came from (None when built in memory)."""
  logits: np.ndarray
  labels: np.ndarray
  step: int | None = None
  compute_dtype: str | None = None

  def scores(self, criterion: criteria.Criterion | str) -> np.ndarray:
    """(E, N) confidence scores under `criterion` (a `criteria.Criterion` or its name)."""
    return np.asarray(criteria.get(criterion).score(jnp.asarray(self.logits)))

  def correct(self) -> np.ndarray:
    """(E, N) whether each exit's argmax is the label."""
    return np.argmax(self.logits, -1) == self.labels[None]


def load_exits(workdir: str, split: str, compute_dtype: str | None = None,
               step: int | None = None) -> CachedExits:
  """Reads what `cache_exits` wrote, refusing a cache of another checkpoint.

  Args:
    workdir: a trained workdir.
    split: "validation" or "test".
    compute_dtype: also require the cache to be in this dtype (None: any).
    step: require the cache to be from this checkpoint step: the one whose weights
      the caller uses (`checkpoint.Trained.step`). None: the newest finalized
      checkpoint, by the directory listing (no restore). When that one does not
      read back, the weights come from an older one, so pass `step`.

  Raises:
    FileNotFoundError: no cache; the message says how to make it.
    StaleExitsError: the cache is from another step than `step` (training went on
      after it was made), or lacks the step (an older format), or is in another
      compute dtype than `compute_dtype`.
  """
  path = exits_path(workdir, split)
  rerun = f"rerun python -m experiments.evaluate --workdir={workdir}"
  if not os.path.exists(path):
    raise FileNotFoundError(f"{path} is missing: {rerun}")
  with np.load(path) as f:
    saved_step = int(f["step"]) if "step" in f else None
    dtype = str(f["compute_dtype"]) if "compute_dtype" in f else None
    cached = CachedExits(f["logits"], f["labels"], saved_step, dtype)
  name = os.path.basename(path)
  want = step if step is not None else checkpoint.latest_step(workdir)
  if cached.step is None:
    raise StaleExitsError(f"{name} records no checkpoint step (an older format)", rerun)
  if want is not None and cached.step != want:
    which = "the checkpoint in use" if step is not None else "the newest checkpoint"
    raise StaleExitsError(f"{name} is from step {cached.step} but {which} is step {want}",
                          rerun)
  if compute_dtype is not None and dtype != compute_dtype:
    raise StaleExitsError(f"{name} was computed in {dtype}, not {compute_dtype}",
                          f"{rerun} --compute_dtype={compute_dtype}")
  return cached
