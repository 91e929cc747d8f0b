"""Training: the pure train step, the paper's two-phase schedule, checkpoints.

The paper's schedule trains the main network alone (every trunk stage and the
last exit) and then the whole BranchyNet jointly from those weights. Each phase
has its own optimizer state, created fresh when the phase begins; the main phase
updates only the main network's parameters. Steps are numbered across phases, so
a checkpoint's step says which phase produced it and a resumed run continues
exactly where it stopped: batches, augmentation and dropout keys are all derived
from (seed, step).

Exits on a trained network (SDN's "IC-only" training): ``config.init_from`` names the
workdir of the plain main network (e.g. model "lenet" for "b_lenet"); a fresh run starts
from its newest readable checkpoint, every module they share copied and the new heads
freshly initialised (`checkpoint.init_from`). ``config.train_trunk=False`` then trains
the early exits' heads alone on the frozen trunk and main exit (`heads_only_phase`);
True fine-tunes everything in the usual joint phase.

A config's fields are of two kinds (`TRAINING_FIELDS`, `RUN_CONTROL_FIELDS`). On
resume, a changed training-defining field is refused (`ConfigChangeError`) unless
``allow_config_change`` is set, except more epochs, which train further; accepted
changes are appended to ``workdir/config_history.json``. A config.json written before a
field was renamed is read in today's form first (`migrate_config`).
"""

from __future__ import annotations

import dataclasses
import fnmatch
import json
import os
import time
from collections.abc import Callable
from typing import Any

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from jax.experimental import multihost_utils
from jax.sharding import Mesh

from bnet_jax import nets, parallel, progress, runtime
from bnet_jax.inputs import augment, data
from bnet_jax.training import checkpoint, evaluate, losses, summary


# Fields that define what training computes: a checkpoint continues only under the
# same values (more epochs excepted). Every model option but a layer implementation
# ("model_options.*_impl", "*_kernel_grad": run control) is here: depth, exit placement.
TRAINING_FIELDS = ("model", "model_options", "dataset", "seed", "batch_size", "main_epochs",
                   "joint_epochs", "loss_weights", "optimizer", "learning_rate", "momentum",
                   "beta1", "beta2", "weight_decay", "lr_schedule", "warmup_epochs", "augment",
                   "max_shift", "num_validation", "init_from", "train_trunk")
# Training-defining fields that configs may lack (newer than most of them): the value an
# absent one means, wherever a config or config.json is read or compared. init_from: the
# workdir of the plain main network to start from ("": none); train_trunk: False trains
# only the early exits' heads (`heads_only_phase`).
FIELD_DEFAULTS = {"init_from": "", "train_trunk": True}
# Fields that say how this run executes, free to change on resume. compute_dtype is
# here although bfloat16 changes the numerics: parameters and optimizer state stay
# float32 whatever it is, and "auto" resolves per platform, so resuming a CPU run on
# a TPU (bfloat16) must not be refused; runs.json records what each run used.
RUN_CONTROL_FIELDS = ("model_options.*_impl", "model_options.*_kernel_grad", "compute_dtype",
                      "data_dir", "download", "eval_batch_size", "checkpoint_every_epochs",
                      "keep_checkpoints", "halt_after_steps", "allow_config_change")
_EPOCH_FIELDS = ("main_epochs", "joint_epochs")


class ConfigChangeError(ValueError):
  """Resuming with a training-defining field changed, without ``allow_config_change``."""


def is_training_field(name: str) -> bool:
  """Whether dotted field `name` (e.g. "model_options.depth") defines training.

  Fields named nowhere count as training-defining: refusing is the safe default.
  """
  return not any(fnmatch.fnmatchcase(name, p) for p in RUN_CONTROL_FIELDS)


def flatten_fields(fields: dict, prefix: str = "") -> dict[str, Any]:
  """{"a": {"b": 1}} -> {"a.b": 1}; lists and tuples are values."""
  flat = {}
  for k, v in fields.items():
    if isinstance(v, dict):
      flat.update(flatten_fields(v, f"{prefix}{k}."))
    else:
      flat[f"{prefix}{k}"] = v
  return flat


def config_changes(old: dict, new: dict) -> dict[str, tuple[Any, Any]]:
  """{dotted field: (old, new)} for every field whose JSON value differs (absent: None)."""
  a, b = flatten_fields(old), flatten_fields(new)
  return {k: (a.get(k), b.get(k)) for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)}


