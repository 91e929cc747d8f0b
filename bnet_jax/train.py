"""Training: the pure train step, the paper's two-phase schedule, checkpoints.

The paper's schedule trains the main network alone (every trunk stage and the
last exit) and then the whole BranchyNet jointly from those weights. Each phase
has its own optimizer state, created fresh when the phase begins; the main phase
updates only the main network's parameters. Steps are numbered across phases, so
a checkpoint's step says which phase produced it and a resumed run continues
exactly where it stopped: batches, augmentation and dropout keys are all derived
from (seed, step).
"""

from __future__ import annotations

import dataclasses
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

from bnet_jax import checkpoint, data, evaluate, losses, nets


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
  """A stretch of training: which network's loss, over which steps."""
  name: str
  net: nets.Network
  loss_weights: tuple[float, ...]
  first_step: int
  num_steps: int

  @property
  def end_step(self) -> int:
    return self.first_step + self.num_steps

  @property
  def trainable(self) -> list[str]:
    """Modules whose parameters this phase updates."""
    return nets.module_names(self.net)


def validate_config(config: ml_collections.ConfigDict, net: nets.Network) -> None:
  """Raises a ValueError naming any field whose value cannot work."""
  def need(ok: bool, msg: str) -> None:
    if not ok:
      raise ValueError(f"Bad config: {msg}")

  need(config.batch_size > 0, f"batch_size must be positive; got {config.batch_size}.")
  need(config.main_epochs >= 0 and config.joint_epochs >= 0, "epochs must be >= 0.")
  need(config.main_epochs + config.joint_epochs > 0, "main_epochs + joint_epochs is 0.")
  need(len(config.loss_weights) == net.num_exits,
       f"loss_weights has {len(config.loss_weights)} entries but {net.name} has "
       f"{net.num_exits} exits; give one weight per exit, e.g. --config.loss_weights="
       f"'{tuple([1.0] * net.num_exits)}'.")
  need(config.learning_rate > 0, f"learning_rate must be positive; got {config.learning_rate}.")
  need(0 <= config.beta1 < 1 and 0 <= config.beta2 < 1, "beta1 and beta2 must lie in [0, 1).")
  need(config.weight_decay >= 0, "weight_decay must be >= 0.")
  need(config.lr_schedule in ("constant", "cosine"),
       f"lr_schedule must be 'constant' or 'cosine'; got {config.lr_schedule!r}.")
  need(config.augment in ("none", "shift"),
       f"augment must be 'none' or 'shift'; got {config.augment!r}.")
  data.spec(config.dataset)
  need(tuple(net.input_shape) == data.spec(config.dataset).image_shape,
       f"{net.name} takes {net.input_shape} images but {config.dataset} has "
       f"{data.spec(config.dataset).image_shape}.")


def make_optimizer(config: ml_collections.ConfigDict, num_steps: int) -> optax.GradientTransformation:
  """Adam (AdamW with weight decay) with a constant or warmup-cosine learning rate."""
  lr = config.learning_rate
  if config.lr_schedule == "cosine":
    warmup = min(config.warmup_steps, max(num_steps - 1, 0))
    lr = optax.warmup_cosine_decay_schedule(0.0, lr, warmup, max(num_steps, 1))
  if config.weight_decay:
    return optax.adamw(lr, config.beta1, config.beta2, weight_decay=config.weight_decay)
  return optax.adam(lr, config.beta1, config.beta2)


def random_shift(images: jax.Array, rng: jax.Array, max_shift: int) -> jax.Array:
  """Translates each image by up to `max_shift` pixels, filling with zeros: (B,H,W,C)."""
  b, h, w, _ = images.shape
  padded = jnp.pad(images, ((0, 0), (max_shift,) * 2, (max_shift,) * 2, (0, 0)))
  offsets = jax.random.randint(rng, (b, 2), 0, 2 * max_shift + 1)
  crop = lambda img, o: jax.lax.dynamic_slice(img, (o[0], o[1], 0), (h, w, img.shape[-1]))
  return jax.vmap(crop)(padded, offsets)


def make_train_step(phase: Phase, tx: optax.GradientTransformation, augment: str = "none",
                    max_shift: int = 2) -> Callable:
  """The jitted pure step ``(state, batch, rng) -> (state, metrics)`` of `phase`.

  `batch` is ``{"image": (B, H, W, C) float32, "label": (B,) int32}``; `rng` is the
  run's base key, into which the step is folded. The state's buffers are donated.
  Metrics: ``loss`` (scalar), ``loss_per_exit`` and ``accuracy_per_exit`` (E,).
  """
  weights = jnp.asarray(phase.loss_weights, jnp.float32)
  trainable = phase.trainable

  def step(state: TrainState, batch: dict, rng: jax.Array) -> tuple[TrainState, dict]:
    rng = jax.random.fold_in(rng, state.step)
    aug_key, dropout_key = jax.random.split(rng)
    images = batch["image"]
    if augment == "shift":
      images = random_shift(images, aug_key, max_shift)

    def loss_fn(train_params):
      variables = {"params": {**state.params, **train_params}, **state.model_state}
      out, updates = nets.forward(phase.net, variables, images, train=True, rng=dropout_key)
      loss, per_exit = losses.joint_cross_entropy(out.logits, batch["label"], weights)
      return loss, (per_exit, out.logits, updates)

    train_params = {k: state.params[k] for k in trainable}
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

  return jax.jit(step, donate_argnums=0)


def make_phases(config: ml_collections.ConfigDict, net: nets.Network,
                steps_per_epoch: int) -> list[Phase]:
  """The non-empty phases of the schedule: main network alone, then joint."""
  main = net.main_network()
  specs = [("main", main, (1.0,), config.main_epochs),
           ("joint", net, tuple(config.loss_weights), config.joint_epochs)]
  phases, first = [], 0
  for name, phase_net, weights, epochs in specs:
    if epochs:
      phases.append(Phase(name, phase_net, weights, first, epochs * steps_per_epoch))
      first += epochs * steps_per_epoch
  return phases


