"""The Table-1 benchmark: measured early-exit speedup against the full network.

For a trained workdir: thresholds are chosen on the validation split (from the
cached all-exits outputs), then the same network's main path (every trunk stage +
the last exit, the baseline) and the early-exit cascade are timed on the test
split at each batch size. Both are jitted the same way with parameters closed over,
under the same process-wide XLA settings, and both are timed end to end: host
batch in, predicted labels back on the host (the cascade's heads, softmax,
criterion, compaction and transfers included). Each repeat is a pass over the same
test batches; baseline and cascade passes alternate, and the median pass time over
the repeats, divided by the samples in a pass, gives ms per sample (the mean cost
per sample, as a user processing a stream would see it). At batch 1 the cascade's
strategy ("host" or "cond", `cascade.Cascade.choose_latency_mode`) is the faster on
validation images; the other one is timed alongside on the test split.
"""

from __future__ import annotations

import functools
import json
import os
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from bnet_jax import criteria, nets, runtime, timing
from bnet_jax.inference import cascade, cost
from bnet_jax.inputs import data
from bnet_jax.reporting import plots
from bnet_jax.thresholds import selection
from bnet_jax.training import checkpoint, evaluate
from bnet_jax.criteria import Criterion


def main_path_predictor(net: nets.Network, variables: nets.Variables
                        ) -> Callable[[np.ndarray], np.ndarray]:
  """The baseline: (B, H, W, C) host images -> (B,) host labels via the main path."""
  fn = runtime.jit(
      lambda x: jnp.argmax(nets.main_logits(net, variables, x), -1).astype(jnp.int32))
  return lambda x: np.asarray(fn(x))


def _batches(images: np.ndarray, batch_size: int, max_samples: int) -> list[np.ndarray]:
  count = min(len(images), max_samples) // batch_size
  return [images[i * batch_size:(i + 1) * batch_size] for i in range(count)]


def _device() -> str:
  d = jax.devices()[0]
  return f"{d.platform}:{d.device_kind}"


