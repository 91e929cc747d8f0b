"""Workdir integrity: bad run-control values, config changes on resume, corrupt
checkpoints, exact resume, the recorded data dir and offline downloads."""

import glob
import json
import os
import shutil
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
import tensorflow_datasets as tfds

from bnet_jax import benchmark, checkpoint, data, evaluate, train
from helpers import MOCK_EXAMPLES, REPO, run, small_config, snapshot
from experiments.configs import common


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  """A finished 2-epoch mock run (1 main + 1 joint epoch of 4 steps), checkpoints 4 and 8."""
  workdir = tmp_path_factory.mktemp("trained") / "w"
  run(small_config(), workdir)
  return workdir


@pytest.fixture
def workdir(trained, tmp_path):
  """A private copy of the trained workdir."""
  copy = tmp_path / "w"
  shutil.copytree(trained, copy)
  return copy


def _training_fields(fields: dict) -> dict:
  flat = train.flatten_fields(fields)
  return {k: v for k, v in flat.items() if train.is_training_field(k)}


def test_field_kinds_partition_the_common_fields():
  fields = common.base("b_resnet", {"depth": 110, "placement": "code", "conv_impl": "auto"},
                       "cifar10", 3).to_dict()
  top = [f for f in train.TRAINING_FIELDS + train.RUN_CONTROL_FIELDS if "." not in f]
  # Fields that configs may lack are read with their defaults (train.FIELD_DEFAULTS).
  assert sorted(top) == sorted(set(fields) | set(train.FIELD_DEFAULTS))
  assert len(top) == len(set(top))
  assert all(train.is_training_field(f) for f in train.FIELD_DEFAULTS)
  assert not train.is_training_field("model_options.conv_impl")
  assert not train.is_training_field("model_options.conv_kernel_grad")
  assert train.is_training_field("model_options.depth")
  assert train.is_training_field("model_options.placement")
  assert not train.is_training_field("compute_dtype")
  for name in ("seed", "learning_rate", "main_epochs", "num_validation", "loss_weights"):
    assert train.is_training_field(name)
  for name in ("keep_checkpoints", "halt_after_steps", "data_dir", "allow_config_change"):
    assert not train.is_training_field(name)


@pytest.mark.parametrize("field,value", [("keep_checkpoints", 0),
                                         ("checkpoint_every_epochs", 0),
                                         ("eval_batch_size", 0), ("num_validation", -1)])
def test_values_that_lose_data_are_refused_before_writing(tmp_path, field, value):
  with pytest.raises(ValueError, match=f"{field} must be >= .*--config.{field}="):
    run(small_config(**{field: value}), tmp_path / "w")
  assert not (tmp_path / "w").exists()


@pytest.mark.parametrize("field,value,shown", [
    ("seed", 1, "seed: 0 -> 1"), ("learning_rate", 2e-3, "learning_rate: 0.001 -> 0.002")])
def test_changed_training_field_is_refused_on_resume(workdir, field, value, shown):
  before = snapshot(workdir)
  with pytest.raises(train.ConfigChangeError, match="--config.allow_config_change=True") as e:
    run(small_config(**{field: value}), workdir)
  assert shown in str(e.value)
  assert snapshot(workdir) == before


def test_override_trains_on_and_records_the_change(workdir):
  run(small_config(learning_rate=2e-3, joint_epochs=2, allow_config_change=True), workdir)
  saved = json.loads((workdir / "config.json").read_text())
  assert saved["learning_rate"] == 2e-3 and saved["joint_epochs"] == 2
  (entry,) = checkpoint.config_history(str(workdir))
  assert entry["step"] == 8 and entry["override"]
  assert entry["changes"]["learning_rate"] == [1e-3, 2e-3]
  assert entry["changes"]["joint_epochs"] == [1, 2]
  assert checkpoint.latest_step(str(workdir)) == 12


def test_run_control_change_keeps_the_training_fields(workdir):
  before = json.loads((workdir / "config.json").read_text())
  # loss_weights (1, 1) equals (1.0, 1.0), so it is no change, and config.json keeps
  # the checkpoint's values as written: [1.0, 1.0].
  run(small_config(eval_batch_size=256, keep_checkpoints=1, compute_dtype="bfloat16",
                   model_options={"conv1_impl": "xla", "conv_impl": "xla"},
                   loss_weights=(1, 1)), workdir)
  after = json.loads((workdir / "config.json").read_text())
  assert json.dumps(_training_fields(after)) == json.dumps(_training_fields(before))
  assert (after["eval_batch_size"], after["keep_checkpoints"]) == (256, 1)
  assert after["model_options"] == {"conv1_impl": "xla", "conv_impl": "xla"}
  (entry,) = checkpoint.config_history(str(workdir))
  assert not entry["override"] and entry["step"] == 8
  assert entry["changes"] == {"compute_dtype": ["auto", "bfloat16"],
                              "eval_batch_size": [128, 256], "keep_checkpoints": [3, 1],
                              "model_options.conv1_impl": ["auto", "xla"],
                              "model_options.conv_impl": ["auto", "xla"]}


