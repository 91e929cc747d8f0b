r"""A peer for scale: our networks in PyTorch eager mode: B-LeNet's batch-1 early exit, and
joint training timed against our JAX train step in the same run.

  pip install torch==2.13.0   # CPU build; not a bnet-jax dependency
  python -m experiments.benchmark_pytorch [--cores=1] [--exit_fraction=0.95]
  python -m experiments.benchmark_pytorch --cores=0 --train_batch_size=512
  python -m experiments.benchmark_pytorch --cores=0 --model=b_resnet \
      --options=depth=110,exit_heads=trunk --dataset=fashion_mnist --train_batch_size=128 \
      [--repeats=5] [--train_steps=10] [--json=peer.json]

The PyTorch networks are `experiments.torch_nets`' transcriptions of ours (NCHW, random
weights: timing does not depend on them). Before timing, the PyTorch network's trainable
parameters (module by module), exits and logits shapes must equal ours: else a one-line
error, so a changed network is never timed against a stale transcription.

Without ``--train_batch_size`` (B-LeNet only), three batch-1 paths are timed in rotation
over the same images, each a median of repeated passes: the main path (stage 1, stage 2,
main exit, argmax), the exit-1 path (stage 1, exit 1, entropy read on the host, leave) and
the continuing path (the same, then stage 2 and the main exit). The early-exit figure
weights the last two by the exit fraction, as the README's Table 1 reports it.

With ``--train_batch_size``, it times joint training of ``--model`` (every exit's
cross-entropy, summed with weight 1, Adam at lr 1e-3) in both frameworks on the same
random batch: ours is the jitted train step the other benchmarks time
(`experiments.train_runner`), PyTorch's runs in train mode (batch statistics, dropout).
Each framework trains in a process of its own, so that neither's threads compete with
the other's, and the parent times them in rotation (`timing.interleaved_medians`: drift
hits both alike) after warming both up; each figure is images/s over the median of
``--repeats`` runs of ``--train_steps`` synchronised steps.
"""

if __name__ == "__main__":  # Before JAX loads: restart with tcmalloc (experiments/preload.py).
  from experiments import preload
  preload.reexec_with_tcmalloc()

import functools
import json
import multiprocessing
import os
import statistics
import time
from collections.abc import Callable
from typing import Any

import jax
import numpy as np
from absl import app, flags

from bnet_jax import nets, runtime, timing
from experiments import errors, train_runner

_CORES = flags.DEFINE_integer("cores", 1, "CPU cores (and torch threads); 0: all.")
_FRACTION = flags.DEFINE_float("exit_fraction", 0.95, "Share of samples leaving at exit 1.")
_SAMPLES = flags.DEFINE_integer("samples", 500, "Images per timed pass.")
_REPEATS = flags.DEFINE_integer("repeats", 9, "Timed passes per path (or per framework).")
_TRAIN_BATCH = flags.DEFINE_integer("train_batch_size", 0, "Time joint training at this batch, "
                                    "PyTorch against ours (0: B-LeNet's batch-1 paths).")
_TRAIN_STEPS = flags.DEFINE_integer("train_steps", 10, "Train steps per timed repeat.")
_MODEL = flags.DEFINE_string("model", "b_lenet", "Registered network name (b_lenet, b_resnet, "
                             "b_alexnet, lenet, resnet, alexnet).")
_OPTIONS = flags.DEFINE_list("options", [], "Network options as KEY=VALUE, e.g. "
                             "depth=110,exit_heads=trunk.")
_DATASET = flags.DEFINE_string("dataset", "", "Size the network for this dataset's images and "
                               "classes, e.g. fashion_mnist (empty: the network's defaults).")
_JSON = flags.DEFINE_string("json", None, "Write the results here as JSON.")