def run(workdir: str, batch_sizes: Sequence[int],
        criteria_names: Sequence[Criterion | str] = ("entropy",),
        *, rule: str = "accuracy_drop", epsilon: float = 0.001, delta: float = 0.1,
        max_cost_fraction: float = 0.5, repeats: int = 7, max_samples: int = 10_000,
        batch1_samples: int = 2000, model_options: dict | None = None,
        compute_dtype: str | None = None) -> dict:
  """Chooses thresholds, times baseline and cascade, writes the results into `workdir`.

  Writes ``thresholds.json`` (``{"step", "compute_dtype", "criteria": {name: choice}}``),
  ``benchmark.json`` (``{"step", "compute_dtype", "rows": [...]}``, one row per batch
  size and criterion, each with its ``step``) and ``accuracy_vs_cost.png``. What an
  earlier run wrote for the same checkpoint step and compute dtype is kept in both
  files (other criteria; rows of other batch sizes), so they hold the same criteria;
  anything from another step or dtype is dropped from both.

  Args:
    workdir: a trained workdir; its cached ``exits_*.npz`` are made if missing and
      remade (saying so in one printed line) if they are from another checkpoint
      step or compute dtype.
    batch_sizes: batch sizes to time.
    criteria_names: exit criteria to benchmark (`criteria.Criterion`s or registered
      names); files and rows record each by its name.
    rule, epsilon, delta, max_cost_fraction: the threshold selection rule
      (`selection.choose`).
    repeats: timed passes per variant.
    max_samples: test samples per timed pass (batched).
    batch1_samples: test samples per timed pass at batch size 1 (and validation
      samples per pass when choosing its strategy).
    model_options: layer implementations for inference (parameters unchanged), for
      baseline and cascade alike; None: `nets.inference_options` of the network for
      each batch size on this platform (the baseline's batch, the cascade's bucket).
    compute_dtype: "float32" or "bfloat16" for baseline and cascade alike (None:
      the dtype the workdir trained in).

  Returns:
    The benchmark.json contents.

  Raises:
    ValueError: an empty or non-positive batch size, `repeats` < 1 or an unknown
      criterion (before anything is loaded); a rule's parameter out of range.
  """
  if not batch_sizes or min(batch_sizes) < 1:
    raise ValueError(f"batch_sizes must be positive integers; got {list(batch_sizes)}.")
  if repeats < 1:
    raise ValueError(f"repeats must be at least 1; got {repeats}.")
  chosen_criteria = [criteria.get(c) for c in criteria_names]
  # FLOPs are counted on the layers the network trained with; timing uses the fastest.
  config = checkpoint.read_config(workdir)
  dtype = compute_dtype or checkpoint.trained_compute_dtype(workdir, config)
  trained = checkpoint.load_trained(workdir, compute_dtype=dtype)
  net, variables, step = trained.net, trained.variables, int(trained.step)

  def options_for(batch: int) -> dict:
    return dict(model_options if model_options is not None
                else nets.inference_options(config.model, batch))

  def net_for(batch: int) -> nets.Network:
    return checkpoint.network(config, dtype, **options_for(batch))
  val, test = _cached_exits(workdir, dtype, step)
  split = data.load(config.dataset, "test", config.data_dir or None, download=config.download)
  images = data.preprocess(config.dataset, split.images)
  labels = split.labels
  val_images = None  # Loaded for batch 1 only: where its strategy is chosen.
  if 1 in batch_sizes:
    val_split = data.load_splits(config.dataset, config.num_validation, config.data_dir or None,
                                 download=config.download, only=("validation",))["validation"]
    val_images = data.preprocess(config.dataset, val_split.images[:batch1_samples])

  full_flops = cost.main_path_flops(net, variables)
  baselines = {b: main_path_predictor(net_for(b), variables) for b in batch_sizes}
  base_accuracy = float(np.mean(main_path_predictor(net, variables)(images) == labels))
  chosen, rows, points = {}, [], []
  for criterion in chosen_criteria:
    seg = cost.segment_flops(net, variables, criterion)
    choice = selection.choose(val, test, criterion, seg, rule=rule, epsilon=epsilon, delta=delta,
                              max_cost_fraction=max_cost_fraction)
    choice["segment_flops"] = seg
    chosen[criterion.name] = choice
    model = cascade.Cascade(net, variables, choice["thresholds"], criterion=criterion,
                            bucket_net=net_for)
    for b in batch_sizes:
      baseline = baselines[b]
      pred = _predict_all(model, images, b)
      fractions = np.bincount(pred.exit, minlength=net.num_exits) / len(labels)
      expected = cost.expected(fractions, seg)
      batches = _batches(images, b, batch1_samples if b == 1 else max_samples)
      model.warmup([b])
      chosen_on = None
      if b == 1:
        chosen_on = model.choose_latency_mode(val_images, repeats=repeats)
      runners = {"baseline": functools.partial(timing.stream, baseline, batches),
                 "branchy": functools.partial(timing.stream, model.predict, batches)}
      if b == 1:  # The other batch-1 strategy, timed alongside (`cascade` on latency_mode).
        mode = "cond" if model.latency_mode == "host" else "host"
        other = cascade.Cascade(net, variables, choice["thresholds"], criterion=criterion,
                                bucket_net=net_for, latency_mode=mode)
        other.warmup([1])
        runners[mode] = functools.partial(timing.stream, other.predict, batches)
      seconds = timing.interleaved_medians(runners, repeats=repeats, warmup=1)
      n = len(batches) * b
      row = {
          "network": net.name, "dataset": config.dataset, "split": "test", "device": _device(),
          "backend": jax.default_backend(), "step": step, "compute_dtype": dtype,
          "batch_size": b, "criterion": criterion.name, "thresholds": choice["thresholds"],
          "exit_fractions": [float(f) for f in fractions],
          "baseline": {"accuracy": base_accuracy, "ms_per_sample": 1e3 * seconds["baseline"] / n,
                       "flops_per_sample": full_flops},
          "branchy": {"accuracy": float(np.mean(pred.label == labels)),
                      "ms_per_sample": 1e3 * seconds["branchy"] / n,
                      "expected_flops_per_sample": expected},
          "speedup": seconds["baseline"] / seconds["branchy"],
          "ideal_speedup": full_flops / expected,
          "timing": {"samples_per_pass": n, "repeats": repeats, "statistic": "median pass",
                     "model_options": options_for(b),
                     "xla_compiler_options": runtime.compiler_options(),
                     "cpu_cores": len(os.sched_getaffinity(0)),
                     "latency_mode": model.latency_mode if b == 1 else None,
                     "latency_modes_ms_per_sample": (
                         {model.latency_mode: 1e3 * seconds["branchy"] / n,
                          mode: 1e3 * seconds[mode] / n} if b == 1 else None),
                     "latency_modes_validation_ms_per_sample": chosen_on,
                     "async_dispatch": bool(jax.config.values.get("jax_cpu_enable_async_dispatch", True))},
      }
      rows.append(row)
      print(format_row(row), flush=True)
    points += [{"label": f"{criterion.name}: chosen (validation)", "marker": "o",
                "cost": choice["validation"]["expected_flops"],
                "accuracy": choice["validation"]["accuracy"]},
               {"label": f"{criterion.name}: cascade measured (test)", "marker": "*",
                "cost": rows[-1]["branchy"]["expected_flops_per_sample"],
                "accuracy": rows[-1]["branchy"]["accuracy"]}]

  provenance = {"step": step, "compute_dtype": dtype}
  path = os.path.join(workdir, "thresholds.json")
  earlier = _same_provenance(path, provenance)
  checkpoint.write_json(path, {**provenance, "criteria": {**earlier.get("criteria", {}), **chosen}})
  path = os.path.join(workdir, "benchmark.json")
  results = {**provenance,
             "rows": _merge_rows(_same_provenance(path, provenance).get("rows", []), rows)}
  checkpoint.write_json(path, results)
  first = chosen_criteria[0]
  grid = selection.candidates(val, first, "accuracy_drop", 200)
  plots.accuracy_vs_cost(
      selection.screen(val, first, chosen[first.name]["segment_flops"], grid),
      full_flops, chosen[first.name]["validation"]["last_exit_accuracy"], points,
      os.path.join(workdir, "accuracy_vs_cost.png"),
      title=f"{net.name} on {config.dataset}: accuracy vs cost ({first.name} thresholds)")
  return results