def config_fields(config: ml_collections.ConfigDict) -> dict:
  """The config as config.json holds it (tuples as lists)."""
  return json.loads(config.to_json_best_effort())


def _saved_config(workdir: str) -> dict | None:
  """The workdir's config.json fields as written (None: no config.json)."""
  path = os.path.join(workdir, "config.json")
  if not os.path.exists(path):
    return None
  with open(path) as f:
    return json.load(f)


def _needing_override(changes: dict[str, tuple[Any, Any]]) -> dict[str, tuple[Any, Any]]:
  """The changes that only ``allow_config_change`` admits: training-defining fields
  other than the epochs (which may grow, `check_epoch_change`)."""
  return {k: v for k, v in changes.items() if is_training_field(k) and k not in _EPOCH_FIELDS}


def migrate_config(old: dict, config: ml_collections.ConfigDict, steps_per_epoch: int
                   ) -> dict:
  """A workdir's config.json fields `old` in today's form, so that an equivalent config
  is no change.

  config.json written before ``warmup_epochs`` holds ``warmup_steps``: that becomes
  ``config.warmup_epochs`` if it gives as many steps at this run's `steps_per_epoch`
  (the old run's too, unless batch_size changed), else warmup_steps / steps_per_epoch.
  """
  if "warmup_steps" not in old:
    return old
  fields = {k: v for k, v in old.items() if k != "warmup_steps"}
  same = num_warmup_steps(config, steps_per_epoch) == old["warmup_steps"]
  fields["warmup_epochs"] = (config.warmup_epochs if same else
                             old["warmup_steps"] / steps_per_epoch)
  return fields


def field_value(config: ml_collections.ConfigDict, name: str) -> Any:
  """``config.name``, or its `FIELD_DEFAULTS` value if the config lacks it."""
  return config.get(name, FIELD_DEFAULTS[name])


def _canonical(fields: dict) -> dict:
  """`fields` with the network options spelled canonically (an old layer-implementation
  name as its current equivalent) and absent `FIELD_DEFAULTS` fields at their defaults,
  so that a renamed option or a config written before a field is no change."""
  return {**FIELD_DEFAULTS, **fields,
          "model_options": nets.canonical_options(fields["model"], fields["model_options"])}


def check_config_change(old: dict, config: ml_collections.ConfigDict, step: int
                        ) -> dict[str, tuple[Any, Any]]:
  """The changes from checkpoint `step`'s config.json fields `old` (`migrate_config`d) to
  `config`, network options compared as `nets.canonical_options` spells them.

  Raises:
    ConfigChangeError: a training-defining field other than the epochs differs and
      ``config.allow_config_change`` is False; the message lists each (old -> new).
      train_trunk is refused even then: the checkpoint's optimizer state covers the
      modules its phase trained.
  """
  changes = config_changes(_canonical(old), _canonical(config_fields(config)))
  if "train_trunk" in changes:
    before, after = changes["train_trunk"]
    raise ConfigChangeError(
        f"train_trunk: {before!r} -> {after!r}: the checkpoint (step {step}) holds optimizer "
        f"state for {'every module' if before else 'the exit heads only'}, so it continues "
        f"only with train_trunk={before!r}; use another --workdir. Nothing was written.")
  refused = _needing_override(changes)
  if refused and not config.allow_config_change:
    listed = "; ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in refused.items())
    raise ConfigChangeError(
        f"The workdir's checkpoint (step {step}) was trained with other values of "
        f"training-defining fields ({listed}). Restore them, use another --workdir, or "
        f"continue with the new values: --config.allow_config_change=True. Nothing was written.")
  return changes


def _main_steps(fields: dict, steps_per_epoch: int) -> int:
  return fields["main_epochs"] * steps_per_epoch