def check_transcription(net: nets.Network, variables: nets.Variables, model: Any) -> str:
  """Refuses (one line) a PyTorch `model` whose trainable parameters, module by module, or
  exits' logits shapes differ from ours; else says what was compared."""
  import torch  # noqa: PLC0415 -- optional, and after pinning the cores.

  ours = {name: nets.count_params(tree) for name, tree in variables["params"].items()}
  theirs = {name: sum(p.numel() for p in module.parameters() if p.requires_grad)
            for name, module in model.stages.items()}
  total = sum(p.numel() for p in model.parameters() if p.requires_grad)
  if total != nets.count_params(variables["params"]) or any(
      ours.get(n, 0) != theirs.get(n, 0) for n in {*ours, *theirs}):
    names = nets.module_names(net) + sorted({*ours, *theirs} - set(nets.module_names(net)))
    name = next((n for n in names if ours.get(n, 0) != theirs.get(n, 0)), "in all")
    raise app.UsageError(
        f"the PyTorch {net.name} has {total:,} trainable parameters, ours "
        f"{nets.count_params(variables['params']):,} ({name}: {theirs.get(name, 0):,} against "
        f"{ours.get(name, 0):,}): experiments/torch_nets.py no longer transcribes "
        f"bnet_jax.nets; fix it before timing.")
  h, w, c = net.input_shape
  x = np.zeros((2, h, w, c), np.float32)
  logits = jax.eval_shape(lambda v, x: nets.forward(net, v, x)[0].logits, variables, x).shape
  want = [tuple(logits[1:])] * logits[0]
  training = model.training
  model.eval()
  with torch.no_grad():
    got = [tuple(z.shape) for z in model(torch.zeros(2, c, h, w))]
  model.train(training)
  if got != want:
    raise app.UsageError(f"the PyTorch {net.name} returns logits of shapes {got} for a batch "
                         f"of 2, ours {want}: experiments/torch_nets.py no longer transcribes "
                         f"bnet_jax.nets; fix it before timing.")
  return (f"{total:,} trainable parameters and {len(want)} exit(s) of "
          f"{want[-1][1]} logits in both")


def torch_train_runner(model: Any, batch: dict[str, np.ndarray], steps: int
                       ) -> Callable[[], None]:
  """PyTorch's joint training: `steps` steps on `batch` (as NCHW), each the summed
  cross-entropy of every exit, backward, Adam (lr 1e-3) in train mode. Eager on the CPU,
  so each step has finished when it returns."""
  import torch  # noqa: PLC0415 -- optional, and after pinning the cores.
  from torch.nn import functional as F  # noqa: PLC0415, N812

  x = torch.from_numpy(np.ascontiguousarray(batch["image"].transpose(0, 3, 1, 2)))
  y = torch.from_numpy(batch["label"].astype(np.int64))
  opt = torch.optim.Adam(model.parameters(), lr=1e-3)
  model.train()

  def run() -> None:
    for _ in range(steps):
      loss = sum(F.cross_entropy(z, y) for z in model(x))
      opt.zero_grad()
      loss.backward()
      opt.step()

  return run


def _serve(framework: str, conn: Any, setup: dict[str, Any]) -> None:
  """A timing worker: builds `framework`'s ("jax" or "pytorch") joint train step on
  `setup`'s batch, then runs it once for each request on `conn` until it gets None.

  Replies True when a run is done, or the error's text if building or running failed.
  """
  try:
    batch, steps = setup["batch"], setup["steps"]
    if framework == "jax":
      runtime.configure()
      net = nets.get(setup["model"], **setup["options"])
      run = train_runner.joint_step_runner(net, batch, steps, nets.init(net, jax.random.key(0)))
    else:
      import torch  # noqa: PLC0415 -- optional; only this worker runs PyTorch.

      from experiments import torch_nets  # noqa: PLC0415 -- imports torch.
      torch.set_num_threads(setup["cores"])
      torch.manual_seed(0)
      run = torch_train_runner(torch_nets.get(setup["model"], **setup["options"]), batch, steps)
    while conn.recv() is not None:
      run()
      conn.send(True)
  except Exception as e:  # noqa: BLE001 -- reported to the parent, which raises it.
    conn.send(f"{framework} worker: {type(e).__name__}: {e}")


