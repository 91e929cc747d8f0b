"""Data parallelism on a device mesh: 1 vs 8 devices, exact evaluation, the sharded
cascade, and a real two-process run.

JAX fixes its device count when its backend starts, so the checks run in fresh
subprocesses that ask XLA for 8 CPU devices (or join a 2-process `jax.distributed`
run on 127.0.0.1 with 4 devices each); this process's JAX is never touched. Run as a
script, this file is those workers: ``python tests/test_parallel.py WORKER ARGS...``.
Workers save arrays to .npz files; the tests compare them here.
"""

import dataclasses
import json
import os
import pathlib
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

TESTS = pathlib.Path(__file__).resolve().parent
REPO = TESTS.parent
BAND = 1e-4  # As in test_cascade.py: scores this close to a threshold may change exit.
TIMEOUT = 300  # Seconds for a worker (both, for the two processes) to finish.
EVAL_SIZES = (1, 13, 37, 103)  # Split sizes that no batch size or device count divides.
MOCK_EXAMPLES = 1024  # As in helpers.py: every mock split has this many rows.


# ---- running workers -----------------------------------------------------------------

def _env(devices: int) -> dict:
  env = dict(os.environ, JAX_PLATFORMS="cpu", BNET_PROGRESS="0",
             XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
             PYTHONPATH=os.pathsep.join([str(REPO), str(TESTS)]))
  env.pop("JAX_NUM_CPU_DEVICES", None)
  return env


def _start(worker: str, *args, devices: int, log: pathlib.Path) -> subprocess.Popen:
  """Starts a worker; its output goes to `log` (a pipe could fill and stall it)."""
  with open(log, "w") as f:
    return subprocess.Popen([sys.executable, __file__, worker, *map(str, args)], cwd=REPO,
                            env=_env(devices), stdout=f, stderr=subprocess.STDOUT)


def _finish(procs: list[subprocess.Popen], logs: list[pathlib.Path]) -> None:
  """Waits for the workers, at most TIMEOUT s; once one fails, kills the others (which
  would wait for it forever)."""
  deadline = time.monotonic() + TIMEOUT
  try:
    while (any(p.poll() is None for p in procs) and not any(p.poll() for p in procs)
           and time.monotonic() < deadline):
      time.sleep(0.1)
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
        p.wait()
  for p, log in zip(procs, logs):
    assert p.returncode == 0, (f"worker {p.args[2:]} exited with {p.returncode} "
                               f"(-9: killed after {TIMEOUT} s):\n{log.read_text()[-5000:]}")


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


@pytest.fixture(scope="module")
def eight(tmp_path_factory) -> dict:
  """What the 8-device worker computed (see `eight_devices`)."""
  tmp = tmp_path_factory.mktemp("eight")
  out, log = tmp / "out.npz", tmp / "log.txt"
  _finish([_start("eight_devices", out, devices=8, log=log)], [log])
  with np.load(out) as f:
    return dict(f)


@pytest.fixture(scope="module")
def two(tmp_path_factory) -> tuple[list[dict], dict]:
  """Each process's results of the two-process run (see `two_processes`), and eval.json."""
  tmp = tmp_path_factory.mktemp("two")
  port = _free_port()
  logs = [tmp / f"log{i}.txt" for i in range(2)]
  _finish([_start("two_processes", i, port, tmp / "w", tmp / f"out{i}.npz", devices=4,
                  log=logs[i]) for i in range(2)], logs)
  outs = []
  for i in range(2):
    with np.load(tmp / f"out{i}.npz") as f:
      outs.append(dict(f))
  return outs, json.loads((tmp / "w" / "eval.json").read_text())