def check_epoch_change(old: dict, config: ml_collections.ConfigDict, step: int,
                       steps_per_epoch: int) -> str | None:
  """What changed epochs do to a run resumed at `step`, in one line (None: unchanged).

  More epochs train further; the phase the run is in keeps its optimizer state, and
  its learning-rate schedule takes the new length (a cosine schedule stretches, so
  the rate jumps; a constant one continues).

  Raises:
    ConfigChangeError: the new schedule ends before `step`, or main_epochs changes
      once the checkpoint is past the main phase of the old or the new schedule
      (the phase boundary would move under it).
  """
  new = config_fields(config)
  if all(old.get(k) == new[k] for k in _EPOCH_FIELDS):
    return None
  listed = ", ".join(f"{k} {old.get(k)} -> {new[k]}" for k in _EPOCH_FIELDS
                     if old.get(k) != new[k])
  total = (new["main_epochs"] + new["joint_epochs"]) * steps_per_epoch
  if total < step:
    raise ConfigChangeError(
        f"{listed}: {total} steps, fewer than the checkpoint's step {step}. Epochs can only "
        f"grow on resume (or shrink to no less than {step / steps_per_epoch:g} in all); use "
        f"another --workdir to train less. Nothing was written.")
  old_main, new_main = _main_steps(old, steps_per_epoch), _main_steps(new, steps_per_epoch)
  if old_main != new_main and step > min(old_main, new_main):
    raise ConfigChangeError(
        f"{listed}: the checkpoint (step {step}) is past the main phase, whose end would move "
        f"from step {old_main} to {new_main}; change joint_epochs instead, or use another "
        f"--workdir. Nothing was written.")
  if step == total:
    return f"{listed}: the run already ends at step {step}."
  in_joint = step >= new_main
  first = new_main if in_joint else 0
  old_len = (old["joint_epochs"] if in_joint else old["main_epochs"]) * steps_per_epoch
  new_len = (new["joint_epochs"] if in_joint else new["main_epochs"]) * steps_per_epoch
  line = f"{listed}: training continues from step {step} to step {total}"
  if step == first or old_len == new_len:
    return f"{line}; the {'joint' if in_joint else 'main'} phase runs as scheduled."
  warmup = num_warmup_steps(config, steps_per_epoch)
  old_lr, new_lr = learning_rate(config, old_len, warmup), learning_rate(config, new_len, warmup)
  if not callable(new_lr):
    return f"{line}; the constant learning rate just continues."
  return (f"{line}; the cosine schedule of the {'joint' if in_joint else 'main'} phase now spans "
          f"{new_len} steps instead of {old_len}, so the learning rate jumps from "
          f"{float(old_lr(step - first)):.3g} to {float(new_lr(step - first)):.3g}.")


def _saved_fields(old: dict, config: ml_collections.ConfigDict,
                  changes: dict[str, tuple[Any, Any]]) -> dict:
  """config.json after an accepted resume: the checkpoint's training-defining fields as
  they were (changed ones, accepted, replaced), the latest run-control fields."""
  saved = json.loads(json.dumps(old))
  for name, value in flatten_fields(config_fields(config)).items():
    if name in changes or not is_training_field(name):
      *parents, leaf = name.split(".")
      node = saved
      for p in parents:
        node = node.setdefault(p, {})
      node[leaf] = value
  return saved


@flax.struct.dataclass
class TrainState:
  """Everything a train step reads and writes.

  Attributes:
    step: global step (int32 scalar), counted across phases.
    params: every module's parameters, ``{"trunk_0": ..., "head_0": ..., ...}``.
    model_state: mutable collections (BatchNorm statistics), possibly empty.
    opt_state: optimizer state over the parameters the current phase trains.
  """
  step: jax.Array
  params: Any
  model_state: Any
  opt_state: Any


@dataclasses.dataclass(frozen=True)
class Phase:
  """A stretch of training: which network's loss, over which steps.

  Attributes:
    frozen: modules (``trunk_i``, ``head_i``) of `net` the phase neither updates nor runs
      in train mode: BatchNorm on its running statistics, which stay as they are, and no
      dropout, so they compute what they compute in inference (`heads_only_phase`).
  """
  name: str
  net: nets.Network
  loss_weights: tuple[float, ...]
  first_step: int
  num_steps: int
  frozen: frozenset[str] = frozenset()

  @property
  def end_step(self) -> int:
    return self.first_step + self.num_steps

  def trainable(self, params: dict) -> dict:
    """The part of `params` this phase updates (frozen modules and modules without
    parameters skipped): the optimizer state covers these alone."""
    return {k: params[k] for k in nets.module_names(self.net)
            if k in params and k not in self.frozen}


