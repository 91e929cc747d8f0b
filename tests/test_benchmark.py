"""Trained workdir -> cached exits -> threshold choice -> Table-1 benchmark, on mock data."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import tensorflow_datasets as tfds

from bnet_jax import benchmark, evaluate, train
from helpers import MOCK_EXAMPLES, REPO, small_config

ROW_KEYS = {"network", "dataset", "split", "device", "batch_size", "criterion", "thresholds",
            "exit_fractions", "baseline", "branchy", "speedup", "ideal_speedup"}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("w")
  with tfds.testing.mock_data(num_examples=MOCK_EXAMPLES):
    train.train_and_evaluate(small_config(), str(workdir))
    evaluate.cache_exits(str(workdir), batch_size=128)
  return str(workdir)


@pytest.mark.newest
def test_cached_exits_match_eval_json(trained):
  with open(os.path.join(trained, "eval.json")) as f:
    saved = json.load(f)
  for split in ("validation", "test"):
    cached = evaluate.load_exits(trained, split)
    assert cached.logits.shape == (2, MOCK_EXAMPLES, 10)
    assert cached.labels.shape == (MOCK_EXAMPLES,)
    np.testing.assert_allclose(evaluate.accuracy_per_exit(cached.logits, cached.labels),
                               saved[split]["accuracy_per_exit"], atol=1e-6)


@pytest.mark.parametrize("rule", [pytest.param("accuracy_drop", marks=pytest.mark.newest), "risk"])
def test_benchmark_writes_rows_thresholds_and_plot(trained, rule):
  with tfds.testing.mock_data(num_examples=MOCK_EXAMPLES):
    results = benchmark.run(trained, [1, 3], ("entropy", "max_prob"), rule=rule, repeats=1,
                            max_samples=12, batch1_samples=4)
  with open(os.path.join(trained, "benchmark.json")) as f:
    assert json.load(f) == results
  rows = results["rows"]
  assert [(r["criterion"], r["batch_size"]) for r in rows] == [
      ("entropy", 1), ("entropy", 3), ("max_prob", 1), ("max_prob", 3)]
  for row in rows:
    assert ROW_KEYS <= set(row)
    assert row["network"] == "b_lenet" and row["dataset"] == "mnist" and row["split"] == "test"
    assert len(row["thresholds"]) == 1 and len(row["exit_fractions"]) == 2
    assert sum(row["exit_fractions"]) == pytest.approx(1.0)
    assert row["speedup"] > 0 and row["baseline"]["ms_per_sample"] > 0
  with open(os.path.join(trained, "thresholds.json")) as f:
    saved = json.load(f)
  assert saved["step"] == results["step"] == rows[0]["step"] == evaluate.load_exits(
      trained, "test").step
  assert saved["compute_dtype"] == results["compute_dtype"] == "float32"
  chosen = saved["criteria"]
  for row in rows:
    seg = chosen[row["criterion"]]["segment_flops"]
    expected = row["branchy"]["expected_flops_per_sample"]
    assert seg[0] <= expected <= sum(seg)  # Between everyone at exit 1 and nobody.
    assert row["ideal_speedup"] == pytest.approx(row["baseline"]["flops_per_sample"] / expected)
  assert set(chosen) == {"entropy", "max_prob"}
  assert chosen["entropy"]["rule"] == rule
  assert chosen["entropy"]["thresholds"] == rows[0]["thresholds"]
  assert os.path.getsize(os.path.join(trained, "accuracy_vs_cost.png")) > 10_000


def test_a_second_run_keeps_other_batch_sizes_and_replaces_its_own(trained):
  """Batch 1 in a one-core run and batched sizes in another end in one benchmark.json."""
  os.remove(os.path.join(trained, "benchmark.json"))
  run = lambda sizes: benchmark.run(trained, sizes, ("entropy",), repeats=1,  # noqa: E731
                                    max_samples=12, batch1_samples=4)
  with tfds.testing.mock_data(num_examples=MOCK_EXAMPLES):
    first = run([1])["rows"]
    both = run([3])["rows"]
    again = run([1])["rows"]
  assert [r["batch_size"] for r in both] == [1, 3] and both[0] == first[0]
  assert [r["batch_size"] for r in again] == [1, 3] and again[1] == both[1]
  assert again[0]["timing"]["cpu_cores"] == len(os.sched_getaffinity(0))
  modes = again[0]["timing"]["latency_modes_ms_per_sample"]  # Both batch-1 strategies.
  assert set(modes) == {"host", "cond"} and min(modes.values()) > 0
  chosen = again[0]["timing"]["latency_mode"]  # The faster on validation images.
  assert modes[chosen] == again[0]["branchy"]["ms_per_sample"]
  on_validation = again[0]["timing"]["latency_modes_validation_ms_per_sample"]
  assert set(on_validation) == {"host", "cond"} and chosen == min(on_validation,
                                                                  key=on_validation.get)
  assert again[1]["timing"]["latency_modes_ms_per_sample"] is None


def test_cli_without_cached_or_trained_model_explains(tmp_path):
  for module in ("experiments.evaluate", "experiments.benchmark"):
    proc = subprocess.run([sys.executable, "-m", module, f"--workdir={tmp_path}"], cwd=REPO,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr
    assert "holds no trained model" in proc.stderr and "experiments.train" in proc.stderr
