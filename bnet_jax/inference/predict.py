"""Early-exit batch inference over a whole dataset split, saved per example and timed.

`predict_split` loads a trained workdir and its exit thresholds, puts the whole
preprocessed split on the device(s) once (split over a mesh's data axis when given)
and runs the early-exit cascade over it in chunks of `batch_size` rows that never
leave the devices (`cascade.Cascade.predict` on a `jax.Array`). Process 0 writes
``workdir/predictions_{split}.npz``. The cascade's pass over the split is timed
against the all-exits pass (`evaluate.all_exits`: every exit for every example, the
cost without early exit) on the same devices and batch size: the median of a few
repeats after a warm-up pass, each ending with its results on the host.

The two passes are not fed alike: the all-exits pass takes the split from the host
and puts each batch on the devices inside its timer, while the cascade's input is
already there (the transfer of a preprocessed split happens once per split).
"""

from __future__ import annotations

import functools
import json
import os
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh

from bnet_jax import criteria, nets, parallel, timing
from bnet_jax.inference import cascade
from bnet_jax.inputs import data
from bnet_jax.training import checkpoint, evaluate
from bnet_jax.criteria import Criterion

# Written by `benchmark.run`: {"step": S, "compute_dtype": D,
# "criteria": {criterion: {"thresholds": [...], ...}}}.
THRESHOLDS_FILE = "thresholds.json"


def predictions_path(workdir: str, split: str) -> str:
  """Where `predict_split` writes a split's per-example predictions."""
  return os.path.join(workdir, f"predictions_{split}.npz")


def saved_thresholds(workdir: str, criterion: Criterion | str, num_exits: int,
                     step: int) -> list[float]:
  """The thresholds `benchmark.run` chose for `criterion` on checkpoint `step`, from
  ``workdir/thresholds.json`` (where they are keyed by the criterion's name).

  Raises:
    ValueError: none saved for `criterion`, or saved for another checkpoint step
      (thresholds fitted to other weights); the one-line message says how to get them.
  """
  name = criteria.get(criterion).name
  path = os.path.join(workdir, THRESHOLDS_FILE)
  saved = {}
  if os.path.exists(path):
    with open(path) as f:
      saved = json.load(f)
  how = (f"Choose them with python -m experiments.benchmark --workdir={workdir} "
         f"--criteria={name}, or pass --thresholds=T1,... ({num_exits - 1} value(s), "
         f"one per exit but the last).")
  chosen = saved.get("criteria", {})
  if name not in chosen:
    where = (f"{path} does not exist" if not saved else
             f"{path} has none for {name}" if "criteria" in saved else
             f"{path} is in an older format, without the checkpoint step")
    raise ValueError(f"No {name} thresholds for {workdir}: {where}. {how}")
  if saved.get("step") != step:
    raise ValueError(f"{path} holds thresholds chosen for checkpoint step {saved.get('step')}, "
                     f"but the checkpoint is step {step}: rerun the benchmark. {how}")
  return list(chosen[name]["thresholds"])


def _put_split(images: np.ndarray, mesh: Mesh | None) -> jax.Array:
  """The whole split on the device(s): (N, ...) on this process's first device, or
  split over the mesh's data axis with zero rows appended up to a multiple of its
  device count (shards must be equal; the cascade's results for them are dropped)."""
  if mesh is None:
    return jax.device_put(images, jax.local_devices()[0])
  pad = -len(images) % mesh.size
  if pad:
    images = np.concatenate([images, np.zeros((pad, *images.shape[1:]), images.dtype)])
  return parallel.put(images, parallel.data_sharding(mesh))