def heads_only_phase(net: nets.Network, num_steps: int,
                     loss_weights: tuple[float, ...] | None = None, first_step: int = 0
                     ) -> Phase:
  """A phase that trains only the early exits' heads of `net` on its trained main network
  (SDN's "IC-only" training; start from `nets.transplant`'s variables).

  The trunk and the main exit are frozen (`Phase.frozen`: not updated, eval mode with
  the loaded BatchNorm statistics), so the main exit predicts exactly what the trained
  plain network predicts and the heads learn on the features inference gives them. The
  main exit's loss weight is 0: its loss does not depend on the heads.

  Args:
    net: the multi-exit network.
    num_steps: steps of the phase.
    loss_weights: (E,) per-exit weights (None: 1.0 each); the last is replaced by 0.
    first_step: the global step the phase starts at.

  Returns:
    The phase, named "heads"; `make_train_step` and `initial_state` take it.

  Raises:
    ValueError: `net` has no early exit, or `loss_weights` is not one weight per exit.
  """
  weights = tuple(loss_weights or (1.0,) * net.num_exits)
  if net.num_exits < 2 or len(weights) != net.num_exits:
    raise ValueError(f"Heads-only training needs early exits and one loss weight per exit; "
                     f"{net.name} has {net.num_exits} exit(s) and {len(weights)} weight(s).")
  return Phase("heads", net, (*weights[:-1], 0.0), first_step, num_steps,
               frozenset(nets.module_names(net.main_network())))


def validate_config(config: ml_collections.ConfigDict, net: nets.Network) -> None:
  """Raises a ValueError naming any field whose value cannot work."""
  def need(ok: bool, msg: str) -> None:
    if not ok:
      raise ValueError(f"Bad config: {msg}")

  need(config.batch_size > 0, f"batch_size must be positive; got {config.batch_size}.")
  need(config.keep_checkpoints >= 1,
       f"keep_checkpoints must be >= 1 (0 deletes every checkpoint); got "
       f"{config.keep_checkpoints}. Use --config.keep_checkpoints=1 or more.")
  need(config.checkpoint_every_epochs >= 1,
       f"checkpoint_every_epochs must be >= 1; got {config.checkpoint_every_epochs}. Use "
       f"--config.checkpoint_every_epochs=1 or more.")
  need(config.eval_batch_size >= 1,
       f"eval_batch_size must be >= 1; got {config.eval_batch_size}. Use e.g. "
       f"--config.eval_batch_size=1000.")
  need(config.num_validation >= 0,
       f"num_validation must be >= 0; got {config.num_validation}. Use "
       f"--config.num_validation=0 (no validation split) or more.")
  need(config.main_epochs >= 0 and config.joint_epochs >= 0, "epochs must be >= 0.")
  need(config.main_epochs + config.joint_epochs > 0, "main_epochs + joint_epochs is 0.")
  need(len(config.loss_weights) == net.num_exits,
       f"loss_weights has {len(config.loss_weights)} entries but {net.name} has "
       f"{net.num_exits} exits; give one weight per exit, e.g. --config.loss_weights="
       f"'{tuple([1.0] * net.num_exits)}'.")
  need(config.learning_rate > 0, f"learning_rate must be positive; got {config.learning_rate}.")
  need(0 <= config.beta1 < 1 and 0 <= config.beta2 < 1, "beta1 and beta2 must lie in [0, 1).")
  init_from, train_trunk = field_value(config, "init_from"), field_value(config, "train_trunk")
  need(isinstance(init_from, str), f"init_from must be a workdir path or ''; got {init_from!r}.")
  need(isinstance(train_trunk, bool), f"train_trunk must be True or False; got {train_trunk!r}.")
  need(train_trunk or init_from,
       "train_trunk=False freezes the trunk and main exit, so they must be trained ones: set "
       "--config.init_from=W, the workdir of the plain main network.")
  need(train_trunk or config.main_epochs == 0,
       f"main_epochs is {config.main_epochs} but train_trunk=False trains the exit heads "
       f"alone, with no main phase: set --config.main_epochs=0.")
  need(config.weight_decay >= 0, "weight_decay must be >= 0.")
  need(config.lr_schedule in ("constant", "cosine"),
       f"lr_schedule must be 'constant' or 'cosine'; got {config.lr_schedule!r}.")
  need("warmup_steps" not in config,
       "warmup_steps is now warmup_epochs (converted to steps at the run's batch size); "
       "set config.warmup_epochs instead.")
  need(config.warmup_epochs >= 0, f"warmup_epochs must be >= 0; got {config.warmup_epochs}.")
  augment.get(config.augment)
  need(config.optimizer in ("adam", "sgd"),
       f"optimizer must be 'adam' or 'sgd'; got {config.optimizer!r}.")
  data.spec(config.dataset)
  need(tuple(net.input_shape) == data.spec(config.dataset).image_shape,
       f"{net.name} takes {net.input_shape} images but {config.dataset} has "
       f"{data.spec(config.dataset).image_shape}.")


