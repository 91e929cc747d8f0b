"""Early-exit batch inference over a split: the predictions file against the all-exits
reference, thresholds from thresholds.json, the command's errors, and 8 devices against 1.

The workdir is B-LeNet after 30 training steps on real MNIST (a subprocess reads
the data from the workdir's config, which mock data could not reach), predicted on its
1,000-row validation split. As in test_cascade.py, a sample whose score at an exit it
reached lies within BAND of that exit's threshold may change exit between programs
that round differently (docs/design.md); those are counted, and everything else must match.
"""

import json
import os
import shutil
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest

from bnet_jax import cascade, checkpoint, data, predict, train
from helpers import REPO, random_thresholds
from experiments.configs import lenet_mnist

BAND = 1e-4
SPLIT, ROWS, BATCH = "validation", 1000, 256  # Batches of 256: 3 whole, one of 232.
TIMEOUT = 300


@pytest.fixture(scope="module")
def workdir(mnist_data_dir, tmp_path_factory) -> str:
  """B-LeNet after 30 training steps, with entropy thresholds in thresholds.json, chosen midway
  across a wide gap between its exit-1 scores on the validation split."""
  w = str(tmp_path_factory.mktemp("w"))
  config = lenet_mnist.get_config("smoke")
  # Joint from the start, so exit 1 learns too: its entropies spread out within 30 steps.
  config.update(data_dir=mnist_data_dir, download=False, num_validation=ROWS, main_epochs=0,
                learning_rate=3e-3, halt_after_steps=30)
  train.train_and_evaluate(config, w)
  net, variables, images = _model_and_images(w)
  scores = np.asarray(cascade.logits_and_scores(net, "entropy", variables, jnp.asarray(images))[1])
  t = random_thresholds(scores, np.random.default_rng(0))
  with open(os.path.join(w, predict.THRESHOLDS_FILE), "w") as f:
    json.dump({"step": 30, "compute_dtype": "float32",
               "criteria": {"entropy": {"thresholds": t, "rule": "test"}}}, f)
  return w


@pytest.fixture(scope="module")
def one_device(workdir) -> tuple[dict, dict]:
  """predict_split's result on one device and the file it wrote."""
  result = predict.predict_split(workdir, SPLIT, batch_size=BATCH, repeats=1)
  with np.load(result["path"]) as f:
    return result, dict(f)


def _model_and_images(workdir: str):
  trained = checkpoint.load_trained(workdir)
  c = trained.config
  split = data.load_splits(c.dataset, c.num_validation, c.data_dir, only=(SPLIT,))[SPLIT]
  return trained.net, trained.variables, data.preprocess(c.dataset, split.images)


def _near_a_threshold(exits: np.ndarray, scores: np.ndarray, thresholds) -> np.ndarray:
  """(N,) whether a sample's score at some exit it reached is within BAND of the threshold."""
  near = np.zeros(len(exits), bool)
  for k, t in enumerate(thresholds):
    near |= (exits >= k) & (np.abs(scores[k] - t) < BAND)
  return near


def _assert_same_outside_the_band(got: dict, want: dict, scores, thresholds, what: str) -> int:
  """Exits and labels equal except within BAND of a threshold; returns how many are near."""
  near = _near_a_threshold(want["exit"], scores, thresholds)
  assert near.sum() <= 1 + 0.01 * len(near), f"{what}: {near.sum()} samples near a threshold"
  far = ~near
  np.testing.assert_array_equal(got["exit"][far], want["exit"][far], err_msg=what)
  np.testing.assert_array_equal(got["label"][far], want["label"][far], err_msg=what)
  np.testing.assert_allclose(got["score"][far], want["score"][far], atol=1e-5, err_msg=what)
  return int(near.sum())


def _run(*args: str, devices: int = 1, wait: bool = True):
  env = dict(os.environ, JAX_PLATFORMS="cpu", BNET_PROGRESS="0",
             XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
  env.pop("JAX_NUM_CPU_DEVICES", None)
  cmd = [sys.executable, "-m", "experiments.predict", *args]
  if wait:
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=TIMEOUT)
  return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True)


