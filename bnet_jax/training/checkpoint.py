"""Orbax checkpoints that know which model they hold.

Each checkpoint stores the train state and a small JSON record of the model name,
dataset and parameter shapes. Before anything is written to a workdir, its latest
checkpoint's record is compared with the run's: another model's checkpoint is
refused with an error, never overwritten. A checkpoint that cannot be read
(truncated or missing files) is skipped with a warning in favour of the newest
intact one; training moves it aside (`set_aside`), never deletes it.
"""

from __future__ import annotations

import datetime
import importlib.metadata
import json
import logging as std_logging
import os
import platform as host_platform
import sys
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
from absl import logging
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from bnet_jax import nets, runtime
from bnet_jax.inputs import data

RUNS_FILE = "runs.json"
CONFIG_HISTORY_FILE = "config_history.json"
CORRUPT_PREFIX = "corrupt-"  # checkpoints/corrupt-<step>: an unreadable checkpoint set aside.
_PACKAGES = ("bnet-jax", "jax", "jaxlib", "flax", "optax", "orbax-checkpoint")


class CheckpointMismatchError(ValueError):
  """The workdir holds a checkpoint of another model, dataset or shape."""


class CheckpointUnreadableError(ValueError):
  """No checkpoint asked for reads back (each one's reason was logged as a warning)."""


def record(model: str, dataset: str, params: Any) -> dict:
  """The identity of a run: model, dataset and every parameter's shape."""
  shapes = {jax.tree_util.keystr(path): list(np.shape(leaf))
            for path, leaf in jax.tree_util.tree_leaves_with_path(params)}
  return {"model": model, "dataset": dataset, "param_shapes": shapes}


def manager(workdir: str, *, max_to_keep: int = 3, create: bool = True) -> ocp.CheckpointManager:
  """A CheckpointManager over ``workdir/checkpoints`` keeping the last `max_to_keep`."""
  options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=create)
  handlers = {"state": ocp.StandardCheckpointHandler(), "meta": ocp.JsonCheckpointHandler()}
  return ocp.CheckpointManager(_checkpoints_dir(workdir), options=options,
                               item_handlers=handlers)


def latest_step(workdir: str) -> int | None:
  """The step of the newest finalized checkpoint in `workdir`, or None.

  Read from the directory listing, with no CheckpointManager: a manager joins the
  processes' barriers, and in a multi-process run one process may find the
  checkpoint directory that another has just created for a fresh run, so the two
  would build different managers and wait at different barriers.
  """
  steps = _steps_newest_first(workdir)
  return steps[0] if steps else None


def _checkpoints_dir(workdir: str) -> str:
  return os.path.join(os.path.abspath(workdir), "checkpoints")


def _steps_newest_first(workdir: str) -> list[int]:
  """The steps of `workdir`'s finalized checkpoints, newest first (directory listing)."""
  return sorted(ocp.utils.checkpoint_steps(_checkpoints_dir(workdir)), reverse=True)


def _restore_as_saved(mngr: ocp.CheckpointManager, step: int, sharding: jax.sharding.Sharding
                      ) -> Any:
  """Checkpoint `step`'s train state as saved (structure, shapes, dtypes), on `sharding`."""
  # A target, not the saved shardings: those name devices that may not exist here.
  target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=sharding),
                        mngr.item_metadata(step)["state"].tree)
  return mngr.restore(step, args=ocp.args.Composite(
      state=ocp.args.StandardRestore(target)))["state"]


def _first_device() -> jax.sharding.Sharding:
  return jax.sharding.SingleDeviceSharding(jax.local_devices()[0])


def _warn_unreadable(workdir: str, step: int, error: Exception) -> str:
  # TensorStore appends a bound method's repr after "See full TensorStore details".
  reason = str(error).split(" See full TensorStore details")[0].splitlines()
  reason = reason[0][:200] if reason and reason[0] else type(error).__name__
  line = f"Checkpoint {step} in {workdir} is unreadable ({reason}); skipping it."
  logging.warning("%s", line)
  return line