def num_warmup_steps(config: ml_collections.ConfigDict, steps_per_epoch: int) -> int:
  """``config.warmup_epochs`` in steps of this run: epochs follow a changed batch_size."""
  return round(config.warmup_epochs * steps_per_epoch)


def learning_rate(config: ml_collections.ConfigDict, num_steps: int, warmup_steps: int = 0
                  ) -> float | optax.Schedule:
  """The phase's learning rate: a constant, or a warmup-cosine function of the phase's step.

  `warmup_steps` (cosine only, at most the phase's length less one): `num_warmup_steps`.
  """
  if config.lr_schedule == "cosine":
    warmup = min(warmup_steps, max(num_steps - 1, 0))
    return optax.warmup_cosine_decay_schedule(0.0, config.learning_rate, warmup,
                                              max(num_steps, 1))
  return config.learning_rate


def make_optimizer(config: ml_collections.ConfigDict, num_steps: int, warmup_steps: int = 0
                   ) -> optax.GradientTransformation:
  """The phase's optimizer, with a constant or warmup-cosine learning rate (`learning_rate`).

  Adam (AdamW when `weight_decay` > 0), or Nesterov SGD with L2 weight decay added
  to the gradient (the usual ResNet recipe).
  """
  lr = learning_rate(config, num_steps, warmup_steps)
  if config.optimizer == "sgd":
    return optax.chain(optax.add_decayed_weights(config.weight_decay),
                       optax.sgd(lr, momentum=config.momentum, nesterov=True))
  if config.weight_decay:
    return optax.adamw(lr, config.beta1, config.beta2, weight_decay=config.weight_decay)
  return optax.adam(lr, config.beta1, config.beta2)


def make_train_step(phase: Phase, tx: optax.GradientTransformation, augmentation: str = "none",
                    max_shift: int = 2, mesh: Mesh | None = None) -> Callable:
  """The jitted pure step ``(state, batch, rng) -> (state, metrics)`` of `phase`.

  `batch` is ``{"image": (B, H, W, C) float32, "label": (B,) int32}``; `rng` is the
  run's base key, into which the step is folded. The state's buffers are donated.
  Metrics: ``loss`` (scalar), ``loss_per_exit`` and ``accuracy_per_exit`` (E,).

  With a `mesh`, the step is data-parallel: the batch is split over the mesh's data
  axis (`parallel.shard_batch`), state, key and metrics are replicated
  (`parallel.replicate`), and XLA all-reduces the gradients. Random draws
  (augmentation, dropout) do not depend on the number of devices.
  """
  weights = jnp.asarray(phase.loss_weights, jnp.float32)
  augment_fn = augment.get(augmentation)

  def step(state: TrainState, batch: dict, rng: jax.Array) -> tuple[TrainState, dict]:
    rng = jax.random.fold_in(rng, state.step)
    aug_key, dropout_key = jax.random.split(rng)
    images = batch["image"]
    if augment_fn is not None:
      images = augment_fn(images, aug_key, max_shift)

    def loss_fn(train_params):
      variables = {"params": {**state.params, **train_params}, **state.model_state}
      out, updates = nets.forward(phase.net, variables, images, train=True, rng=dropout_key,
                                  eval_modules=phase.frozen)
      loss, per_exit = losses.joint_cross_entropy(out.logits, batch["label"], weights)
      return loss, (per_exit, out.logits, updates)

    train_params = phase.trainable(state.params)
    (loss, (per_exit, logits, updates)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        train_params)
    deltas, opt_state = tx.update(grads, state.opt_state, train_params)
    params = {**state.params, **optax.apply_updates(train_params, deltas)}
    model_state = {c: {**state.model_state.get(c, {}), **t} for c, t in updates.items()}
    accuracy = jnp.mean(jnp.argmax(logits, -1) == batch["label"][None], axis=-1)
    new_state = state.replace(step=state.step + 1, params=params,
                              model_state={**state.model_state, **model_state},
                              opt_state=opt_state)
    return new_state, {"loss": loss, "loss_per_exit": per_exit, "accuracy_per_exit": accuracy}

  if mesh is None:
    return runtime.jit(step, donate_argnums=0)
  replicated = parallel.replicated(mesh)
  return runtime.jit(step, in_shardings=(replicated, parallel.data_sharding(mesh), replicated),
                 out_shardings=replicated, donate_argnums=0)