def test_more_epochs_train_further_and_fewer_are_refused(workdir, capsys):
  before = snapshot(workdir)
  with pytest.raises(train.ConfigChangeError, match="fewer than the checkpoint's step 8"):
    run(small_config(main_epochs=0), workdir)
  with pytest.raises(train.ConfigChangeError, match="past the main phase"):
    run(small_config(main_epochs=2), workdir)
  assert snapshot(workdir) == before
  capsys.readouterr()
  run(small_config(joint_epochs=2), workdir)
  out = capsys.readouterr().out
  assert ("joint_epochs 1 -> 2: training continues from step 8 to step 12; the constant "
          "learning rate just continues.") in out
  assert "Phase joint (b_lenet): steps 8..12" in out
  assert checkpoint.latest_step(str(workdir)) == 12
  assert json.loads((workdir / "config.json").read_text())["joint_epochs"] == 2
  (entry,) = checkpoint.config_history(str(workdir))
  assert entry["changes"] == {"joint_epochs": [1, 2]} and not entry["override"]


def test_epoch_change_line_says_the_cosine_rate_jumps():
  old = train.config_fields(small_config(lr_schedule="cosine"))
  config = small_config(lr_schedule="cosine", joint_epochs=3)
  line = train.check_epoch_change(old, config, 6, 4)
  # Step 6 is 2 steps into the joint phase: cos(pi * 2/4) -> cos(pi * 2/12).
  assert ("joint_epochs 1 -> 3: training continues from step 6 to step 16; the cosine "
          "schedule of the joint phase now spans 12 steps instead of 4, so the learning "
          "rate jumps from 0.0005 to 0.000933.") == line


def _written_before_warmup_epochs(fields: dict, warmup_steps: int) -> dict:
  """config.json `fields` as written before warmup_epochs existed: warmup_steps instead."""
  return {**{k: v for k, v in fields.items() if k != "warmup_epochs"},
          "warmup_steps": warmup_steps}


def test_config_json_with_warmup_steps_resumes_unless_the_steps_differ(tmp_path):
  cosine = {"lr_schedule": "cosine", "warmup_epochs": 0.5}  # 2 of the 4 steps per epoch.
  assert run(small_config(**cosine, halt_after_steps=2), tmp_path) == {}
  path = tmp_path / "config.json"
  path.write_text(json.dumps(_written_before_warmup_epochs(json.loads(path.read_text()), 2)))
  before = snapshot(tmp_path)
  with pytest.raises(train.ConfigChangeError) as e:
    run(small_config(lr_schedule="cosine", warmup_epochs=0.75), tmp_path)  # 3 steps.
  assert "training-defining fields (warmup_epochs: 0.5 -> 0.75). Restore them" in str(e.value)
  assert "\n" not in str(e.value) and snapshot(tmp_path) == before
  assert run(small_config(**cosine), tmp_path)["test"]["num_examples"] > 0
  assert checkpoint.latest_step(str(tmp_path)) == 8
  saved = json.loads(path.read_text())
  assert saved["warmup_epochs"] == 0.5 and "warmup_steps" not in saved
  (entry,) = checkpoint.config_history(str(tmp_path))
  assert entry["changes"] == {"halt_after_steps": [2, -1]}  # No warmup change.
  assert [r["warmup_steps"] for r in checkpoint.runs(str(tmp_path))] == [2, 2]


def test_an_old_layer_implementation_name_is_no_change():
  """Options are compared as nets.canonical_options spells them: "xla_pad8_dotgrad" is
  today's "xla_channels_pad8" with the "dot" kernel gradient."""
  old = train.config_fields(small_config(
      model_options={"conv1_impl": "auto", "conv_impl": "xla_pad8_dotgrad"}))
  renamed = {"conv1_impl": "auto", "conv_impl": "xla_channels_pad8", "conv_kernel_grad": "dot"}
  assert train.check_config_change(old, small_config(model_options=renamed), 8) == {}
  other = {**renamed, "conv_kernel_grad": "autodiff"}  # Another gradient: run control.
  assert train.check_config_change(old, small_config(model_options=other), 8) == {
      "model_options.conv_kernel_grad": ("dot", "autodiff")}


