"""The command-line programs on bad input, and the derived files' provenance.

Every bad input gives one line on stderr starting "error:", exit status 2, no
traceback, and leaves the workdir's files as they were. The workdir is B-LeNet after
30 training steps on real MNIST (as in test_predict.py), benchmarked once in-process;
the programs run as subprocesses in parallel (each start of Python + JAX costs seconds).
"""

import concurrent.futures
import json
import os
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest

from bnet_jax import benchmark, cost, evaluate, predict, screening, train
from helpers import REPO
from experiments.configs import lenet_mnist

STEPS, ROWS, BATCH = 30, 1000, 256
TIMEOUT = 300


@pytest.fixture(scope="module")
def workdir(mnist_data_dir, tmp_path_factory) -> str:
  """B-LeNet after 30 joint training steps, its exit caches, thresholds.json and
  benchmark.json (entropy and max_prob at batch 256, one timed pass)."""
  w = str(tmp_path_factory.mktemp("w"))
  config = lenet_mnist.get_config("smoke")
  config.update(data_dir=mnist_data_dir, download=False, num_validation=ROWS, main_epochs=0,
                learning_rate=3e-3, halt_after_steps=STEPS)
  train.train_and_evaluate(config, w)
  benchmark.run(w, [BATCH], ("entropy", "max_prob"), repeats=1, max_samples=BATCH)
  return w


def _snapshot(root: str) -> dict[str, float]:
  """Every file under `root` by relative path -> modification time (ns)."""
  return {os.path.relpath(os.path.join(d, f), root): os.stat(os.path.join(d, f)).st_mtime_ns
          for d, _, files in os.walk(root) for f in files}


def _run(module: str, *args: str) -> subprocess.CompletedProcess:
  env = dict(os.environ, JAX_PLATFORMS="cpu", BNET_PROGRESS="0", BNET_TCMALLOC="0")
  return subprocess.run([sys.executable, "-m", f"experiments.{module}", *args], cwd=REPO,
                        env=env, capture_output=True, text=True, timeout=TIMEOUT)


def _run_all(cases: dict[tuple[str, ...], str]) -> dict[tuple[str, ...], subprocess.CompletedProcess]:
  """Runs each (module, *args) key at once, 4 at a time."""
  with concurrent.futures.ThreadPoolExecutor(4) as pool:
    futures = {key: pool.submit(_run, *key) for key in cases}
    return {key: f.result() for key, f in futures.items()}


def _assert_one_line_errors(cases: dict, procs: dict, logs: bool = False) -> None:
  """Exit status 2, one stderr line "error: ..." with the expected text, no traceback.
  With `logs` (work started before the error), absl log lines may precede it."""
  for key, proc in procs.items():
    assert proc.returncode == 2, (key, proc.stderr[-2000:])
    lines = proc.stderr.splitlines()
    if logs:
      lines = [line for line in lines if not re.match(r"[IWE]\d{4} ", line)]
    assert len(lines) == 1 and lines[0].startswith("error: "), (key, proc.stderr)
    assert "Traceback" not in proc.stderr + proc.stdout, key
    assert cases[key] in proc.stderr, (key, proc.stderr)