def make_phases(config: ml_collections.ConfigDict, net: nets.Network,
                steps_per_epoch: int) -> list[Phase]:
  """The non-empty phases of the schedule: main network alone, then joint (the early
  exits' heads alone, `heads_only_phase`, when ``config.train_trunk`` is False)."""
  main_steps = config.main_epochs * steps_per_epoch
  joint_steps = config.joint_epochs * steps_per_epoch
  phases = []
  if main_steps:
    phases.append(Phase("main", net.main_network(), (1.0,), 0, main_steps))
  if joint_steps and not field_value(config, "train_trunk"):
    phases.append(heads_only_phase(net, joint_steps, tuple(config.loss_weights), main_steps))
  elif joint_steps:
    phases.append(Phase("joint", net, tuple(config.loss_weights), main_steps, joint_steps))
  return phases


def _phase_at(phases: list[Phase], step: int) -> Phase:
  return next((p for p in phases if step < p.end_step), phases[-1])


def initial_state(phase: Phase, tx: optax.GradientTransformation, variables: nets.Variables,
                  step: int) -> TrainState:
  """The train state at `step` of `phase`: `variables` and a fresh optimizer state for
  the phase's trainable parameters (the template a checkpoint is restored into)."""
  params = variables["params"]
  return TrainState(step=jnp.asarray(step, jnp.int32), params=params,
                    model_state={k: v for k, v in variables.items() if k != "params"},
                    opt_state=tx.init(phase.trainable(params)))


def _write_config(workdir: str, fields: dict) -> None:
  """Writes `fields` to config.json (process 0)."""
  if jax.process_index() == 0:
    checkpoint.write_json(os.path.join(workdir, "config.json"), fields)


def _report(line: str) -> None:
  if jax.process_index() == 0:  # One copy of each line in a multi-process run.
    progress.write(line)