def _truncate_largest(step_dir):
  path = max(glob.glob(f"{step_dir}/**/d/*", recursive=True), key=os.path.getsize)
  with open(path, "r+b") as f:
    f.truncate(1000)
  return path


def test_corrupt_newest_checkpoint_falls_back_and_is_kept(workdir, capsys):
  truncated = _truncate_largest(workdir / "checkpoints" / "8")
  assert checkpoint.load_trained(str(workdir)).step == 4
  assert checkpoint.latest_step(str(workdir)) == 8  # Readers leave the workdir as it was.
  capsys.readouterr()
  results = run(small_config(), workdir)
  out = capsys.readouterr().out
  assert "Checkpoint 8 in" in out and "is unreadable" in out and "corrupt-8" in out
  assert f"Resumed from {workdir} at step 4." in out
  assert results["test"]["num_examples"] > 0
  kept = truncated.replace(os.sep + "8" + os.sep, os.sep + "corrupt-8" + os.sep)
  assert os.path.getsize(kept) == 1000
  assert checkpoint.load_trained(str(workdir)).step == 8  # The new, intact step 8.


def test_derived_files_follow_the_checkpoint_that_reads_back(workdir, capsys, caplog):
  """With the newest checkpoint unreadable, exit caches and benchmark describe the older
  one whose weights are used."""
  w = str(workdir)
  with tfds.testing.mock_data(num_examples=MOCK_EXAMPLES):
    assert {c.step for c in evaluate.cache_exits(w).values()} == {8}
    _truncate_largest(workdir / "checkpoints" / "8")
    with pytest.raises(evaluate.StaleExitsError,
                       match="is from step 8 but the checkpoint in use is step 4: rerun"):
      evaluate.load_exits(w, "test", step=4)
    results = benchmark.run(w, [16], ("entropy",), repeats=1, max_samples=16)
  assert results["step"] == results["rows"][0]["step"] == 4
  assert evaluate.load_exits(w, "test", step=4).step == 4  # Rebuilt by the benchmark.
  assert "rebuilding the exit cache (exits_validation.npz is from step 8 but the checkpoint " \
         "in use is step 4)" in capsys.readouterr().out
  warnings = [r.getMessage() for r in caplog.records if "is unreadable" in r.getMessage()]
  assert warnings and all(m.startswith(f"Checkpoint 8 in {w} is unreadable (") for m in warnings)
  assert not any("TensorStore" in m for m in warnings)


def test_no_readable_checkpoint_is_a_one_line_error(workdir):
  for step in (4, 8):
    _truncate_largest(workdir / "checkpoints" / str(step))
  with pytest.raises(checkpoint.CheckpointUnreadableError,
                     match=r"No checkpoint of .* reads back \(step\(s\) 8, 4: see the warnings"):
    checkpoint.load_trained(str(workdir))
  with pytest.raises(checkpoint.CheckpointUnreadableError, match=r"step\(s\) 4:"):
    checkpoint.load_trained(str(workdir), step=4)
  with pytest.raises(FileNotFoundError, match="has no checkpoint of step 5; it keeps steps 8, 4"):
    checkpoint.load_trained(str(workdir), step=5)


def test_a_failed_restore_prints_one_line_and_no_traceback(workdir):
  """Orbax's reads still in flight when a restore fails report late (asyncio's "never
  retrieved", "Event loop is closed"); only the warning line remains."""
  _truncate_largest(workdir / "checkpoints" / "8")
  code = ("import gc, time; from bnet_jax import checkpoint; "
          f"print(checkpoint.load_trained({str(workdir)!r}).step); time.sleep(1); gc.collect()")
  proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                        env=dict(os.environ, JAX_PLATFORMS="cpu"), timeout=120)
  assert proc.returncode == 0 and proc.stdout.split() == ["4"], proc.stderr[-3000:]
  lines = [line for line in proc.stderr.splitlines() if "Variant folder" not in line]
  assert len(lines) == 1 and "Checkpoint 8 in" in lines[0] and "is unreadable" in lines[0], lines