class _FailedReadReports(std_logging.Filter):
  """Drops asyncio's reports (each with a traceback) of the reads still in flight when
  a restore from one of `directories` failed: the warning line has said what is wrong."""

  def __init__(self):
    super().__init__()
    self.directories: set[str] = set()

  def filter(self, record: std_logging.LogRecord) -> bool:
    message = record.getMessage()
    return not ("exception was never retrieved" in message
                and any(d in message for d in self.directories))


_FAILED_READS = _FailedReadReports()


def _unreported_late_reads(previous: Callable[[Any], None]) -> Callable[[Any], None]:
  """A `sys.unraisablehook` that drops what a failed restore's remaining reads raise
  after Orbax has given up: TensorStore's callbacks into the closed event loop ("Event
  loop is closed") and Orbax's read coroutines that never finished."""

  def hook(unraisable: Any) -> None:
    error, code = unraisable.exc_value, getattr(unraisable.object, "cr_code", None)
    closed_loop = isinstance(error, RuntimeError) and str(error) == "Event loop is closed"
    orbax_read = code is not None and f"{os.sep}orbax{os.sep}" in code.co_filename
    if not (closed_loop or orbax_read):
      previous(unraisable)

  hook.bnet_jax = True
  return hook


def _quiet_failed_restore(workdir: str, step: int) -> None:
  """Silences the late reports of a failed restore of `step`, for the rest of the process."""
  _FAILED_READS.directories.add(os.path.join(_checkpoints_dir(workdir), str(step)))
  std_logging.getLogger("asyncio").addFilter(_FAILED_READS)  # Added once: a no-op after.
  if not getattr(sys.unraisablehook, "bnet_jax", False):
    sys.unraisablehook = _unreported_late_reads(sys.unraisablehook)


def _first_readable(workdir: str, steps: list[int], sharding: jax.sharding.Sharding, *,
                    with_record: bool) -> tuple[int | None, Any, dict[int, str]]:
  """Tries `steps` in order: (step, its state, {unreadable step: warning}).

  Each failure is logged as a one-line warning (`_warn_unreadable`), and the
  tracebacks that Orbax's unfinished reads would print later are silenced; step and
  state are None when none reads. `with_record` also reads each step's record.
  """
  unreadable = {}
  with manager(workdir, create=False) as mngr:
    for step in steps:
      try:
        if with_record:
          read_record(mngr, step)
        return step, _restore_as_saved(mngr, step, sharding), unreadable
      except Exception as e:  # Orbax, TensorStore and JSON each raise their own types.
        _quiet_failed_restore(workdir, step)
        unreadable[step] = _warn_unreadable(workdir, step, e)
  return None, None, unreadable


def newest_intact(workdir: str) -> tuple[int | None, dict[int, str]]:
  """The newest checkpoint step whose record and state read back, and the newer unreadable ones.

  Each candidate, newest first, is read whole (record and every array, on this
  process's first device); a failure is logged as a warning and the next older
  one is tried.

  Returns:
    (step or None when no checkpoint reads, {unreadable step: the warning line}).
  """
  steps = _steps_newest_first(workdir)
  if not steps:
    return None, {}
  step, _, unreadable = _first_readable(workdir, steps, _first_device(), with_record=True)
  return step, unreadable


def set_aside(workdir: str, step: int) -> str:
  """Renames checkpoint `step` to ``checkpoints/corrupt-<step>`` (``-1``, ``-2``... if taken).

  Orbax ignores a directory whose name is not a step, so the files stay for
  inspection and a new checkpoint of the same step cannot replace them.

  Returns:
    The new path.
  """
  root = _checkpoints_dir(workdir)
  target, n = os.path.join(root, f"{CORRUPT_PREFIX}{step}"), 0
  while os.path.exists(target):
    n += 1
    target = os.path.join(root, f"{CORRUPT_PREFIX}{step}-{n}")
  os.rename(os.path.join(root, str(step)), target)
  return target


def read_record(mngr: ocp.CheckpointManager, step: int) -> dict:
  """The identity record saved with checkpoint `step`."""
  return mngr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]