@pytest.mark.newest
def test_predictions_equal_the_all_exits_reference(workdir, one_device):
  result, saved = one_device
  with open(os.path.join(workdir, predict.THRESHOLDS_FILE)) as f:
    t = json.load(f)["criteria"]["entropy"]["thresholds"]
  net, variables, images = _model_and_images(workdir)
  assert result["path"] == os.path.join(workdir, f"predictions_{SPLIT}.npz")
  assert saved["label"].shape == saved["exit"].shape == saved["score"].shape == (ROWS,)
  assert saved["label"].dtype == saved["exit"].dtype == saved["true_label"].dtype == np.int32
  assert saved["score"].dtype == saved["thresholds"].dtype == np.float32
  assert int(saved["step"]) == result["step"] == 30
  assert str(saved["criterion"]) == result["criterion"] == "entropy"
  assert str(saved["compute_dtype"]) == result["compute_dtype"] == "float32"
  np.testing.assert_array_equal(saved["thresholds"], np.float32(t))
  assert result["thresholds"] == [float(np.float32(v)) for v in t]

  ref = cascade.reference(net, variables, images, t)
  scores = np.asarray(cascade.logits_and_scores(net, "entropy", variables, jnp.asarray(images))[1])
  near = _assert_same_outside_the_band(saved, ref._asdict(), scores, t, "one device")
  print(f"{near} of {ROWS} samples within {BAND} of a threshold")
  assert 0.1 < np.mean(saved["exit"] == 0) < 0.9  # Both exits used.

  labels = data.load_splits("mnist", ROWS, checkpoint.read_config(workdir).data_dir,
                            only=(SPLIT,))[SPLIT].labels
  np.testing.assert_array_equal(saved["true_label"], labels)
  assert result["num_examples"] == ROWS and result["devices"] == 1
  assert result["accuracy"] == np.mean(saved["label"] == saved["true_label"])
  np.testing.assert_allclose(result["exit_fractions"],
                             np.bincount(saved["exit"], minlength=2) / ROWS)
  assert result["last_exit_accuracy"] > 0.5  # The network has learnt something.
  assert min(result["images_per_second"].values()) > 0


def test_missing_thresholds_say_how_to_get_them(workdir, tmp_path):
  with pytest.raises(ValueError) as e:
    predict.predict_split(workdir, SPLIT, criterion="margin")
  assert str(e.value) == (
      f"No margin thresholds for {workdir}: {workdir}/thresholds.json has none for margin. "
      f"Choose them with python -m experiments.benchmark --workdir={workdir} --criteria=margin, "
      f"or pass --thresholds=T1,... (1 value(s), one per exit but the last).")
  bare = str(tmp_path / "w")
  shutil.copytree(workdir, bare, ignore=shutil.ignore_patterns("thresholds.json", "*.npz"))
  with pytest.raises(ValueError, match="thresholds.json does not exist. Choose them with"):
    predict.predict_split(bare, SPLIT)


def test_command_line_errors_are_one_line(workdir, tmp_path):
  cases = {  # Arguments -> what the message says.
      ("--criterion=margin",): "No margin thresholds",
      ("--thresholds=0.1,0.2",): "needs 1 threshold(s)",
      ("--thresholds=low",): "--thresholds must be numbers",
      ("--split=dev",): "Unknown split 'dev'",
      ("--batch_size=0",): "--batch_size must be at least 1",
  }
  procs = {args: _run(f"--workdir={workdir}", *args, wait=False) for args in cases}
  procs[()] = _run(f"--workdir={tmp_path}", wait=False)
  cases[()] = "holds no trained model"
  for args, proc in procs.items():
    out, err = proc.communicate(timeout=TIMEOUT)
    assert proc.returncode == 2, (args, err)
    assert err.startswith("error: ") and err.count("\n") == 1, (args, err)
    assert cases[args] in err and "Traceback" not in err + out, (args, err)


def test_eight_devices_predict_like_one(workdir, one_device, tmp_path):
  """The command on 8 CPU devices (the split sharded, every batch split 8 ways) writes
  the same predictions as predict_split on one device, outside the tie band."""
  _, one = one_device
  copy = str(tmp_path / "w")
  shutil.copytree(workdir, copy, ignore=shutil.ignore_patterns("*.npz"))
  proc = _run(f"--workdir={copy}", f"--split={SPLIT}", f"--batch_size={BATCH}", "--repeats=1",
              devices=8)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert proc.stdout.startswith("8 x cpu:") and "all exits img/s" in proc.stdout
  assert f"wrote {copy}/predictions_{SPLIT}.npz" in proc.stdout
  with np.load(os.path.join(copy, f"predictions_{SPLIT}.npz")) as f:
    eight = dict(f)
  net, variables, images = _model_and_images(workdir)
  scores = np.asarray(cascade.logits_and_scores(net, "entropy", variables, jnp.asarray(images))[1])
  near = _assert_same_outside_the_band(eight, one, scores, one["thresholds"], "8 devices")
  print(f"{near} of {ROWS} samples within {BAND} of a threshold")
  for key in ("true_label", "thresholds", "step", "criterion", "compute_dtype"):
    np.testing.assert_array_equal(eight[key], one[key])