def test_bad_inputs_are_one_line_errors_and_touch_nothing(workdir, tmp_path):
  missing, a_file = str(tmp_path / "missing"), str(tmp_path / "a_file")
  open(a_file, "w").close()
  w = f"--workdir={workdir}"
  smoke = f"{REPO}/experiments/configs/lenet_mnist.py:smoke"
  cases = {  # (program, *arguments) -> what the message says.
      ("evaluate", f"--workdir={missing}"): "does not exist",
      ("evaluate", f"--workdir={a_file}"): "is a file, not a directory",
      ("evaluate", w, "--batch_size=0"): "--batch_size must be at least 1; got 0",
      ("evaluate", w, "--batch_size=-5"): "--batch_size must be at least 1; got -5",
      ("benchmark", f"--workdir={missing}"): "does not exist",
      ("benchmark", w, "--batch_sizes=0"): "--batch_sizes takes positive integers",
      ("benchmark", w, "--batch_sizes=4,-1"): "got '4,-1'",
      ("benchmark", w, "--batch_sizes="): "got ''",
      ("benchmark", w, "--batch_sizes=4,x"): "got '4,x'",
      ("benchmark", w, "--repeats=0"): "--repeats must be at least 1; got 0",
      ("benchmark", w, "--repeats=two"): "flag --repeats=two",
      ("benchmark", w, "--model_option=conv_impl"): "--model_option takes KEY=VALUE",
      ("benchmark", w, "--model_option=no_such_option=1"): "unexpected keyword argument",
      ("benchmark", w, "--model_option=conv_impl=bogus"): "Unknown conv impl 'bogus'",
      ("benchmark", w, "--criteria=entropy,bogus"): "unknown exit criterion 'bogus'",
      ("benchmark", w, "--epsilon=1.5"): "--epsilon must lie in [0, 1)",
      ("benchmark", w, "--rule=risk", "--delta=0"): "--delta must lie strictly between 0 and 1",
      ("benchmark", w, "--rule=risk", "--epsilon=-0.1"): "--epsilon must lie strictly between",
      ("benchmark", w, "--rule=nope"): "flag --rule=nope",
      ("predict", f"--workdir={a_file}"): "is a file, not a directory",
      ("predict", w, "--criterion=bogus"): "flag --criterion=bogus",
      ("predict", w, "--repeats=0"): "--repeats must be at least 1",
      ("predict", w, "--batch_size=-1"): "--batch_size must be at least 1",
      ("predict", w, "--thresholds=low"): "--thresholds must be numbers",
      ("prepare_data", "--dataset=mnist", f"--from_dir={missing}"): "is not a directory",
      ("prepare_data", "--dataset=cifar10", f"--from_dir={tmp_path}"): "cannot be prepared",
      ("benchmark_buckets", f"--workdir={missing}"): "does not exist",
      ("benchmark_buckets", w, "--thresholds=low"): "--thresholds must be numbers",
      ("benchmark_buckets", w, "--thresholds=0.1,0.2"): "needs 1 threshold(s)",
      ("benchmark_stages", "--batch_sizes=0"): "--batch_sizes takes positive integers",
      ("benchmark_stages", "--options=depth"): "--options takes KEY=VALUE",
      ("benchmark_parallel", "--repeats=0"): "--repeats must be at least 1",
      ("benchmark_parallel", f"--json={missing}/x.json"): "cannot write there",
      ("train", f"--config={smoke[:-6]}:bogus", f"--workdir={missing}"): "Unknown variant 'bogus'",
      ("train", f"--config={REPO}/experiments/configs/nope.py", f"--workdir={missing}"):
          "No such file or directory",
      ("train", f"--config={smoke}", "--config.nofield=1", f"--workdir={missing}"):
          "unknown config field 'nofield'",
      ("train", f"--config={smoke}", f"--workdir={a_file}"): "is a file, not a directory",
      ("train", f"--config={smoke}", "--config.keep_checkpoints=0", f"--workdir={missing}"):
          "keep_checkpoints must be >= 1",
      ("train", f"--config={smoke}", "--config.batch_size=0", f"--workdir={missing}"):
          "batch_size must be positive",
  }
  before = _snapshot(workdir)
  procs = _run_all(cases)
  _assert_one_line_errors(cases, procs)
  assert _snapshot(workdir) == before
  assert not os.path.exists(missing)  # No program created a workdir it then refused.


def test_asking_for_onednn_where_it_cannot_run_is_one_line(monkeypatch):
  monkeypatch.setenv("BNET_ONEDNN", "0")  # Read by the subprocess (`_run` copies os.environ).
  cases = {("benchmark_train", "--model=b_resnet", "--options=depth=8",
            "--variants=conv_impl=onednn", "--steps=1", "--repeats=1"):
           "--variants: layer implementation 'onednn' cannot run here: turned off by "
           "BNET_ONEDNN=0. Use 'auto' or 'xla'."}
  _assert_one_line_errors(cases, _run_all(cases), logs=True)


def test_unwritable_results_name_the_path(workdir, tmp_path):
  """A read-only workdir is refused before any work (where the mode binds: not for
  root); a result file that cannot be written names its path."""
  read_only, blocked = str(tmp_path / "read_only"), str(tmp_path / "blocked")
  for copy in (read_only, blocked):
    shutil.copytree(workdir, copy)
  os.makedirs(predict.predictions_path(blocked, "validation"))  # A folder in the way.
  os.chmod(read_only, 0o555)
  cases = {("predict", f"--workdir={blocked}", "--split=validation", "--repeats=1",
            f"--batch_size={BATCH}"): f"cannot write or read {blocked}/predictions_validation.npz"}
  if not os.access(read_only, os.W_OK):
    cases[("evaluate", f"--workdir={read_only}")] = "is not writable"
  before = {w: _snapshot(w) for w in (read_only, blocked)}
  try:
    procs = _run_all(cases)
  finally:
    os.chmod(read_only, 0o755)
  _assert_one_line_errors(cases, procs, logs=True)
  assert {w: _snapshot(w) for w in (read_only, blocked)} == before


def test_verbose_shows_the_traceback(workdir):
  proc = _run("benchmark", f"--workdir={workdir}", "--criteria=bogus", "--verbose")
  assert proc.returncode == 2
  assert "Traceback" in proc.stderr
  assert proc.stderr.splitlines()[-1].startswith("error: --criteria: unknown exit criterion")