def _assert_same_decisions(a: dict, b: dict, scores: np.ndarray, thresholds: np.ndarray,
                           what: str) -> None:
  """Cascade predictions a == b, except samples within BAND of a threshold (counted)."""
  near = np.zeros(len(a["exit"]), bool)
  for k, t in enumerate(thresholds):
    near |= (b["exit"] >= k) & (np.abs(scores[k] - t) < BAND)
  assert near.sum() <= 1 + 0.01 * len(near), f"{what}: {near.sum()} samples near a threshold"
  far = ~near
  np.testing.assert_array_equal(a["exit"][far], b["exit"][far], err_msg=what)
  np.testing.assert_array_equal(a["label"][far], b["label"][far], err_msg=what)
  np.testing.assert_allclose(a["score"][far], b["score"][far], atol=1e-5, err_msg=what)


# ---- the tests -----------------------------------------------------------------------

def test_each_process_reads_its_part_of_the_split():
  import tensorflow_datasets as tfds
  from bnet_jax import data

  with tfds.testing.mock_data(num_examples=100):
    whole = data.load("mnist", "train", "/nonexistent-under-mock")
    parts = [data.load("mnist", "train", "/nonexistent-under-mock", shard=(i, 3))
             for i in range(3)]
  assert [(p.offset, len(p), p.total) for p in parts] == [(0, 33, 100), (33, 33, 100),
                                                          (66, 34, 100)]
  np.testing.assert_array_equal(np.concatenate([p.images for p in parts]), whole.images)
  np.testing.assert_array_equal(np.concatenate([p.labels for p in parts]), whole.labels)
  with pytest.raises(ValueError, match="0 <= index < count"):
    data.load("mnist", "train", "/nonexistent-under-mock", shard=(3, 3))


def test_parts_follow_one_permutation_and_the_whole_split_is_unchanged():
  from bnet_jax import data

  n, seed = 103, 5
  rows = np.arange(n, dtype=np.int32)  # Labels = row numbers, to see which rows come.
  split = data.Split(np.zeros((n, 1, 1, 1), np.uint8), rows)

  def take(s, batch, start, steps, steps_per_epoch=None):
    it = data.train_batches(s, batch, seed, start, steps_per_epoch)
    return [next(it) for _ in range(steps)]

  # A part that is the whole split: exactly the unsharded batches.
  for (i, _, a), (j, _, b) in zip(take(split, 10, 7, 15),
                                  take(data.Split(split.images, rows, 0, n), 10, 7, 15)):
    assert i == j
    np.testing.assert_array_equal(a, b)
  # Two parts of 51 and 52 rows, 5 steps of 10 each per epoch.
  parts = [data.Split(split.images[:51], rows[:51], 0, n),
           data.Split(split.images[51:], rows[51:] - 51, 51, n)]
  for epoch in (0, 1):
    order = data.epoch_permutation(n, seed, epoch)
    for p in parts:
      got = np.concatenate([y for _, _, y in take(p, 10, 5 * epoch, 5, 5)]) + p.offset
      mine = order[(order >= p.offset) & (order < p.offset + len(p))]
      np.testing.assert_array_equal(got, mine[:50])  # The permutation's order, own rows.
  # Resuming inside an epoch gives the same batches.
  straight, resumed = take(parts[1], 10, 0, 9, 5), take(parts[1], 10, 3, 6, 5)
  for (i, _, a), (j, _, b) in zip(straight[3:], resumed):
    assert i == j
    np.testing.assert_array_equal(a, b)
  with pytest.raises(ValueError, match="6 steps per epoch of batch_size 10 exceed the 51"):
    take(parts[0], 10, 0, 1, 6)


def test_training_steps_on_8_devices_equal_1(eight):
  assert eight["devices"] == 8
  np.testing.assert_allclose(eight["loss_8"], eight["loss_1"], rtol=1e-5)
  assert eight["loss_1"][-1] < eight["loss_1"][0]  # It trains.
  np.testing.assert_allclose(eight["params_8"], eight["params_1"], rtol=1e-4, atol=2e-5)
  assert eight["step_8"] == eight["step_1"] == len(eight["loss_1"])


