r"""The cascade's bucket grid: powers of two against the default (1.5x steps too), batched.

  python -m experiments.benchmark_buckets --workdir=W [--criterion=entropy] \
      [--thresholds=T1,...] [--batch_sizes=256,2048] [--repeats=5]

Uses --thresholds, else the criterion's thresholds in W/thresholds.json (written by
`experiments.benchmark` for W's newest checkpoint: `predict.saved_thresholds`), and
the network's inference layers per bucket, as the benchmark does. At each batch size the main path,
the cascade with power-of-two buckets and the cascade with the default buckets
(`cascade.default_bucket`) run in rotation on the test split (the first 8,192
images); prints ms per sample and each one's gain over the main path.
"""

if __name__ == "__main__":  # Before JAX loads: restart with tcmalloc (experiments/preload.py).
  from experiments import preload
  preload.reexec_with_tcmalloc()

import functools

from absl import flags, logging

from bnet_jax import benchmark, cascade, checkpoint, criteria, data, nets, predict, runtime, timing
from experiments import errors

_WORKDIR = flags.DEFINE_string("workdir", None, "A workdir benchmarked by experiments.benchmark.")
_CRITERION = flags.DEFINE_enum("criterion", "entropy", list(criteria.CRITERIA),
                               "Exit criterion whose saved thresholds to use.")
_THRESHOLDS = flags.DEFINE_list(
    "thresholds", None, "One per exit but the last (default: W/thresholds.json, written by "
    "experiments.benchmark).")
_BATCHES = flags.DEFINE_list("batch_sizes", ["256", "2048"], "Batch sizes to time (> 1).")
_REPEATS = flags.DEFINE_integer("repeats", 5, "Timed passes per variant.")
flags.mark_flag_as_required("workdir")

SAMPLES = 8192  # Test images timed per pass.


def main(argv: list[str]) -> None:
  del argv
  workdir = errors.check_workdir(_WORKDIR.value, write=False)
  batch_sizes = errors.positive_ints("batch_sizes", _BATCHES.value)
  errors.at_least("repeats", _REPEATS.value, 1)
  thresholds = (None if _THRESHOLDS.value is None
                else errors.floats("thresholds", _THRESHOLDS.value))
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)
  runtime.configure()
  trained = checkpoint.load_trained(workdir)
  config = trained.config
  if thresholds is None:
    thresholds = predict.saved_thresholds(workdir, _CRITERION.value, trained.net.num_exits,
                                          int(trained.step))
  cascade.check_thresholds(trained.net, thresholds, _CRITERION.value)
  net_for = lambda b: checkpoint.network(config, **nets.inference_options(config.model, b))
  split = data.load(config.dataset, "test", config.data_dir or None, download=config.download)
  images = data.preprocess(config.dataset, split.images)[:SAMPLES]
  print(f"{trained.net.name}, {_CRITERION.value} thresholds {thresholds}")
  for b in batch_sizes:
    batches = [images[i:i + b] for i in range(0, len(images), b)]
    main_path = benchmark.main_path_predictor(net_for(b), trained.variables)
    runners = {"main path": functools.partial(timing.stream, main_path, batches)}
    top = cascade.default_buckets(b)[-1]
    for name, buckets in (("powers of two", [1 << i for i in range(top.bit_length())]),
                          ("default", None)):
      model = cascade.Cascade(trained.net, trained.variables, thresholds,
                              criterion=_CRITERION.value, buckets=buckets, bucket_net=net_for)
      model.warmup([b])
      runners[name] = functools.partial(timing.stream, model.predict, batches)
    seconds = timing.interleaved_medians(runners, repeats=_REPEATS.value, warmup=1)
    n = sum(len(x) for x in batches)
    print(f"batch {b}: " + "; ".join(
        f"{name} {1e3 * s / n:.4f} ms/sample ({seconds['main path'] / s:.2f}x)"
        for name, s in seconds.items()))


if __name__ == "__main__":
  errors.run(main)