def check_compatible(workdir: str, expected: dict, step: int | None) -> None:
  """Raises CheckpointMismatchError unless checkpoint `step` (None: none) matches `expected`."""
  if step is None:
    return
  with manager(workdir, create=False) as mngr:
    found = read_record(mngr, step)
  for key in ("model", "dataset"):
    if found.get(key) != expected[key]:
      raise CheckpointMismatchError(
          f"{workdir} holds a checkpoint (step {step}) of {key} {found.get(key)!r}, but this "
          f"run is for {expected[key]!r}. Use another --workdir; nothing was written.")
  if found.get("param_shapes") != expected["param_shapes"]:
    diff = _shape_diff(found["param_shapes"], expected["param_shapes"])
    raise CheckpointMismatchError(
        f"{workdir} holds a checkpoint (step {step}) of {found['model']!r} with other "
        f"parameter shapes ({'; '.join(diff[:4])}). Use another --workdir; nothing was written.")


def _shape_diff(found: dict, expected: dict) -> list[str]:
  return [f"{k}: checkpoint {found.get(k)} vs model {expected.get(k)}"
          for k in sorted(set(found) | set(expected)) if found.get(k) != expected.get(k)]


def save(mngr: ocp.CheckpointManager, step: int, state: Any, meta: dict) -> None:
  """Saves `state` with its identity record (asynchronously; see `mngr.wait_until_finished`)."""
  mngr.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                          meta=ocp.args.JsonSave(meta)), force=True)


def restore(mngr: ocp.CheckpointManager, step: int, target: Any) -> Any:
  """Restores checkpoint `step` into the structure, shapes and dtypes of `target`."""
  abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, target)
  return mngr.restore(step, args=ocp.args.Composite(
      state=ocp.args.StandardRestore(abstract)))["state"]


class Trained(NamedTuple):
  """A trained network loaded from a workdir."""
  config: ml_collections.ConfigDict
  net: Any
  variables: dict
  step: int


def _untrained(workdir: str) -> str:
  return (f"{workdir} holds no trained model (config.json and checkpoints/). Train one "
          f"first: python -m experiments.train --config=experiments/configs/lenet_mnist.py:tuned "
          f"--workdir={workdir}")


def read_config(workdir: str) -> ml_collections.ConfigDict:
  """The config a workdir was trained with (its config.json).

  An empty ``data_dir`` becomes the data dir its newest training run read (runs.json)
  when $TFDS_DATA_DIR is unset and that directory exists, so readers of the
  workdir find the data in a fresh shell.
  """
  path = os.path.join(workdir, "config.json")
  if not os.path.exists(path):
    raise FileNotFoundError(_untrained(workdir))
  with open(path) as f:
    config = ml_collections.ConfigDict(json.load(f))
  recorded = next((r["data_dir"] for r in reversed(runs(workdir)) if r.get("data_dir")), None)
  if (not config.get("data_dir") and not os.environ.get("TFDS_DATA_DIR") and recorded
      and os.path.isdir(recorded)):
    config.data_dir = recorded
  return config


def network(config: ml_collections.ConfigDict, compute_dtype: str | None = None,
            **model_options: Any) -> nets.Network:
  """The network a training config describes, with some layer options overridden.

  The network takes the dataset's images and classes (``input_shape``, ``num_classes``
  from `data.spec`) unless the options give them, so configs need not repeat them.
  "auto" layer implementations are chosen for the running platform
  (`nets.resolve_options`); none of them changes the parameters.

  Args:
    config: a training config.
    compute_dtype: "float32", "bfloat16" or "auto" (None: the config's
      ``compute_dtype``; float32 for configs written before it existed).
    **model_options: options replacing the config's ``model_options``.
  """
  dtype = runtime.compute_dtype(compute_dtype or config.get("compute_dtype", "float32"))
  dataset = data.spec(config.dataset)
  return nets.get(config.model, dtype=dtype, **{
      "input_shape": dataset.image_shape, "num_classes": dataset.num_classes,
      **config.model_options.to_dict(), **model_options})


def environment() -> dict:
  """Where this process runs: package versions, backend, devices, Python."""
  versions = {}
  for name in _PACKAGES:
    try:
      versions[name] = importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
      versions[name] = None
  devices = jax.devices()
  return {"versions": versions, "python": host_platform.python_version(),
          "backend": jax.default_backend(), "device_kind": devices[0].device_kind,
          "device_count": len(devices), "process_count": jax.process_count()}


