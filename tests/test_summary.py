"""What training leaves for people: TensorBoard curves, summary tables, progress bars."""

import io
import sys

import optax
import pytest
from tensorboard.backend.event_processing import event_accumulator

from bnet_jax import progress, summary, tables
from helpers import run, small_config


def _scalars(workdir, split):
  acc = event_accumulator.EventAccumulator(f"{summary.logdir(str(workdir))}/{split}")
  acc.Reload()
  return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def test_training_writes_per_exit_curves_that_tensorboard_reads(tmp_path):
  config = small_config(lr_schedule="cosine", warmup_epochs=0.5)
  results = run(config, tmp_path)  # 4 steps of the main network, then 4 joint steps.
  train = _scalars(tmp_path, "train")
  assert set(train) == {"loss/total", "loss/exit_1", "loss/exit_2", "accuracy/exit_1",
                        "accuracy/exit_2", "learning_rate", "images_per_second"}
  # The main phase trains the main network, whose one exit is the last: exit 2.
  assert [s for s, _ in train["loss/exit_2"]] == [4, 8]
  assert [s for s, _ in train["loss/exit_1"]] == [8]
  # Each phase's cosine schedule, read at the epoch's last step (its 4th, index 3).
  lr = optax.warmup_cosine_decay_schedule(0.0, config.learning_rate, 2, 4)
  assert train["learning_rate"] == [(4, pytest.approx(float(lr(3)))),
                                    (8, pytest.approx(float(lr(3))))]

  validation = _scalars(tmp_path, "validation")
  assert set(validation) == {"loss/exit_1", "loss/exit_2", "accuracy/exit_1", "accuracy/exit_2"}
  assert all(v > 0 for _, v in validation["loss/exit_1"] + validation["loss/exit_2"])
  # The last validation point is the trained model's validation accuracy in eval.json.
  final = [validation[f"accuracy/exit_{k}"][-1] for k in (1, 2)]
  assert [s for s, _ in final] == [8, 8]
  assert [v for _, v in final] == pytest.approx(results["validation"]["accuracy_per_exit"],
                                                abs=1e-6)


def test_accuracy_table_lists_every_split_and_exit():
  results = {"validation": {"num_examples": 5000, "accuracy_per_exit": [0.9812, 0.99]},
             "test": {"num_examples": 10000, "accuracy_per_exit": [0.97555, 0.9901]}}
  lines = tables.accuracy_table(results).splitlines()
  assert lines[0].split() == ["split", "examples", "exit", "1", "acc", "%", "exit", "2", "acc",
                              "%"]
  assert [line.split()[0] for line in lines[2:]] == ["validation", "test"]
  assert lines[3].split() == ["test", "10000", "97.56", "99.01"]


def test_format_table_aligns_numbers_right_and_rejects_ragged_rows():
  text = tables.format_table(["name", "ms"], [["a", "1.5"], ["longer", "12.25"]])
  assert text.splitlines() == ["name       ms", "------  -----", "a         1.5",
                               "longer  12.25"]
  with pytest.raises(ValueError, match="Every row needs 2 cells"):
    tables.format_table(["name", "ms"], [["a"]])


@pytest.mark.parametrize("value,expected", [("0", False), ("off", False), ("1", True)])
def test_progress_bars_follow_the_environment(monkeypatch, value, expected):
  monkeypatch.setenv("BNET_PROGRESS", value)
  assert progress.enabled() is expected
  assert progress.bar(range(3)).disable is not expected
  assert list(progress.bar(range(3))) == [0, 1, 2]


def test_progress_bars_are_off_when_output_is_not_a_terminal(monkeypatch):
  monkeypatch.delenv("BNET_PROGRESS", raising=False)
  monkeypatch.setattr(sys, "stderr", io.StringIO())  # A log file or CI, not a kernel.
  assert not progress.enabled()


def test_benchmark_table_has_a_line_per_row():
  row = {"batch_size": 1, "criterion": "entropy", "thresholds": [0.0123],
         "exit_fractions": [0.9, 0.1],
         "baseline": {"accuracy": 0.99, "ms_per_sample": 0.2},
         "branchy": {"accuracy": 0.9895, "ms_per_sample": 0.1}, "speedup": 2.0,
         "ideal_speedup": 3.5}
  lines = tables.benchmark_table([row, {**row, "batch_size": 256}]).splitlines()
  assert len(lines) == 4
  assert lines[2].split() == ["1", "entropy", "0.0123", "90.0/10.0", "99.00", "98.95", "0.2000",
                              "0.1000", "2.00x", "3.50x"]