def _phase_at(phases: list[Phase], step: int) -> Phase:
  return next((p for p in phases if step < p.end_step), phases[-1])


def _fresh_state(phase: Phase, tx: optax.GradientTransformation, variables: nets.Variables,
                 step: int) -> TrainState:
  params = variables["params"]
  return TrainState(step=jnp.asarray(step, jnp.int32), params=params,
                    model_state={k: v for k, v in variables.items() if k != "params"},
                    opt_state=tx.init({k: params[k] for k in phase.trainable}))


def _report(line: str) -> None:
  print(line, flush=True)


def _fmt(values) -> str:
  return " ".join(f"{float(v):.4f}" for v in values)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Trains `config.model` on `config.dataset`, checkpointing into `workdir`.

  Resumes from the newest checkpoint in `workdir`. Unless training stops early
  (`config.halt_after_steps`), ends by writing ``workdir/eval.json``:
  ``{"validation": {"num_examples", "accuracy_per_exit"}, "test": {...}}``.

  Returns:
    The contents of eval.json (empty if halted early).
  """
  net = nets.get(config.model, **config.model_options)
  validate_config(config, net)
  rng = jax.random.key(config.seed)
  variables = nets.init(net, jax.random.fold_in(rng, 0))
  identity = checkpoint.record(net.name, config.dataset, variables["params"])
  latest = checkpoint.check_compatible(workdir, identity)  # Before anything is written.
  splits = data.load_splits(config.dataset, config.num_validation, config.data_dir or None,
                            download=config.download)
  train_split = data.Split(data.preprocess(config.dataset, splits["train"].images),
                           splits["train"].labels)
  steps_per_epoch = len(train_split) // config.batch_size
  phases = make_phases(config, net, steps_per_epoch)
  total_steps = phases[-1].end_step

  os.makedirs(workdir, exist_ok=True)
  with open(os.path.join(workdir, "config.json"), "w") as f:
    f.write(config.to_json_best_effort(indent=2))

  mngr = checkpoint.manager(workdir, max_to_keep=config.keep_checkpoints)
  step = latest or 0
  if latest is not None:
    producer = _phase_at(phases, max(step - 1, 0))
    state = checkpoint.restore(mngr, step, _fresh_state(
        producer, make_optimizer(config, producer.num_steps), variables, step))
    _report(f"Resumed from {workdir} at step {step}.")
  else:
    state = None

  halt = config.halt_after_steps if config.halt_after_steps > 0 else total_steps
  ckpt_every = max(config.checkpoint_every_epochs * steps_per_epoch, 1)
  try:
    for phase in phases:
      if step >= phase.end_step or step >= halt:
        continue
      tx = make_optimizer(config, phase.num_steps)
      if state is None or step == phase.first_step:  # A phase starts with a fresh optimizer.
        base = variables if state is None else {"params": state.params, **state.model_state}
        state = _fresh_state(phase, tx, base, step)
      state, step = _run_phase(config, phase, tx, state, train_split, splits, rng,
                               mngr, identity, step, min(phase.end_step, halt), ckpt_every)
  except KeyboardInterrupt:
    if state is not None:
      _report(f"Interrupted: saving a checkpoint at step {step}.")
      checkpoint.save(mngr, step, state, identity)
    mngr.wait_until_finished()
    raise
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
                                              config.eval_batch_size)
      _report(f"{name} accuracy per exit: {_fmt(results[name]['accuracy_per_exit'])}")
  with open(os.path.join(workdir, "eval.json"), "w") as f:
    json.dump(results, f, indent=2)
  return results


def _run_phase(config, phase, tx, state, train_split, splits, rng, mngr, identity,
               step, stop, ckpt_every):
  """Runs `phase` from `step` to `stop`; returns (state, step)."""
  train_step = make_train_step(phase, tx, config.augment, config.max_shift)
  steps_per_epoch = len(train_split) // config.batch_size
  val = splits.get("validation")
  val_images = None if val is None else data.preprocess(config.dataset, val.images)
  _report(f"Phase {phase.name} ({phase.net.name}): steps {step}..{stop}, "
          f"{steps_per_epoch} per epoch.")
  batches = data.train_batches(train_split, config.batch_size, config.seed, step)
  history, t0 = [], time.perf_counter()
  for step, images, labels in batches:
    if step >= stop:
      break
    state, metrics = train_step(state, {"image": images, "label": labels}, rng)
    history.append(metrics)
    done = step + 1
    if done % steps_per_epoch == 0 or done == stop:
      m = jax.tree.map(lambda *a: np.mean(np.stack(a), axis=0), *history)
      rate = len(history) * config.batch_size / (time.perf_counter() - t0)
      line = (f"[{phase.name}] epoch {done / steps_per_epoch:.2f} step {done}/{phase.end_step} "
              f"loss {float(m['loss']):.4f} | per exit: loss {_fmt(m['loss_per_exit'])} "
              f"train acc {_fmt(m['accuracy_per_exit'])}")
      if val_images is not None:
        variables = {"params": state.params, **state.model_state}
        acc = evaluate.evaluate_split(phase.net, variables, val_images, val.labels,
                                      config.eval_batch_size)["accuracy_per_exit"]
        line += f" val acc {_fmt(acc)}"
      _report(f"{line} | {rate:.0f} img/s")
      history, t0 = [], time.perf_counter()
    if done % ckpt_every == 0 or done == stop:
      checkpoint.save(mngr, done, state, identity)
  return state, stop