def _utc_now() -> str:
  return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def write_json(path: str, value: Any) -> None:
  """Writes `value` to `path` atomically (a reader never sees half a file)."""
  with open(path + ".tmp", "w") as f:
    json.dump(value, f, indent=2)
  os.replace(path + ".tmp", path)


def config_history(workdir: str) -> list[dict]:
  """The config changes accepted on resume (``workdir/config_history.json``), oldest first."""
  path = os.path.join(workdir, CONFIG_HISTORY_FILE)
  if not os.path.exists(path):
    return []
  with open(path) as f:
    return json.load(f)


def record_config_change(workdir: str, step: int, changes: dict[str, tuple[Any, Any]],
                         override: bool) -> dict:
  """Appends ``{"step", "time", "changes": {field: [old, new]}, "override"}`` to the history.

  `override`: a training-defining field changed under ``allow_config_change``.
  Process 0 writes.

  Returns:
    The entry.
  """
  entry = {"step": int(step), "time": _utc_now(),
           "changes": {k: list(v) for k, v in changes.items()}, "override": override}
  if jax.process_index() == 0:
    write_json(os.path.join(workdir, CONFIG_HISTORY_FILE), config_history(workdir) + [entry])
  return entry


def runs(workdir: str) -> list[dict]:
  """The training runs recorded in ``workdir/runs.json``, oldest first (may be empty)."""
  path = os.path.join(workdir, RUNS_FILE)
  if not os.path.exists(path):
    return []
  with open(path) as f:
    return json.load(f)["runs"]


def record_run(workdir: str, start_step: int, net: nets.Network, model_options: dict,
               compute_dtype: str, data_dir: str, steps_per_epoch: int, warmup_steps: int,
               initialised_from: dict | None = None) -> dict:
  """Appends this run's resolved choices and environment to ``workdir/runs.json``.

  What "auto" became on this platform is recorded here, beside config.json, which
  keeps the user's fields as given; so are the absolute TFDS `data_dir` it read
  (`read_config` falls back to it), the steps its epochs and warmup came to, and, as
  "init_from", `initialised_from`: ``{"workdir", "step"}`` of the checkpoint a fresh run
  started from (`init_from`; None: none). Process 0 writes; a resumed run (on any
  backend) appends its own entry.

  Returns:
    The entry.
  """
  entry = {"start_step": int(start_step), "network": net.name, "time": _utc_now(),
           "model_options": dict(model_options), "compute_dtype": compute_dtype,
           "data_dir": data_dir, "steps_per_epoch": int(steps_per_epoch),
           "warmup_steps": int(warmup_steps), "init_from": initialised_from,
           "xla_compiler_options": runtime.compiler_options(), **environment()}
  if jax.process_index() == 0:
    write_json(os.path.join(workdir, RUNS_FILE), {"runs": runs(workdir) + [entry]})
  return entry


def trained_compute_dtype(workdir: str, config: ml_collections.ConfigDict) -> str:
  """The compute dtype `workdir`'s newest training run used (float32 for older workdirs)."""
  history = runs(workdir)
  if history:
    return history[-1]["compute_dtype"]
  return runtime.compute_dtype(config.get("compute_dtype", "float32"))


