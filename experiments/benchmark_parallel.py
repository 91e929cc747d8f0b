r"""Batch-evaluation throughput and the sharded cascade's cost, on this machine's devices.

  python -m experiments.benchmark_parallel [--workdir=W] [--json=eval.json]
  python -m experiments.benchmark_parallel --devices=8 [--workdir=W] [--json=mesh.json]

1. Batch evaluation on one device: images/s of the all-exits pass over the test split
   (`evaluate.all_exits`, every exit's logits back on the host), of the same pass
   counting correct predictions on the device (`evaluate.correct_per_exit`), and of
   the main path alone (the plain network, `net.main_network()`, the same loop).
2. With more than one device (``--devices=N`` forces N CPU devices), the same passes
   split over all of them, and the batched cascade split over all of them
   (`Cascade(mesh=...)`) against the one-device cascade, in ms per batch and as a
   ratio, at a threshold that lets `--exit_fraction` of the samples leave at exit 1.

Weights are W's newest checkpoint, or a fresh B-LeNet (cost does not depend on them;
exits do, hence the quantile threshold), with the network's fastest inference layers
(`nets.inference_options`, or `--model_option`). Images: the test split of W's
dataset (MNIST without W), random if it is not prepared. Every figure is the median over `--repeats` runs
timed in rotation after a warm-up (compilation), results fetched to the host.
"""

if __name__ == "__main__":  # Before JAX loads: restart with tcmalloc (experiments/preload.py).
  from experiments import preload
  preload.reexec_with_tcmalloc()

import json

import jax
import numpy as np
from absl import flags

from bnet_jax import cascade, checkpoint, data, evaluate, nets, parallel, runtime, timing
from experiments import errors

_WORKDIR = flags.DEFINE_string("workdir", None, "Trained workdir (default: fresh B-LeNet).")
_DEVICES = flags.DEFINE_integer("devices", 0, "Force this many CPU devices (0: as found).")
_BATCH = flags.DEFINE_integer("batch_size", 1000, "Rows per batch of the all-exits pass.")
_CASCADE_BATCHES = flags.DEFINE_list("cascade_batch_sizes", ["256", "2048"],
                                     "Batch sizes of the cascade comparison.")
_EXIT_FRACTION = flags.DEFINE_float("exit_fraction", 0.7,
                                    "Share of samples leaving at exit 1 in the cascade.")
_REPEATS = flags.DEFINE_integer("repeats", 7, "Timed repeats of each variant.")
_OPTIONS = flags.DEFINE_multi_string(
    "model_option", [], "KEY=VALUE layer option (default: the network's "
    "nets.inference_options); parameters are the same whatever the layers.")
_JSON = flags.DEFINE_string("json", None, "Write the results here as JSON.")


def _model_and_images() -> tuple[nets.Network, nets.Variables, np.ndarray, dict]:
  """The network with inference layer options, its variables, test images, and a note."""
  name, options, variables, dataset, data_dir = "b_lenet", {}, None, "mnist", None
  if _WORKDIR.value:
    trained = checkpoint.load_trained(_WORKDIR.value)
    c = trained.config
    name, variables = c.model, trained.variables
    options = {"input_shape": trained.net.input_shape, "num_classes": trained.net.num_classes,
               **c.model_options.to_dict()}  # The shape the dataset gave it.
    dataset, data_dir = c.dataset, c.data_dir or None
  options.update(errors.key_values("model_option", _OPTIONS.value)
                 or nets.inference_options(name))
  net = nets.get(name, **options)
  if variables is None:
    variables = nets.init(net, jax.random.key(0))
  try:
    images = data.preprocess(dataset, data.load(dataset, "test", data_dir).images)
  except data.DataNotFoundError:
    images = np.random.default_rng(0).random((10000, *net.input_shape), np.float32)
  note = {"model": name, "model_options": options, "dataset": dataset,
          "weights": _WORKDIR.value or "fresh"}
  return net, variables, images, note