def test_batch_that_does_not_split_is_a_clear_error(eight):
  assert str(eight["uneven_error"]) == (
      "--config.batch_size 60 does not split over the 8 devices of the mesh: use a "
      "multiple of 8, e.g. 56 or 64.")
  assert str(eight["bucket_error"]) == (
      "On a mesh of 8 devices every bucket must be a multiple of 8; got [4, 16]. Pass "
      "multiples of 8, or buckets=None.")


@pytest.mark.parametrize("n", EVAL_SIZES)
def test_evaluation_is_exact_and_equals_one_device(eight, n):
  labels = eight[f"labels_{n}"]
  for batch in (10, 16):  # 10 rounds up to 16 rows: 2 per device.
    logits_1, logits_8 = eight[f"logits_1_{n}_{batch}"], eight[f"logits_8_{n}_{batch}"]
    assert logits_1.shape == logits_8.shape == (2, n, 10)
    np.testing.assert_allclose(logits_8, logits_1, atol=1e-5)
    np.testing.assert_array_equal(np.argmax(logits_8, -1), np.argmax(logits_1, -1))
    want = (np.argmax(logits_1, -1) == labels[None]).sum(axis=1)
    np.testing.assert_array_equal(eight[f"correct_8_{n}_{batch}"], want)
    np.testing.assert_array_equal(eight[f"correct_1_{n}_{batch}"], want)
    np.testing.assert_array_equal(eight[f"accuracy_8_{n}_{batch}"], want / n)


def test_evaluation_never_recompiles_between_batches(eight):
  # 103 rows in batches of 16: 7 batches, the last padded; one program each way.
  assert eight["programs_after_7_batches"].tolist() == [1, 1]


@pytest.mark.parametrize("net", ["blenet", "tiny"])
def test_sharded_cascade_equals_one_device(eight, net):
  t = eight[f"{net}_thresholds"]
  for size in eight[f"{net}_sizes"]:
    one = {k: eight[f"{net}_1_{size}_{k}"] for k in ("label", "exit", "score")}
    many = {k: eight[f"{net}_8_{size}_{k}"] for k in ("label", "exit", "score")}
    _assert_same_decisions(many, one, eight[f"{net}_scores"][:, :size], t, f"{net} @{size}")
  exits = np.concatenate([eight[f"{net}_1_{s}_exit"] for s in eight[f"{net}_sizes"]])
  assert len(set(exits.tolist())) == eight[f"{net}_num_exits"]  # Every exit is used.
  assert all(b % 8 == 0 for b in eight[f"{net}_buckets"])


def test_sharded_cascade_takes_device_arrays(eight):
  """jax.Array images give exactly the host images' predictions on the mesh (see
  `_device_array_case`): one device's array, or row-sharded and cut across shards."""
  runs = {k[len("device_array_"):-len("_exit")] for k in eight if k.startswith("device_array_")
          and k.endswith("_exit")}
  assert len(runs) == 7
  for run in runs - {"host_96", "host_37"}:
    for field in ("label", "exit", "score"):
      want = eight[f"device_array_host_{run.rsplit('_', 1)[1]}_{field}"]
      np.testing.assert_array_equal(eight[f"device_array_{run}_{field}"], want, err_msg=run)
  assert len(set(eight["device_array_host_96_exit"].tolist())) == 2  # Both exits used.