def predict_split(workdir: str, split: str = "test", *, batch_size: int = 2048,
                  criterion: Criterion | str = "entropy", thresholds: Any = None,
                  mesh: Mesh | None = None, repeats: int = 5, step: int | None = None,
                  compute_dtype: str | None = None, **model_options: Any) -> dict:
  """Early-exit predictions for every example of a split, written to disk, and their speed.

  Args:
    workdir: a trained workdir (`experiments.train`).
    split: "test", "validation" (when the config holds one out) or "train" (the
      rest of TFDS's train split), as `data.load_splits` reads them.
    batch_size: rows per cascade chunk and per all-exits batch, over all devices.
    criterion: exit criterion: a `criteria.Criterion`, or a name in `criteria.CRITERIA`;
      the file and the result record its name.
    thresholds: E-1 floats; None: those `benchmark.run` saved for `criterion`.
    mesh: devices to split the split and every batch over (`parallel.make_mesh`);
      None: this process's first device. With several processes every process
      calls this alike and gets the whole result.
    repeats: timed passes of each kind, after one warm-up pass each.
    step: the checkpoint to load (None: the newest).
    compute_dtype: "float32" or "bfloat16" for both passes (None: the dtype the
      workdir trained in, `checkpoint.trained_compute_dtype`).
    **model_options: layer options for `checkpoint.load_trained` (parameters
      unchanged). On one device both passes also get `nets.inference_options` for
      their batch (the cascade per bucket), as in `benchmark.run`, these options
      taking precedence; on several devices they run the trained layers.

  Returns:
    ``split``, ``num_examples``, ``step``, ``compute_dtype``, ``criterion``, ``thresholds``,
    ``batch_size``, ``devices``, ``accuracy`` (of the early-exit labels),
    ``last_exit_accuracy`` (the all-exits pass's last exit, i.e. no early exit),
    ``exit_fractions`` (E floats), ``images_per_second`` (``{"cascade": ...,
    "all_exits": ...}``, median pass) and ``path`` (the predictions file: label,
    exit, score and true_label per example (N,), int32 / float32; step,
    criterion, thresholds, compute_dtype).

  Raises:
    FileNotFoundError: `workdir` holds no trained model.
    ValueError: bad batch_size, repeats, split or thresholds, or no thresholds
      saved for `criterion` and this checkpoint step (each message says what to change).
  """
  if batch_size < 1:
    raise ValueError(f"batch_size must be a positive number of rows; got {batch_size}.")
  if repeats < 1:
    raise ValueError(f"repeats must be at least 1; got {repeats}.")
  criterion = criteria.get(criterion)
  config = checkpoint.read_config(workdir)
  dtype = compute_dtype or checkpoint.trained_compute_dtype(workdir, config)
  trained = checkpoint.load_trained(workdir, step=step, mesh=mesh, compute_dtype=dtype,
                                    **model_options)
  net, variables = trained.net, trained.variables
  if thresholds is None:
    thresholds = saved_thresholds(workdir, criterion, net.num_exits, int(trained.step))
  t = cascade.check_thresholds(net, thresholds, criterion)
  available = ("train", "validation", "test") if config.num_validation else ("train", "test")
  if split not in available:
    raise ValueError(f"Unknown split {split!r} for {workdir}: use one of {', '.join(available)}.")
  loaded = data.load_splits(config.dataset, config.num_validation, config.data_dir or None,
                            download=config.download, only=(split,))[split]
  images = data.preprocess(config.dataset, loaded.images)
  n = len(images)

  if mesh is None or mesh.size == 1:
    def net_for(batch: int) -> nets.Network:
      return checkpoint.network(config, dtype, **{**nets.inference_options(config.model, batch),
                                                  **model_options})
    bucket_net, all_net = net_for, net_for(batch_size)
  else:
    bucket_net, all_net = None, net
  model = cascade.Cascade(net, variables, t, criterion=criterion, chunk_size=batch_size,
                          mesh=mesh, bucket_net=bucket_net)
  x = _put_split(images, mesh)
  run_cascade = functools.partial(model.predict, x)
  run_all = functools.partial(evaluate.all_exits, all_net, variables, images, batch_size,
                              mesh=mesh)
  # The warm-up passes (compilation) give the results.
  pred = cascade.Prediction(*(a[:n] for a in run_cascade()))
  logits = run_all().logits
  seconds = timing.interleaved_medians({"cascade": run_cascade, "all_exits": run_all},
                                       repeats=repeats, warmup=0)

  labels = np.asarray(loaded.labels, np.int32)
  path = predictions_path(workdir, split)
  if jax.process_index() == 0:
    np.savez(path, label=pred.label, exit=pred.exit, score=pred.score, true_label=labels,
             step=np.int64(trained.step), criterion=np.array(criterion.name), thresholds=t,
             compute_dtype=np.array(dtype))
  return {
      "split": split, "num_examples": n, "step": int(trained.step), "compute_dtype": dtype,
      "criterion": criterion.name,
      "thresholds": [float(v) for v in t], "batch_size": batch_size,
      "devices": 1 if mesh is None else mesh.size,
      "accuracy": float(np.mean(pred.label == labels)),
      "last_exit_accuracy": float(np.mean(np.argmax(logits[-1], -1) == labels)),
      "exit_fractions": [float(f) for f in np.bincount(pred.exit, minlength=net.num_exits) / n],
      "images_per_second": {k: n / s for k, s in seconds.items()},
      "path": path,
  }