def _eval_rows(net, variables, images, mesh, label: str) -> list[dict]:
  n, b = len(images), _BATCH.value
  labels = np.zeros(n, np.int32)
  runners = {
      "all_exits": lambda: evaluate.all_exits(net, variables, images, b, mesh=mesh),
      "all_exits_counts": lambda: evaluate.correct_per_exit(net, variables, images, labels,
                                                            b, mesh),
      "main_path": lambda: evaluate.all_exits(net.main_network(), variables, images, b,
                                              mesh=mesh),
  }
  seconds = timing.interleaved_medians(runners, repeats=_REPEATS.value, warmup=1)
  rows = []
  for what, sec in seconds.items():
    rows.append({"part": "evaluation", "what": what, "devices": mesh.size, "batch_size": b,
                 "num_images": n, "images_per_s": n / sec})
    print(f"evaluation {label:9s} {what:16s} batch {b:5d}: {n / sec:9.0f} images/s")
  return rows


def _cascade_rows(net, variables, images, mesh) -> list[dict]:
  scores = np.asarray(evaluate.all_exits(net, variables, images[:2048]).entropy[0])
  t = [float(np.quantile(scores, _EXIT_FRACTION.value))]
  one = cascade.Cascade(net, variables, t)
  many = cascade.Cascade(net, variables, t, mesh=mesh)
  rows = []
  for b in map(int, _CASCADE_BATCHES.value):
    x = images[np.arange(b) % len(images)]
    one.warmup([b])
    many.warmup([b])
    exits = one.predict(x).exit
    seconds = timing.interleaved_medians({"one": lambda: one.predict(x),
                                          "sharded": lambda: many.predict(x)},
                                         repeats=_REPEATS.value, warmup=2)
    rows.append({"part": "cascade", "batch_size": b, "devices": mesh.size,
                 "exit_fraction": float(np.mean(exits == 0)),
                 "one_device_ms": 1e3 * seconds["one"], "sharded_ms": 1e3 * seconds["sharded"],
                 "sharded_over_one": seconds["sharded"] / seconds["one"]})
    print(f"cascade batch {b:5d} ({rows[-1]['exit_fraction']:.0%} leave at exit 1): one device "
          f"{rows[-1]['one_device_ms']:8.2f} ms, {mesh.size} devices "
          f"{rows[-1]['sharded_ms']:8.2f} ms, ratio {rows[-1]['sharded_over_one']:.2f}")
  return rows


def main(argv: list[str]) -> None:
  del argv
  if _WORKDIR.value:
    errors.check_workdir(_WORKDIR.value, write=False)
  if _JSON.value:
    errors.check_output(_JSON.value, "json")
  errors.at_least("devices", _DEVICES.value, 0)
  errors.at_least("batch_size", _BATCH.value, 1)
  errors.positive_ints("cascade_batch_sizes", _CASCADE_BATCHES.value)
  errors.at_least("repeats", _REPEATS.value, 1)
  if not 0 <= _EXIT_FRACTION.value <= 1:
    raise ValueError(f"--exit_fraction must lie in [0, 1]; got {_EXIT_FRACTION.value}.")
  options = errors.key_values("model_option", _OPTIONS.value)
  runtime.configure()
  if options:
    name = checkpoint.read_config(_WORKDIR.value).model if _WORKDIR.value else "b_lenet"
    errors.check_network("model_option", lambda: nets.get(name, **options))
  if _DEVICES.value:
    jax.config.update("jax_num_cpu_devices", _DEVICES.value)
  net, variables, images, note = _model_and_images()
  one = parallel.make_mesh(jax.devices()[:1])
  rows = _eval_rows(net, variables, images, one, "1 device")
  if jax.device_count() > 1:
    mesh = parallel.make_mesh()
    rows += _eval_rows(net, variables, images, mesh, f"{mesh.size} devices")
    rows += _cascade_rows(net, variables, images, mesh)
  meta = {**note, "device": jax.devices()[0].device_kind, "devices": jax.device_count(),
          "repeats": _REPEATS.value}
  if _JSON.value:
    with open(_JSON.value, "w") as f:
      json.dump({**meta, "rows": rows}, f, indent=2)


if __name__ == "__main__":
  errors.run(main)
