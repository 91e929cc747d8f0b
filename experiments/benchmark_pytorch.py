r"""A peer for scale: B-LeNet in PyTorch eager mode: batch-1 early exit, joint training.

  pip install torch==2.13.0   # CPU build; not a bnet-jax dependency
  python -m experiments.benchmark_pytorch [--cores=1] [--exit_fraction=0.95]
  python -m experiments.benchmark_pytorch --cores=0 --train_batch_size=512

The same architecture as `bnet_jax.nets.lenet` (ceil-mode pooling, NCHW), random
weights: timing does not depend on them. Three paths are timed in rotation over the
same images, each a median of repeated passes: the main path (stage 1, stage 2, main
exit, argmax), the exit-1 path (stage 1, exit 1, entropy read on the host, leave) and
the continuing path (the same, then stage 2 and the main exit). The early-exit figure
weights the last two by the exit fraction, as the README's Table 1 reports it.
With ``--train_batch_size``, it times joint training instead (both exits' summed
cross-entropy, Adam), in images per second, the median of repeated runs of
``--train_steps`` steps after a warm-up, as `experiments.benchmark_train` does.
"""

import os
import statistics
import time

from absl import app, flags

_CORES = flags.DEFINE_integer("cores", 1, "CPU cores (and torch threads); 0: all.")
_FRACTION = flags.DEFINE_float("exit_fraction", 0.95, "Share of samples leaving at exit 1.")
_SAMPLES = flags.DEFINE_integer("samples", 500, "Images per timed pass.")
_REPEATS = flags.DEFINE_integer("repeats", 9, "Timed passes per path.")
_TRAIN_BATCH = flags.DEFINE_integer("train_batch_size", 0, "Time joint training at this batch.")
_TRAIN_STEPS = flags.DEFINE_integer("train_steps", 10, "Train steps per timed repeat.")


def main(argv: list[str]) -> None:
  del argv
  if _CORES.value:
    os.sched_setaffinity(0, sorted(os.sched_getaffinity(0))[:_CORES.value])
  import torch  # noqa: PLC0415 -- optional, and after pinning the cores.
  from torch import nn  # noqa: PLC0415
  from torch.nn import functional as F  # noqa: PLC0415, N812
  torch.set_num_threads(len(os.sched_getaffinity(0)))
  torch.manual_seed(0)
  conv1 = nn.Conv2d(1, 5, 5, padding=3)
  exit_conv, exit_fc = nn.Conv2d(5, 10, 3, padding=1), nn.Linear(640, 10)
  conv2, conv3 = nn.Conv2d(5, 10, 5, padding=3), nn.Conv2d(10, 20, 5, padding=3)
  fc1, fc2 = nn.Linear(720, 84), nn.Linear(84, 10)

  def pool_relu(h):
    return F.relu(F.max_pool2d(h, 2, ceil_mode=True))

  def stage2(h):
    return fc2(fc1(pool_relu(conv3(pool_relu(conv2(h)))).flatten(1)))

  def main_path(x):
    return stage2(pool_relu(conv1(x))).argmax(-1).numpy()

  def early_exit(x, leave):
    h = pool_relu(conv1(x))
    z = exit_fc(pool_relu(exit_conv(h)).flatten(1))
    entropy = -(F.softmax(z, -1) * F.log_softmax(z, -1)).sum(-1).numpy()[0]
    if leave or entropy < 0:  # The host reads the entropy either way.
      return z.argmax(-1).numpy()
    return stage2(h).argmax(-1).numpy()

  if _TRAIN_BATCH.value:
    modules = [conv1, exit_conv, exit_fc, conv2, conv3, fc1, fc2]
    opt = torch.optim.Adam([p for m in modules for p in m.parameters()], lr=1e-3)
    x = torch.rand(_TRAIN_BATCH.value, 1, 28, 28)
    y = torch.randint(0, 10, (_TRAIN_BATCH.value,))

    def step():
      h = pool_relu(conv1(x))
      z1 = exit_fc(pool_relu(exit_conv(h)).flatten(1))
      loss = F.cross_entropy(z1, y) + F.cross_entropy(stage2(h), y)
      opt.zero_grad()
      loss.backward()
      opt.step()

    for _ in range(3):
      step()
    runs = []
    for _ in range(_REPEATS.value):
      t0 = time.perf_counter()
      for _ in range(_TRAIN_STEPS.value):
        step()
      runs.append(time.perf_counter() - t0)
    rate = _TRAIN_BATCH.value * _TRAIN_STEPS.value / statistics.median(runs)
    print(f"PyTorch {torch.__version__}, {len(os.sched_getaffinity(0))} core(s): joint "
          f"training at batch {_TRAIN_BATCH.value}: {rate:.0f} images/s")
    return

  xs = [torch.rand(1, 1, 28, 28) for _ in range(_SAMPLES.value)]
  paths = {"main path": lambda: [main_path(x) for x in xs],
           "exit-1 path": lambda: [early_exit(x, True) for x in xs],
           "continuing path": lambda: [early_exit(x, False) for x in xs]}
  times = {name: [] for name in paths}
  with torch.inference_mode():
    for run in paths.values():
      run()
    for _ in range(_REPEATS.value):
      for name, run in paths.items():
        t0 = time.perf_counter()
        run()
        times[name].append(time.perf_counter() - t0)
  us = {name: 1e6 * statistics.median(t) / len(xs) for name, t in times.items()}
  f = _FRACTION.value
  early = f * us["exit-1 path"] + (1 - f) * us["continuing path"]
  print(f"PyTorch {torch.__version__}, batch 1, {len(os.sched_getaffinity(0))} core(s), "
        "us per sample:")
  for name, value in us.items():
    print(f"  {name:16s} {value:8.1f}")
  print(f"  early exit ({100 * f:.0f}% at exit 1): {early:.1f} us, "
        f"{us['main path'] / early:.2f}x the main path")


if __name__ == "__main__":
  app.run(main)