def test_two_processes_train_resume_and_evaluate_like_one(two, eight):
  outs, eval_json = two
  for out in outs:
    assert out["processes"] == 2 and out["devices"] == 8 and out["local_devices"] == 4
    assert out["halted"] == 3 and out["step"] == 8
    # The checkpoint both restore equals one process's straight run on the same batches,
    # up to the order of the gradient all-reduce (gloo across processes, in-process
    # within one), which Adam's normalised steps carry into parameters whose gradients
    # are tiny: 2.7e-5 at most here with the CPU compiler options.
    np.testing.assert_array_equal(out["params"], outs[0]["params"])
    np.testing.assert_allclose(out["params"], eight["two_process_schedule_params"],
                               rtol=1e-4, atol=5e-5)
    # Exact evaluation: eval.json as one device computes it from the same parameters.
    for split in ("validation", "test"):
      assert eval_json[split]["num_examples"] == MOCK_EXAMPLES
      np.testing.assert_array_equal(eval_json[split]["accuracy_per_exit"],
                                    out[f"one_accuracy_{split}"])
    # The all-exits pass and the cascade over both processes' devices equal one device's.
    np.testing.assert_allclose(out["logits"], out["one_logits"], atol=1e-5)
    _assert_same_decisions({k: out[k] for k in ("label", "exit", "score")},
                           {k: out[f"one_{k}"] for k in ("label", "exit", "score")},
                           out["one_scores"], out["thresholds"], "two-process cascade")
    assert 0 < np.mean(out["one_exit"] == 0) < 1


# ---- workers (run in subprocesses) ------------------------------------------------------

def small_config(**overrides):
  """The helpers' small config (2 x 4 steps of 256 on mock data), with random shifts."""
  import helpers

  return helpers.small_config(**{"augment": "shift", **overrides})


def _params_vector(params) -> np.ndarray:
  import jax

  return np.concatenate([np.ravel(np.asarray(a)) for a in jax.tree.leaves(params)])


def _thresholds(scores: np.ndarray, seed: int) -> np.ndarray:
  """One threshold per early exit, midway across the widest gap near the median score."""
  from helpers import random_thresholds

  return np.asarray(random_thresholds(scores, np.random.default_rng(seed)), np.float32)


def _cascade_case(name: str, save: dict, sizes) -> None:
  """Single-device vs 8-device cascade predictions of a network on random images."""
  import jax.numpy as jnp
  from bnet_jax import cascade, nets, parallel
  from helpers import random_variables, tiny_network

  net = nets.get("b_lenet") if name == "blenet" else tiny_network()
  variables = random_variables(net, 0)
  x = np.random.default_rng(1).normal(size=(max(sizes), *net.input_shape)).astype(np.float32)
  scores = np.asarray(cascade.logits_and_scores(net, "entropy", variables, jnp.asarray(x))[1])
  t = _thresholds(scores, 0)
  one = cascade.Cascade(net, variables, t)
  many = cascade.Cascade(net, variables, t, mesh=parallel.make_mesh())
  for size in sizes:
    for tag, cas in (("1", one), ("8", many)):
      pred = cas.predict(x[:size])
      for field in ("label", "exit", "score"):
        save[f"{name}_{tag}_{size}_{field}"] = getattr(pred, field)
  save.update({f"{name}_thresholds": t, f"{name}_sizes": np.array(sizes),
               f"{name}_scores": scores, f"{name}_num_exits": net.num_exits,
               f"{name}_buckets": np.array(many._buckets)})
  if name == "blenet":
    _device_array_case(net, variables, t, x, save)


def _device_array_case(net, variables, t, x, save: dict) -> None:
  """The mesh cascade on jax.Array images: on one device, or row-sharded over the mesh
  and cut by chunks of 24 rows across its shards of 12; float32 and bfloat16 (values
  that bfloat16 holds exactly). Each should equal the host array's predictions."""
  import jax
  import jax.numpy as jnp
  from bnet_jax import cascade, parallel

  mesh = parallel.make_mesh()
  x = np.asarray(jnp.asarray(x[:96], jnp.bfloat16).astype(jnp.float32))
  cas = cascade.Cascade(net, variables, t, mesh=mesh, chunk_size=24)
  runs = {"host_96": x, "one_37": jnp.asarray(x[:37]), "host_37": x[:37]}
  for dtype in ("float32", "bfloat16"):
    for where, sharding in (("one", jax.devices()[0]), ("rows", parallel.data_sharding(mesh))):
      runs[f"{where}_{dtype}_96"] = jax.device_put(jnp.asarray(x, dtype), sharding)
  for run, images in runs.items():
    pred = cas.predict(images)
    for field in ("label", "exit", "score"):
      save[f"device_array_{run}_{field}"] = getattr(pred, field)