def test_resume_starts_at_the_checkpoint_with_its_optimizer_state(tmp_path, monkeypatch, capsys):
  saved, seen = {}, []
  save = checkpoint.save

  def recording_save(mngr, step, state, meta):
    saved[step] = jax.device_get(state)
    save(mngr, step, state, meta)

  monkeypatch.setattr(checkpoint, "save", recording_save)
  assert run(small_config(halt_after_steps=3), tmp_path) == {}
  make_train_step = train.make_train_step

  def counting(*args, **kwargs):
    step_fn = make_train_step(*args, **kwargs)

    def counted(state, batch, rng):
      seen.append(jax.device_get(state))
      return step_fn(state, batch, rng)
    return counted

  monkeypatch.setattr(train, "make_train_step", counting)
  capsys.readouterr()
  run(small_config(), tmp_path)
  assert f"Resumed from {tmp_path} at step 3." in capsys.readouterr().out
  assert len(seen) == 5  # Steps 3..7, not 0..7.
  first = seen[0]
  assert int(first.step) == 3
  jax.tree.map(np.testing.assert_array_equal, first.opt_state, saved[3].opt_state)
  jax.tree.map(np.testing.assert_array_equal, first.params, saved[3].params)


def test_cli_refuses_a_changed_seed_with_exit_code_2(workdir):
  before = snapshot(workdir)
  done = subprocess.run(
      [sys.executable, "-m", "experiments.train",
       f"--config={REPO}/experiments/configs/lenet_mnist.py:smoke", f"--workdir={workdir}",
       "--config.seed=1", "--config.num_validation=256"],
      cwd=REPO, capture_output=True, text=True, timeout=300,
      env={**os.environ, "BNET_TCMALLOC": "0"})
  assert done.returncode == 2
  assert "seed: 0 -> 1" in done.stderr and "--config.allow_config_change=True" in done.stderr
  assert snapshot(workdir) == before


def test_runs_json_records_the_data_dir_and_readers_use_it(trained, tmp_path, monkeypatch):
  (entry,) = checkpoint.runs(str(trained))
  assert entry["data_dir"] == data.resolve_data_dir("/nonexistent-under-mock")
  assert (entry["steps_per_epoch"], entry["warmup_steps"]) == (4, 0)
  workdir, data_dir = tmp_path / "w", tmp_path / "tfds"
  data_dir.mkdir()
  shutil.copytree(trained, workdir)
  config = json.loads((workdir / "config.json").read_text())
  (workdir / "config.json").write_text(json.dumps({**config, "data_dir": ""}))
  (workdir / "runs.json").write_text(json.dumps({"runs": [{**entry, "data_dir": str(data_dir)}]}))
  monkeypatch.delenv("TFDS_DATA_DIR", raising=False)
  assert checkpoint.read_config(str(workdir)).data_dir == str(data_dir)
  monkeypatch.setenv("TFDS_DATA_DIR", str(tmp_path))
  assert checkpoint.read_config(str(workdir)).data_dir == ""


def test_the_checkouts_data_dir_is_found_without_the_variable(tmp_path, monkeypatch):
  monkeypatch.delenv("TFDS_DATA_DIR", raising=False)
  monkeypatch.setattr(data, "REPO_DATA_DIR", str(tmp_path))
  assert data.resolve_data_dir() == str(tmp_path)
  monkeypatch.setattr(data, "REPO_DATA_DIR", str(tmp_path / "absent"))
  assert data.resolve_data_dir() == os.path.expanduser("~/tensorflow_datasets")
  monkeypatch.undo()
  assert data.REPO_DATA_DIR == str(REPO / ".tfds")  # Where scripts/setup.sh builds it.


def test_offline_download_fails_at_once_with_the_prepare_command(tmp_path, monkeypatch):
  hosts = []
  monkeypatch.setattr(data, "reachable", lambda host: hosts.append(host) or False)
  start = time.perf_counter()
  with pytest.raises(data.DataNotFoundError, match="cannot be reached.*experiments.prepare_data"):
    data.load("mnist", "train", str(tmp_path / "empty"), download=True)
  assert time.perf_counter() - start < 10
  assert hosts == ["storage.googleapis.com"]


def test_reachable_is_false_for_a_closed_port():
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]  # Bound, not listening: connections are refused.
    assert not data.reachable("127.0.0.1", port, timeout=0.5)


def test_only_process_0_writes_the_history(tmp_path, monkeypatch):
  monkeypatch.setattr(jax, "process_index", lambda: 1)
  checkpoint.record_config_change(str(tmp_path), 4, {"eval_batch_size": (1, 2)}, override=False)
  assert not (tmp_path / checkpoint.CONFIG_HISTORY_FILE).exists()