def _cached_exits(workdir: str, dtype: str, step: int
                  ) -> tuple[evaluate.CachedExits, evaluate.CachedExits]:
  """The validation and test exit caches of checkpoint `step` in `dtype`, remade (with
  one printed line saying why) when missing or from another step or dtype."""
  splits = ("validation", "test")
  try:
    return tuple(evaluate.load_exits(workdir, s, dtype, step) for s in splits)
  except (FileNotFoundError, evaluate.StaleExitsError) as e:
    reason = getattr(e, "reason", "an exit cache is missing")
    print(f"rebuilding the exit cache ({reason}): python -m experiments.evaluate "
          f"--workdir={workdir} --compute_dtype={dtype}", flush=True)
  cached = evaluate.cache_exits(workdir, splits, compute_dtype=dtype)
  if any(c.step != step for c in cached.values()):  # A checkpoint changed meanwhile.
    raise evaluate.StaleExitsError(
        f"the newest readable checkpoint of {workdir} changed while benchmarking",
        "rerun the benchmark")
  return cached["validation"], cached["test"]


def _same_provenance(path: str, provenance: dict) -> dict:
  """What an earlier run wrote to the JSON file `path` if it came from the same
  checkpoint step and compute dtype as `provenance`, else {} (nothing to keep)."""
  if not os.path.exists(path):
    return {}
  with open(path) as f:
    earlier = json.load(f)
  return earlier if all(earlier.get(k) == v for k, v in provenance.items()) else {}


def _merge_rows(earlier: list[dict], rows: list[dict]) -> list[dict]:
  """`rows` plus the `earlier` rows (of the same step and dtype) for other (batch,
  criterion) pairs of the same network.

  So batch 1 can be timed in a one-core process and the batched sizes in another.
  """
  if not rows:
    return rows
  key = lambda r: (r["network"], r["criterion"], r["batch_size"])  # noqa: E731
  ours = {key(r) for r in rows}
  kept = [r for r in earlier if key(r) not in ours and r["network"] == rows[0]["network"]]
  return sorted(kept + rows, key=key)


def _predict_all(model: cascade.Cascade, images: np.ndarray, batch_size: int) -> cascade.Prediction:
  parts = [model.predict(images[i:i + batch_size]) for i in range(0, len(images), batch_size)]
  return cascade.Prediction(*(np.concatenate(p) for p in zip(*parts)))


# Wide enough for names such as b_resnet110_trunk_heads.
_NAME_WIDTH = 24
HEADER = (f"{'device':<12} {'network':<{_NAME_WIDTH}} {'batch':>5} {'criterion':<9} {'acc %':>6} "
          f"{'ms/sample':>10} {'gain':>6} {'ideal':>6}  thresholds / exit %")


def format_row(row: dict) -> str:
  """Two Table-1 lines (baseline, then BranchyNet) for one benchmark row."""
  base, br = row["baseline"], row["branchy"]
  dev = row["device"].split(":")[0]
  main = f"{dev:<12} {'main path':<{_NAME_WIDTH}} {row['batch_size']:>5} {'-':<9} " \
         f"{100 * base['accuracy']:>6.2f} {base['ms_per_sample']:>10.4f}"
  thresholds = ", ".join(f"{t:.4g}" for t in row["thresholds"])
  exits = ", ".join(f"{100 * f:.1f}" for f in row["exit_fractions"])
  branchy = f"{dev:<12} {row['network']:<{_NAME_WIDTH}} {row['batch_size']:>5} " \
            f"{row['criterion']:<9} " \
            f"{100 * br['accuracy']:>6.2f} {br['ms_per_sample']:>10.4f} " \
            f"{row['speedup']:>5.2f}x {row['ideal_speedup']:>5.2f}x  T={thresholds} / {exits}"
  modes = row.get("timing", {}).get("latency_modes_ms_per_sample")
  if modes:
    branchy += "\n" + " " * 13 + "batch-1 strategies, ms/sample: " + ", ".join(
        f"{mode} {ms:.4f}" for mode, ms in modes.items())
  return main + "\n" + branchy