def time_training(model: str, options: dict[str, Any], batch: dict[str, np.ndarray],
                  cores: int, steps: int, repeats: int) -> dict[str, float]:
  """Images/s of our joint training ("jax") and PyTorch's ("pytorch") on `batch`.

  Each framework runs in a process of its own, so neither's threads (oneDNN's OpenMP
  team in both, XLA's pool in ours) compete with or are shared by the other's; the
  two are warmed up, then timed in rotation from here, each figure the median of
  `repeats` runs of `steps` steps.
  """
  context = multiprocessing.get_context("spawn")
  setup = {"model": model, "options": options, "batch": batch, "cores": cores, "steps": steps}
  workers, runners = [], {}
  try:
    for framework in ("jax", "pytorch"):
      conn, child = context.Pipe()
      worker = context.Process(target=_serve, args=(framework, child, setup), daemon=True)
      worker.start()
      workers.append((worker, conn))
      runners[framework] = functools.partial(_request, conn)
    seconds = timing.interleaved_medians(runners, repeats=repeats, warmup=2)
  finally:
    for worker, conn in workers:
      if worker.is_alive():
        conn.send(None)
      worker.join(timeout=30)
  return {name: len(batch["label"]) * steps / s for name, s in seconds.items()}


def _request(conn: Any) -> None:
  """Asks a worker of `time_training` for one timed run and waits for it."""
  conn.send(True)
  reply = conn.recv()
  if reply is not True:
    raise RuntimeError(reply)


def time_lenet_paths(model: Any, input_shape: tuple[int, int, int], samples: int,
                     repeats: int) -> dict[str, float]:
  """Microseconds per sample of B-LeNet's batch-1 main, exit-1 and continuing paths, each
  the median of `repeats` passes over `samples` images, timed in rotation."""
  import torch  # noqa: PLC0415 -- optional, and after pinning the cores.
  from torch.nn import functional as F  # noqa: PLC0415, N812

  stage1, exit1, stage2, main_exit = (model.stages[n] for n in
                                      ("trunk_0", "head_0", "trunk_1", "head_1"))
  conv1, exit_conv, exit_fc = stage1.conv1, exit1.exit_conv, exit1.exit_fc
  conv2, conv3, fc1, fc2 = stage2.conv2, stage2.conv3, stage2.fc1, main_exit

  def pool_relu(h):
    return F.relu(F.max_pool2d(h, 2, ceil_mode=True))

  def stage2_path(h):
    return fc2(fc1(pool_relu(conv3(pool_relu(conv2(h)))).flatten(1)))

  def main_path(x):
    return stage2_path(pool_relu(conv1(x))).argmax(-1).numpy()

  def early_exit(x, leave):
    h = pool_relu(conv1(x))
    z = exit_fc(pool_relu(exit_conv(h)).flatten(1))
    entropy = -(F.softmax(z, -1) * F.log_softmax(z, -1)).sum(-1).numpy()[0]
    if leave or entropy < 0:  # The host reads the entropy either way.
      return z.argmax(-1).numpy()
    return stage2_path(h).argmax(-1).numpy()

  h, w, c = input_shape
  xs = [torch.rand(1, c, h, w) for _ in range(samples)]
  paths = {"main path": lambda: [main_path(x) for x in xs],
           "exit-1 path": lambda: [early_exit(x, True) for x in xs],
           "continuing path": lambda: [early_exit(x, False) for x in xs]}
  times = {name: [] for name in paths}
  model.eval()
  with torch.inference_mode():
    for run in paths.values():
      run()
    for _ in range(repeats):
      for name, run in paths.items():
        t0 = time.perf_counter()
        run()
        times[name].append(time.perf_counter() - t0)
  return {name: 1e6 * statistics.median(t) / len(xs) for name, t in times.items()}