def _fmt(values) -> str:
  return " ".join(f"{float(v):.4f}" for v in values)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Trains `config.model` on `config.dataset`, checkpointing into `workdir`.

  Resumes from the newest intact checkpoint in `workdir`; newer unreadable ones are
  reported and moved aside (`checkpoint.set_aside`). On resume the config is
  compared with config.json (`check_config_change`, `check_epoch_change`) before
  anything is written; accepted changes go to ``workdir/config_history.json``, and
  config.json keeps the training-defining fields the checkpoint was trained with
  (updated only by an accepted change) and the latest run-control fields. "auto"
  layer implementations and ``config.compute_dtype`` are chosen for the running
  platform, and ``config.warmup_epochs`` becomes steps (`num_warmup_steps`); what they
  became, with the resolved TFDS data dir and the steps per epoch, is appended to
  ``workdir/runs.json`` (`checkpoint.record_run`). A fresh run with ``config.init_from``
  starts from that workdir's trained plain network (`checkpoint.init_from`; runs.json
  records its step), and ``config.train_trunk=False`` trains the early exits' heads
  alone (`heads_only_phase`). Unless training stops early
  (`config.halt_after_steps`), ends by writing ``workdir/eval.json``:
  ``{"validation": {"num_examples", "accuracy_per_exit"}, "test": {...}}``.

  Data-parallel over every device of every process (`parallel.make_mesh`):
  `config.batch_size` is the global batch and must be a multiple of the device
  count. In a multi-process run (`parallel.initialize` first) every process calls
  this with the same config and a `workdir` that all of them can reach; each reads
  only its own part of the train split, and process 0 writes the JSON files.

  Returns:
    The contents of eval.json (empty if halted early).
  """
  try:
    dtype = runtime.compute_dtype(config.get("compute_dtype", "auto"))
  except ValueError as e:
    raise ValueError(f"Bad config: {e}") from None
  options = nets.resolve_options(config.model, config.model_options.to_dict())
  net = checkpoint.network(config, dtype, **options)
  validate_config(config, net)
  mesh = parallel.make_mesh()
  parallel.check_batch_size(config.batch_size, mesh, "--config.batch_size")
  rng = jax.random.key(config.seed)
  variables = nets.init(net, jax.random.fold_in(rng, 0))
  identity = checkpoint.record(net.name, config.dataset, variables["params"])
  # Nothing is written before these checks pass.
  latest, unreadable = checkpoint.newest_intact(workdir)
  checkpoint.check_compatible(workdir, identity, latest)
  init_from = field_value(config, "init_from") if latest is None else ""  # Resumes ignore it.
  if init_from:
    variables, init_step = checkpoint.init_from(init_from, net, variables, config.dataset, mesh)
  data_dir = data.resolve_data_dir(config.data_dir or None)
  splits = data.load_splits(config.dataset, config.num_validation, data_dir,
                            download=config.download,
                            train_shard=(jax.process_index(), jax.process_count()))
  train_split = dataclasses.replace(
      splits["train"], images=data.preprocess(config.dataset, splits["train"].images))
  steps_per_epoch = _steps_per_epoch(train_split, config.batch_size, mesh)
  warmup_steps = num_warmup_steps(config, steps_per_epoch)
  saved = None if latest is None else _saved_config(workdir)
  old = None if saved is None else migrate_config(saved, config, steps_per_epoch)
  changes = {} if old is None else check_config_change(old, config, latest)
  epochs_line = None if old is None else check_epoch_change(old, config, latest, steps_per_epoch)
  phases = make_phases(config, net, steps_per_epoch)
  total_steps = phases[-1].end_step

  os.makedirs(workdir, exist_ok=True)
  for bad, line in unreadable.items():
    if jax.process_index() == 0:
      line = f"{line} Moved it to {checkpoint.set_aside(workdir, bad)}."
    _report(line)
  if unreadable and jax.process_count() > 1:  # Every manager below lists the same steps.
    multihost_utils.sync_global_devices("bnet_jax.train: unreadable checkpoints set aside")
  if latest is None and unreadable:
    _report("No intact checkpoint: training starts from step 0.")
  _write_config(workdir, config_fields(config) if old is None else
                _saved_fields(old, config, changes))
  if changes:
    checkpoint.record_config_change(workdir, latest, changes,
                                    override=bool(_needing_override(changes)))
  if epochs_line:
    _report(epochs_line)
  if init_from:
    _report(f"Initialised from {init_from} (step {init_step}): trunk and main exit trained, "
            f"the early exits' heads new.")
  checkpoint.record_run(workdir, latest or 0, net, options, dtype, data_dir, steps_per_epoch,
                        warmup_steps, initialised_from={
                            "workdir": os.path.abspath(init_from), "step": init_step
                        } if init_from else None)

  mngr = checkpoint.manager(workdir, max_to_keep=config.keep_checkpoints)
  step = latest or 0
  if latest is not None:
    producer = _phase_at(phases, max(step - 1, 0))
    state = checkpoint.restore(mngr, step, parallel.replicate(initial_state(
        producer, make_optimizer(config, producer.num_steps, warmup_steps), variables, step),
        mesh))
    _report(f"Resumed from {workdir} at step {step}.")
  else:
    state = None

  halt = config.halt_after_steps if config.halt_after_steps > 0 else total_steps
  ckpt_every = max(config.checkpoint_every_epochs * steps_per_epoch, 1)
  writer = summary.Writer(workdir, net.num_exits, step)
  try:
    for phase in phases:
      if step >= phase.end_step or step >= halt:
        continue
      tx = make_optimizer(config, phase.num_steps, warmup_steps)
      if state is None or step == phase.first_step:  # A phase starts with a fresh optimizer.
        base = variables if state is None else {"params": state.params, **state.model_state}
        state = parallel.replicate(initial_state(phase, tx, base, step), mesh)
      state, step = _run_phase(config, phase, tx, state, train_split, splits,
                               parallel.replicate(rng, mesh), mngr, identity, step,
                               min(phase.end_step, halt), ckpt_every, writer, mesh)
  except KeyboardInterrupt:
    if state is not None:
      _report(f"Interrupted: saving a checkpoint at step {step}.")
      checkpoint.save(mngr, step, state, identity)
    mngr.wait_until_finished()
    raise
  finally:
    writer.close()
  if state is not None and mngr.latest_step() != step:
    checkpoint.save(mngr, step, state, identity)
  mngr.wait_until_finished()
  mngr.close()
  if step < total_steps:
    _report(f"Halted at step {step} of {total_steps}; rerun with the same workdir to resume.")
    return {}
  results = {}
  final = {"params": state.params, **state.model_state}
  for name in ("validation", "test"):
    if name in splits:
      images = data.preprocess(config.dataset, splits[name].images)
      results[name] = evaluate.evaluate_split(net, final, images, splits[name].labels,
                                              config.eval_batch_size, mesh=mesh)
      _report(f"{name} accuracy per exit: {_fmt(results[name]['accuracy_per_exit'])}")
  if jax.process_index() == 0:
    checkpoint.write_json(os.path.join(workdir, "eval.json"), results)
  return results


def _steps_per_epoch(train_split: data.Split, batch_size: int, mesh: Mesh) -> int:
  """Global batches per epoch: what the smallest process's part of the split holds."""
  total = len(train_split) if train_split.total is None else train_split.total
  return total // jax.process_count() // parallel.local_batch_size(batch_size, mesh)