def test_benchmark_figures_are_the_cached_exits_at_the_saved_thresholds(workdir):
  """Accuracy and exit fractions of every benchmark row, recomputed from the cached
  test outputs at thresholds.json's thresholds (the cascade may only differ on samples
  tied with a threshold: at most 2 of the 10,000)."""
  with open(os.path.join(workdir, "thresholds.json")) as f:
    saved = json.load(f)
  with open(os.path.join(workdir, "benchmark.json")) as f:
    results = json.load(f)
  test = evaluate.load_exits(workdir, "test")
  n = len(test.labels)
  assert saved["step"] == results["step"] == test.step == STEPS
  assert saved["compute_dtype"] == results["compute_dtype"] == test.compute_dtype == "float32"
  assert {r["criterion"] for r in results["rows"]} == set(saved["criteria"]) == {
      "entropy", "max_prob"}
  for row in results["rows"]:
    choice = saved["criteria"][row["criterion"]]
    assert row["step"] == STEPS and row["thresholds"] == choice["thresholds"]
    got = screening.apply_selection(
        test.scores(row["criterion"]), test.correct(), np.asarray(choice["thresholds"]),
        cost.cumulative(choice["segment_flops"]), criterion=row["criterion"])
    assert float(got["accuracy"]) == pytest.approx(choice["test"]["accuracy"], abs=1e-12)
    np.testing.assert_allclose(got["exit_fractions"], choice["test"]["exit_fractions"])
    assert row["branchy"]["accuracy"] == pytest.approx(float(got["accuracy"]), abs=2 / n)
    np.testing.assert_allclose(row["exit_fractions"], got["exit_fractions"], atol=2 / n)
    assert row["baseline"]["accuracy"] == pytest.approx(
        float(np.mean(test.correct()[-1])), abs=2 / n)


def _restamp(path: str, step: int) -> None:
  """Rewrites an exit cache as if made at checkpoint `step`."""
  with np.load(path) as f:
    contents = dict(f)
  np.savez(path, **{**contents, "step": np.int64(step)})


def test_stale_files_are_refused_or_rebuilt(workdir, tmp_path, capsys):
  """An exit cache from another step: load_exits refuses it, benchmark.run rebuilds it
  and drops thresholds and rows of another step from both files; predict refuses
  thresholds of another step."""
  w = str(tmp_path / "w")
  shutil.copytree(workdir, w)
  _restamp(evaluate.exits_path(w, "test"), STEPS - 10)
  with pytest.raises(evaluate.StaleExitsError) as e:
    evaluate.load_exits(w, "test")
  assert str(e.value) == (f"exits_test.npz is from step {STEPS - 10} but the newest checkpoint "
                          f"is step {STEPS}: rerun python -m experiments.evaluate --workdir={w}")
  with pytest.raises(evaluate.StaleExitsError, match="computed in float32, not bfloat16"):
    evaluate.load_exits(w, "validation", "bfloat16")

  for name in ("thresholds.json", "benchmark.json"):  # As if written at another step.
    path = os.path.join(w, name)
    with open(path) as f:
      saved = json.load(f)
    with open(path, "w") as f:
      json.dump({**saved, "step": STEPS - 10}, f)
  with pytest.raises(ValueError, match=f"chosen for checkpoint step {STEPS - 10}, but the "
                                       f"checkpoint is step {STEPS}: rerun the benchmark"):
    predict.saved_thresholds(w, "entropy", 2, STEPS)

  results = benchmark.run(w, [BATCH], ("entropy",), repeats=1, max_samples=BATCH)
  out = capsys.readouterr().out
  assert out.count("rebuilding the exit cache") == 1
  assert f"exits_test.npz is from step {STEPS - 10}" in out
  assert evaluate.load_exits(w, "test").step == STEPS
  with open(os.path.join(w, "thresholds.json")) as f:
    saved = json.load(f)
  assert saved["step"] == results["step"] == STEPS and set(saved["criteria"]) == {"entropy"}
  assert [r["criterion"] for r in results["rows"]] == ["entropy"]
  assert predict.saved_thresholds(w, "entropy", 2, STEPS) == saved["criteria"]["entropy"][
      "thresholds"]

  results = benchmark.run(w, [BATCH // 2], ("max_prob",), repeats=1, max_samples=BATCH)
  assert "rebuilding" not in capsys.readouterr().out  # Same step: cache and entries kept.
  with open(os.path.join(w, "thresholds.json")) as f:
    assert set(json.load(f)["criteria"]) == {"entropy", "max_prob"}
  assert [(r["criterion"], r["batch_size"]) for r in results["rows"]] == [
      ("entropy", BATCH), ("max_prob", BATCH // 2)]