def load_trained(workdir: str, *, step: int | None = None, mesh: Mesh | None = None,
                 compute_dtype: str | None = None, **model_options: Any) -> Trained:
  """The config, network and eval-mode variables of one of `workdir`'s checkpoints.

  Args:
    workdir: a directory written by `experiments.train`.
    step: the checkpoint's step (None: the newest that reads back, with a warning
      for each newer unreadable one; see `newest_intact`).
    mesh: restore every array replicated on this mesh (needed with several
      processes); None: on this process's first device. Either way the
      checkpoint may come from another device count.
    compute_dtype: run the network in this dtype (None: the one it trained in,
      `trained_compute_dtype`).
    **model_options: override the config's model options (e.g. a layer
      implementation for inference); parameters are unchanged by these.

  Raises:
    FileNotFoundError: no config.json, no checkpoint in `workdir`, or none of `step`.
    CheckpointUnreadableError: none of the checkpoints asked for reads back.
  """
  config = read_config(workdir)
  kept = _steps_newest_first(workdir)
  if not kept:
    raise FileNotFoundError(_untrained(workdir))
  if step is not None and step not in kept:
    raise FileNotFoundError(f"{workdir} has no checkpoint of step {step}; it keeps steps "
                            f"{', '.join(map(str, kept))}.")
  candidates = [step] if step is not None else kept
  net = network(config, compute_dtype or trained_compute_dtype(workdir, config), **model_options)
  sharding = _first_device() if mesh is None else NamedSharding(mesh, PartitionSpec())
  step, state, unreadable = _first_readable(workdir, candidates, sharding, with_record=False)
  if state is None:
    raise CheckpointUnreadableError(
        f"No checkpoint of {workdir} reads back (step(s) {', '.join(map(str, unreadable))}: "
        f"see the warnings above). Rerun python -m experiments.train on it: training sets "
        f"unreadable checkpoints aside (checkpoints/{CORRUPT_PREFIX}<step>) and starts again.")
  abstract = jax.eval_shape(lambda: nets.init(net, jax.random.key(0)))["params"]
  if record(net.name, "", state["params"]) != record(net.name, "", abstract):
    raise CheckpointMismatchError(f"The checkpoint in {workdir} does not fit {net.name}.")
  return Trained(config, net, {"params": state["params"], **state["model_state"]}, step)


def _main_network_name(net: nets.Network) -> str:
  """How messages name `net`'s plain main network: "'lenet' (b_lenet's main network)"."""
  # The registry's pairs: b_lenet/lenet, b_resnet8/resnet8, b_resnet20_trunk_heads/resnet20.
  plain = net.name.removeprefix("b_").removesuffix("_trunk_heads")
  return f"{plain!r} ({net.name}'s main network)" if plain != net.name else (
      f"{net.name}'s main network")


def init_from(workdir: str, net: nets.Network, variables: dict, dataset: str,
              mesh: Mesh | None = None) -> tuple[dict, int]:
  """`variables` of `net` with its trunk and main exit from `workdir`'s trained plain network.

  `workdir` must hold `net.main_network()` (same module names and shapes: e.g. model
  "lenet" for "b_lenet") trained on `dataset`; its newest readable checkpoint is used
  (`load_trained`), and every parameter and BatchNorm statistic is copied
  (`nets.transplant`); the early exits' heads keep `variables`'.

  Args:
    workdir: the plain network's workdir (``config.init_from``).
    net: the multi-exit network.
    variables: `net`'s fresh variables (`nets.init`).
    dataset: the dataset `net` trains on.
    mesh: restore replicated on this mesh (see `load_trained`).

  Returns:
    (variables, the checkpoint's step).

  Raises:
    FileNotFoundError: `workdir` is missing or holds no trained model.
    CheckpointMismatchError: it holds another model, or one trained on another dataset.
  """
  expected = _main_network_name(net)
  if not os.path.isdir(workdir):
    raise FileNotFoundError(f"init_from={workdir} does not exist: pass the workdir where "
                            f"{expected} was trained.")
  trained = load_trained(workdir, mesh=mesh)
  main = [m for m in nets.module_names(net.main_network()) if m in variables["params"]]
  found = record(trained.net.name, trained.config.dataset, trained.variables["params"])
  want = record(net.name, dataset, {m: variables["params"][m] for m in main})
  if found["param_shapes"] != want["param_shapes"]:
    diff = _shape_diff(found["param_shapes"], want["param_shapes"])
    raise CheckpointMismatchError(
        f"init_from={workdir} holds model {trained.net.name!r} (step {trained.step}), but "
        f"{net.name}'s exits go on {expected} ({len(diff)} parameters differ, e.g. "
        f"{diff[0]}): pass a workdir of that network. Nothing was written.")
  if trained.config.dataset != dataset:
    raise CheckpointMismatchError(
        f"init_from={workdir} holds {trained.net.name!r} trained on {trained.config.dataset!r}, "
        f"but this run is on {dataset!r}: pass a workdir trained on {dataset!r}. Nothing was "
        f"written.")
  return nets.transplant(net, trained.variables, variables), trained.step