def _run_phase(config, phase, tx, state, train_split, splits, rng, mngr, identity,
               step, stop, ckpt_every, writer, mesh):
  """Runs `phase` from `step` to `stop`, logging each epoch to `writer`; returns (state, step)."""
  train_step = make_train_step(phase, tx, config.augment, config.max_shift, mesh)
  steps_per_epoch = _steps_per_epoch(train_split, config.batch_size, mesh)
  val = splits.get("validation")
  val_images = None if val is None else data.preprocess(config.dataset, val.images)
  _report(f"Phase {phase.name} ({phase.net.name}): steps {step}..{stop}, "
          f"{steps_per_epoch} per epoch.")
  batches = data.train_batches(train_split, parallel.local_batch_size(config.batch_size, mesh),
                               config.seed, step, steps_per_epoch)
  wait = parallel.wait_each_step()
  lr = learning_rate(config, phase.num_steps, num_warmup_steps(config, steps_per_epoch))
  bar = progress.bar(total=stop - step, desc=f"{phase.name} phase", unit="step")
  history, t0 = [], time.perf_counter()
  for step, images, labels in batches:
    if step >= stop:
      break
    batch = parallel.shard_batch({"image": images, "label": labels}, mesh)
    state, metrics = train_step(state, batch, rng)
    if wait:
      jax.block_until_ready(metrics)
    history.append(metrics)
    bar.update()
    done = step + 1
    if done % steps_per_epoch == 0 or done == stop:
      m = jax.tree.map(lambda *a: np.mean(np.stack(a), axis=0), *history)
      rate = len(history) * config.batch_size / (time.perf_counter() - t0)
      line = (f"[{phase.name}] epoch {done / steps_per_epoch:.2f} step {done}/{phase.end_step} "
              f"loss {float(m['loss']):.4f} | per exit: loss {_fmt(m['loss_per_exit'])} "
              f"train acc {_fmt(m['accuracy_per_exit'])}")
      writer.scalar("train", "loss/total", m["loss"], done)
      writer.per_exit("train", "loss", m["loss_per_exit"], done)
      writer.per_exit("train", "accuracy", m["accuracy_per_exit"], done)
      writer.scalar("train", "learning_rate",
                    lr(done - 1 - phase.first_step) if callable(lr) else lr, done)
      writer.scalar("train", "images_per_second", rate, done)
      if val_images is not None:
        variables = {"params": state.params, **state.model_state}
        logits = evaluate.all_exits(phase.net, variables, val_images,
                                    config.eval_batch_size, mesh=mesh).logits
        acc = evaluate.accuracy_per_exit(logits, val.labels)
        writer.per_exit("validation", "loss", evaluate.loss_per_exit(logits, val.labels), done)
        writer.per_exit("validation", "accuracy", acc, done)
        line += f" val acc {_fmt(acc)}"
      writer.flush()
      bar.set_postfix(loss=f"{float(m['loss']):.4f}", refresh=False)
      _report(f"{line} | {rate:.0f} img/s")
      history, t0 = [], time.perf_counter()
    if done % ckpt_every == 0 or done == stop:
      checkpoint.save(mngr, done, state, identity)
  bar.close()
  return state, stop