def eight_devices(out: str) -> None:
  """Training steps, evaluation and the cascade on 1 device and on 8."""
  import jax
  from bnet_jax import cascade, evaluate, nets, parallel, train
  from helpers import random_variables

  save = {"devices": jax.device_count()}
  one, many = parallel.make_mesh(jax.devices()[:1]), parallel.make_mesh()
  # K = 4 joint steps with random shifts on fixed random batches of 64.
  config = small_config()
  net = nets.get(config.model)
  phase = train.make_phases(config, net, 4)[-1]
  tx = train.make_optimizer(config, phase.num_steps)
  rng = np.random.default_rng(0)
  batches = [{"image": rng.random((64, 28, 28, 1), np.float32),
              "label": rng.integers(0, 10, 64).astype(np.int32)} for _ in range(4)]
  for tag, mesh in (("1", one), ("8", many)):
    variables = nets.init(net, jax.random.key(0))
    state = parallel.replicate(train.initial_state(phase, tx, variables, 0), mesh)
    step, key = train.make_train_step(phase, tx, "shift", 2, mesh), parallel.replicate(
        jax.random.key(0), mesh)
    losses = []
    for batch in batches:
      state, metrics = step(state, parallel.shard_batch(batch, mesh), key)
      losses.append(float(metrics["loss"]))
    save.update({f"loss_{tag}": np.array(losses), f"params_{tag}": _params_vector(state.params),
                 f"step_{tag}": int(state.step)})
  try:
    parallel.check_batch_size(60, many, "--config.batch_size")
  except ValueError as e:
    save["uneven_error"] = str(e)
  try:
    cascade.Cascade(net, nets.init(net, jax.random.key(0)), [0.5], buckets=(4, 16), mesh=many)
  except ValueError as e:
    save["bucket_error"] = str(e)

  # Evaluation of split sizes that divide nothing, at two batch sizes.
  variables = random_variables(net, 0)
  images = rng.normal(size=(max(EVAL_SIZES), 28, 28, 1)).astype(np.float32)
  labels = rng.integers(0, 10, len(images)).astype(np.int32)
  for n in EVAL_SIZES:
    save[f"labels_{n}"] = labels[:n]
    for batch in (10, 16):
      for tag, mesh in (("1", one), ("8", many)):
        save[f"logits_{tag}_{n}_{batch}"] = evaluate.all_exits(
            net, variables, images[:n], batch, mesh=mesh).logits
        save[f"correct_{tag}_{n}_{batch}"] = evaluate.correct_per_exit(
            net, variables, images[:n], labels[:n], batch, mesh)
      result = evaluate.evaluate_split(net, variables, images[:n], labels[:n], batch, mesh=many)
      assert result["num_examples"] == n
      save[f"accuracy_8_{n}_{batch}"] = np.array(result["accuracy_per_exit"])
  programs = evaluate.programs(net, many)
  for fn in programs:
    fn.clear_cache()
  evaluate.all_exits(net, variables, images[:103], 16, mesh=many)
  evaluate.correct_per_exit(net, variables, images[:103], labels[:103], 16, many)
  save["programs_after_7_batches"] = np.array([fn._cache_size() for fn in programs])

  _cascade_case("blenet", save, (1, 5, 37, 100))
  _cascade_case("tiny", save, (3, 37, 64))
  _two_process_schedule(save)
  np.savez(out, **save)


