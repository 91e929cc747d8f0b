r"""Per-exit-segment cost of a network: XLA FLOPs, measured time, ideal speedups, training rate.

  python -m experiments.benchmark_stages --model=b_resnet --options=depth=110 \
      --exit_fractions=0.415,0.138,0.447 [--dataset=fashion_mnist] [--json=stages.json]

For each exit segment (the trunk stages since the previous exit, the exit head and
the entropy; `cascade.segment_fn`) it reports XLA's FLOPs per sample, of which the
head's (`cost.head_flops`), and the median time
of one jitted call at each batch size (parameters closed over, warmed up, segments and
the plain main path timed in rotation). At the given exit fractions it reports the
FLOPs-ideal speedup (main-path FLOPs / expected segment FLOPs) next to the speedup the
measured segment times give (main-path time / expected segment time): the best a
cascade can do on this machine, with no batching or host overhead. Segments are timed
with the layers the cascade uses at each batch (`nets.inference_options`), training
with those "auto" trains with; `--options` override both. Last, the joint training
throughput in images/s. Weights are freshly initialised: cost does not
depend on them.
"""

if __name__ == "__main__":  # Before JAX loads: restart with tcmalloc (experiments/preload.py).
  from experiments import preload
  preload.reexec_with_tcmalloc()

import json

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from bnet_jax import cascade, cost, nets, runtime, timing
from experiments import errors, train_runner

_MODEL = flags.DEFINE_string("model", "b_alexnet", "Registered network name.")
_OPTIONS = flags.DEFINE_list("options", [], "Network options as KEY=VALUE, e.g. depth=110.")
_DATASET = flags.DEFINE_string("dataset", "", "Size the network for this dataset's images and "
                               "classes, e.g. fashion_mnist (empty: the network's defaults).")
_FRACTIONS = flags.DEFINE_list("exit_fractions", ["0.656", "0.252", "0.092"],
                               "Fraction of samples leaving at each exit (B-AlexNet's in "
                               "the paper; B-ResNet's were 0.415,0.138,0.447).")
_BATCHES = flags.DEFINE_list("batch_sizes", ["1", "256"], "Batch sizes to time.")
_REPEATS = flags.DEFINE_integer("repeats", 10, "Timed repeats per segment.")
_TRAIN_BATCH = flags.DEFINE_integer("train_batch_size", 128, "Joint training batch (0: skip).")
_TRAIN_STEPS = flags.DEFINE_integer("train_steps", 3, "Train steps per timed repeat.")
_TRAIN_REPEATS = flags.DEFINE_integer("train_repeats", 3, "Timed repeats of the train steps.")
_JSON = flags.DEFINE_string("json", None, "Write the results here as JSON.")


def segment_seconds(net: nets.Network, variables: nets.Variables, batch_size: int,
                    repeats: int) -> tuple[list[float], float]:
  """Median seconds of each exit segment and of the main path at `batch_size`."""
  x = jnp.asarray(np.random.default_rng(0).standard_normal(
      (batch_size, *net.input_shape)), jnp.float32)
  runners, h = {}, x
  for k in range(net.num_exits):
    seg = cascade.segment_fn(net, k)
    fn = runtime.jit(lambda h, seg=seg: seg(variables, h))
    runners[f"segment{k}"] = lambda fn=fn, h=h: jax.block_until_ready(fn(h))
    h = fn(h)[0]
  main = runtime.jit(lambda x: jnp.argmax(nets.main_logits(net, variables, x), -1))
  runners["main"] = lambda: jax.block_until_ready(main(x))
  seconds = timing.interleaved_medians(runners, repeats=repeats, warmup=2)
  return [seconds[f"segment{k}"] for k in range(net.num_exits)], seconds["main"]


def train_images_per_s(net: nets.Network, batch_size: int, steps: int, repeats: int) -> float:
  """Joint training throughput: Adam steps on a fixed random batch, median of repeats."""
  run = train_runner.joint_step_runner(net, train_runner.random_batch(net, batch_size), steps)
  seconds = timing.interleaved_medians({"train": run}, repeats=repeats, warmup=1)["train"]
  return steps * batch_size / seconds