def main(argv: list[str]) -> None:
  del argv
  if _JSON.value:
    errors.check_output(_JSON.value, "json")
  errors.at_least("cores", _CORES.value, 0)
  errors.at_least("samples", _SAMPLES.value, 1)
  errors.at_least("repeats", _REPEATS.value, 1)
  errors.at_least("train_batch_size", _TRAIN_BATCH.value, 0)
  errors.at_least("train_steps", _TRAIN_STEPS.value, 1)
  if not 0 <= _FRACTION.value <= 1:
    raise app.UsageError(f"--exit_fraction must be in [0, 1]; got {_FRACTION.value}.")
  errors.check_model(_MODEL.value)
  if not _TRAIN_BATCH.value and _MODEL.value != "b_lenet":
    raise app.UsageError(f"the batch-1 early-exit paths are B-LeNet's only; pass "
                         f"--train_batch_size=N to time joint training of {_MODEL.value}.")
  given = train_runner.parse_options(_OPTIONS.value)
  options = train_runner.network_options(_OPTIONS.value, _DATASET.value)
  allowed = sorted(os.sched_getaffinity(0))
  if _CORES.value > len(allowed):
    raise app.UsageError(f"--cores={_CORES.value}, but this process may use only "
                         f"{len(allowed)} CPU core(s).")
  if _CORES.value:
    os.sched_setaffinity(0, allowed[:_CORES.value])
  import torch  # noqa: PLC0415 -- optional, and after pinning the cores.

  from experiments import torch_nets  # noqa: PLC0415 -- imports torch.
  cores = len(os.sched_getaffinity(0))
  torch.set_num_threads(cores)
  torch.manual_seed(0)
  runtime.configure()  # Before JAX starts (training: asynchronous dispatch stays on).
  errors.check_network("options", lambda: nets.get(_MODEL.value, **options))
  net = nets.get(_MODEL.value, **options)
  model = torch_nets.get(_MODEL.value, **options)
  variables = nets.init(net, jax.random.key(0))
  checked = check_transcription(net, variables, model)
  row = {"model": _MODEL.value, "network": net.name, "options": given,
         "dataset": _DATASET.value or None, "params": nets.count_params(variables["params"]),
         "torch_version": torch.__version__, "jax_version": jax.__version__, "cores": cores,
         "jax_device": jax.devices()[0].device_kind}
  print(f"{net.name}: {checked} (PyTorch {torch.__version__}, JAX {jax.__version__}, "
        f"{cores} core(s))")

  if _TRAIN_BATCH.value:
    rates = time_training(_MODEL.value, options, train_runner.random_batch(net, _TRAIN_BATCH.value),
                          cores, _TRAIN_STEPS.value, _REPEATS.value)
    row.update(batch_size=_TRAIN_BATCH.value, train_steps=_TRAIN_STEPS.value,
               repeats=_REPEATS.value, images_per_s=rates,
               ratio_jax_over_pytorch=rates["jax"] / rates["pytorch"])
    print(f"joint training at batch {_TRAIN_BATCH.value}, median of {_REPEATS.value} x "
          f"{_TRAIN_STEPS.value} steps in rotation:")
    print(f"  ours (JAX)     {rates['jax']:10.0f} images/s")
    print(f"  PyTorch eager  {rates['pytorch']:10.0f} images/s")
    print(f"  ours / PyTorch {row['ratio_jax_over_pytorch']:10.2f}x")
  else:
    us = time_lenet_paths(model, net.input_shape, _SAMPLES.value, _REPEATS.value)
    f = _FRACTION.value
    early = f * us["exit-1 path"] + (1 - f) * us["continuing path"]
    row.update(batch_size=1, samples=_SAMPLES.value, repeats=_REPEATS.value,
               us_per_sample=us, exit_fraction=f, early_exit_us=early)
    print(f"PyTorch {torch.__version__}, batch 1, {cores} core(s), us per sample:")
    for name, value in us.items():
      print(f"  {name:16s} {value:8.1f}")
    print(f"  early exit ({100 * f:.0f}% at exit 1): {early:.1f} us, "
          f"{us['main path'] / early:.2f}x the main path")
  if _JSON.value:
    with open(_JSON.value, "w") as out:
      json.dump({"rows": [row]}, out, indent=2, default=str)


if __name__ == "__main__":
  errors.run(main)