def two_processes(process_id: str, port: str, workdir: str, out: str) -> None:
  """One of two processes: trains 3 steps, halts, resumes to the end, evaluates; then
  one device of this process alone evaluates the same parameters, for comparison."""
  from bnet_jax import parallel

  parallel.initialize(f"127.0.0.1:{port}", 2, int(process_id))
  import jax
  import jax.numpy as jnp
  import tensorflow_datasets as tfds
  from bnet_jax import cascade, checkpoint, data, evaluate, train

  save = {"processes": jax.process_count(), "devices": jax.device_count(),
          "local_devices": jax.local_device_count()}
  config = small_config()
  with tfds.testing.mock_data(num_examples=MOCK_EXAMPLES):
    assert train.train_and_evaluate(small_config(halt_after_steps=3), workdir) == {}
    save["halted"] = checkpoint.latest_step(workdir)
    train.train_and_evaluate(config, workdir)  # Resumes from step 3.
    mesh = parallel.make_mesh()
    trained = checkpoint.load_trained(workdir, mesh=mesh)
    splits = data.load_splits(config.dataset, config.num_validation, config.data_dir)
  net, variables = trained.net, trained.variables
  save["step"] = trained.step
  save["params"] = _params_vector(variables["params"])
  x = data.preprocess(config.dataset, splits["test"].images[:200])
  outputs = evaluate.all_exits(net, variables, x, 64, mesh=mesh)
  t = _thresholds(outputs.entropy, 0)  # The same on both processes: outputs are gathered.
  pred = cascade.Cascade(net, variables, t, mesh=mesh).predict(x)
  save.update(logits=outputs.logits, thresholds=t, label=pred.label, exit=pred.exit,
              score=pred.score)

  # One device, this process alone, the same parameters (host copies).
  variables = jax.tree.map(np.asarray, variables)
  for name in ("validation", "test"):
    images = data.preprocess(config.dataset, splits[name].images)
    save[f"one_accuracy_{name}"] = evaluate.evaluate_split(
        net, variables, images, splits[name].labels, config.eval_batch_size)["accuracy_per_exit"]
  save["one_logits"] = evaluate.all_exits(net, variables, x, 64).logits
  save["one_scores"] = np.asarray(cascade.logits_and_scores(net, "entropy", variables,
                                                     jnp.asarray(x))[1])
  pred = cascade.Cascade(net, variables, t).predict(x)
  save.update(one_label=pred.label, one_exit=pred.exit, one_score=pred.score)
  np.savez(out, **save)


def _two_process_schedule(save: dict) -> None:
  """The two-process run's training on one process: the same global batches (each
  process's part of the train split, concatenated in process order), straight through."""
  import jax
  import tensorflow_datasets as tfds
  from bnet_jax import data, nets, parallel, train

  config = small_config()
  mesh = parallel.make_mesh()
  net = nets.get(config.model)
  rng = jax.random.key(config.seed)
  variables = nets.init(net, jax.random.fold_in(rng, 0))
  with tfds.testing.mock_data(num_examples=MOCK_EXAMPLES):
    parts = [data.load_splits(config.dataset, config.num_validation, config.data_dir,
                              train_shard=(i, 2))["train"] for i in range(2)]
  parts = [dataclasses.replace(p, images=data.preprocess(config.dataset, p.images))
           for p in parts]
  local_batch = config.batch_size // 2
  steps_per_epoch = MOCK_EXAMPLES // 2 // local_batch
  state = None
  for phase in train.make_phases(config, net, steps_per_epoch):
    tx = train.make_optimizer(config, phase.num_steps)
    base = variables if state is None else {"params": state.params, **state.model_state}
    state = parallel.replicate(train.initial_state(phase, tx, base, phase.first_step), mesh)
    step = train.make_train_step(phase, tx, config.augment, config.max_shift, mesh)
    batches = zip(*(data.train_batches(p, local_batch, config.seed, phase.first_step,
                                       steps_per_epoch) for p in parts))
    for _, ((_, x0, y0), (_, x1, y1)) in zip(range(phase.num_steps), batches):
      batch = {"image": np.concatenate([x0, x1]), "label": np.concatenate([y0, y1])}
      state, _ = step(state, parallel.shard_batch(batch, mesh), parallel.replicate(rng, mesh))
  save["two_process_schedule_params"] = _params_vector(state.params)


if __name__ == "__main__":
  {"eight_devices": eight_devices, "two_processes": two_processes}[sys.argv[1]](*sys.argv[2:])