def main(argv: list[str]) -> None:
  del argv
  if _JSON.value:
    errors.check_output(_JSON.value, "json")
  batch_sizes = errors.positive_ints("batch_sizes", _BATCHES.value)
  errors.at_least("repeats", _REPEATS.value, 1)
  errors.at_least("train_batch_size", _TRAIN_BATCH.value, 0)
  errors.at_least("train_steps", _TRAIN_STEPS.value, 1)
  errors.at_least("train_repeats", _TRAIN_REPEATS.value, 1)
  try:
    fractions = [float(f) for f in _FRACTIONS.value]
  except ValueError:
    raise ValueError(f"--exit_fractions must be numbers; got {','.join(_FRACTIONS.value)}."
                     ) from None
  options = train_runner.network_options(_OPTIONS.value, _DATASET.value)
  runtime.configure()
  errors.check_network("options", lambda: nets.get(_MODEL.value, **options))
  net = nets.get(_MODEL.value, **options)
  if len(fractions) != net.num_exits or abs(sum(fractions) - 1) > 1e-3:
    raise app.UsageError(f"--exit_fractions needs {net.num_exits} fractions summing to 1; "
                         f"got {fractions}.")
  variables = nets.init(net, jax.random.key(0))
  flops = cost.segment_flops(net, variables)
  head_flops = cost.head_flops(net, variables, segment_costs=flops)
  main_flops = cost.main_path_flops(net, variables)
  result = {
      "network": net.name, "device": jax.devices()[0].device_kind,
      "params": nets.count_params(variables["params"]), "exit_fractions": fractions,
      "segment_mflops": [f / 1e6 for f in flops], "head_mflops": [f / 1e6 for f in head_flops],
      "main_path_mflops": main_flops / 1e6,
      "ideal_speedup_flops": main_flops / cost.expected(fractions, flops), "timing": [],
  }
  print(f"{net.name}: {result['params']:,} parameters; exit fractions {fractions}")
  print(f"  MFLOPs per sample, segments: {' '.join(f'{f / 1e6:.2f}' for f in flops)} (heads "
        f"{' '.join(f'{f / 1e6:.2f}' for f in head_flops)}); "
        f"main path {main_flops / 1e6:.2f}; FLOPs-ideal speedup "
        f"{result['ideal_speedup_flops']:.2f}x")
  for batch_size in batch_sizes:  # The layers the cascade runs at this batch; same parameters.
    at_batch = nets.get(_MODEL.value, **{**nets.inference_options(_MODEL.value, batch_size),
                                         **options})
    seconds, main_s = segment_seconds(at_batch, variables, batch_size, _REPEATS.value)
    row = {"batch_size": batch_size,
           "segment_ms_per_sample": [1e3 * s / batch_size for s in seconds],
           "main_path_ms_per_sample": 1e3 * main_s / batch_size,
           "speedup_from_stage_times": main_s / cost.expected(fractions, seconds)}
    result["timing"].append(row)
    print(f"  batch {batch_size:4d}: ms/sample, segments "
          f"{' '.join(f'{t:.4f}' for t in row['segment_ms_per_sample'])}; main path "
          f"{row['main_path_ms_per_sample']:.4f}; speedup from stage times "
          f"{row['speedup_from_stage_times']:.2f}x (FLOPs-ideal "
          f"{result['ideal_speedup_flops']:.2f}x)")
  if _TRAIN_BATCH.value:
    rate = train_images_per_s(net, _TRAIN_BATCH.value, _TRAIN_STEPS.value, _TRAIN_REPEATS.value)
    result["train"] = {"batch_size": _TRAIN_BATCH.value, "images_per_s": rate}
    print(f"  joint training, batch {_TRAIN_BATCH.value}: {rate:.0f} images/s")
  if _JSON.value:
    with open(_JSON.value, "w") as f:
      json.dump(result, f, indent=2)


if __name__ == "__main__":
  errors.run(main)
