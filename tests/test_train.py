"""Training end to end on mock TFDS data: results, resume, phases and bad input."""

import json
import subprocess
import sys

import jax
import numpy as np
import pytest

from bnet_jax import checkpoint, data, nets, runtime, train
from bnet_jax.nets import registry
from experiments.configs import alexnet_cifar10, lenet_fashion_mnist, lenet_mnist, resnet110_cifar10
from helpers import MOCK_EXAMPLES, REPO, run, small_config, snapshot

def final_params(config, workdir):
  net = nets.get(config.model, **config.model_options)
  variables = nets.init(net, jax.random.key(0))
  with checkpoint.manager(str(workdir), create=False) as mngr:
    step = mngr.latest_step()
    phases = train.make_phases(config, net, 4)
    producer = phases[-1]
    target = train.initial_state(producer, train.make_optimizer(config, producer.num_steps),
                                variables, step)
    return step, checkpoint.restore(mngr, step, target).params


@pytest.mark.newest
def test_end_to_end_writes_eval_json_and_checkpoints(tmp_path):
  results = run(small_config(), tmp_path)
  with open(tmp_path / "eval.json") as f:
    saved = json.load(f)
  assert saved == results
  for split in ("validation", "test"):
    assert saved[split]["num_examples"] == MOCK_EXAMPLES
    acc = saved[split]["accuracy_per_exit"]
    assert len(acc) == 2 and all(0.0 <= a <= 1.0 for a in acc)
  assert checkpoint.latest_step(str(tmp_path)) == 8  # 1 main + 1 joint epoch of 4 steps.
  assert json.loads((tmp_path / "config.json").read_text())["model"] == "b_lenet"


def test_main_phase_trains_only_the_main_network():
  config = small_config(beta1=0.9, learning_rate=3e-3)
  net = nets.get("b_lenet")
  phase = train.make_phases(config, net, 4)[0]
  variables = nets.init(net, jax.random.key(0))
  assert phase.name == "main"
  assert list(phase.trainable(variables["params"])) == ["trunk_0", "trunk_1", "head_1"]
  tx = train.make_optimizer(config, phase.num_steps)
  state = train.initial_state(phase, tx, variables, 0)
  head0 = np.asarray(variables["params"]["head_0"]["Dense_0"]["kernel"])
  rng = np.random.default_rng(0)
  batch = {"image": rng.random((32, 28, 28, 1), np.float32),
           "label": rng.integers(0, 10, 32).astype(np.int32)}
  step = train.make_train_step(phase, tx)
  losses = []
  for _ in range(30):
    state, metrics = step(state, batch, jax.random.key(0))
    losses.append(float(metrics["loss"]))
  assert losses[-1] < 0.5 * losses[0]  # It learns the fixed batch...
  np.testing.assert_array_equal(state.params["head_0"]["Dense_0"]["kernel"], head0)  # ...alone.
  assert int(state.step) == 30


# Inside the main phase, at its end, inside joint.
@pytest.mark.parametrize("halt", [3, 4, pytest.param(6, marks=pytest.mark.newest)])
def test_resume_is_exact(tmp_path, halt):
  config = small_config(augment="shift")
  run(config, tmp_path / "straight")
  assert run(small_config(augment="shift", halt_after_steps=halt), tmp_path / "resumed") == {}
  assert checkpoint.latest_step(str(tmp_path / "resumed")) == halt
  run(config, tmp_path / "resumed")
  step_a, params_a = final_params(config, tmp_path / "straight")
  step_b, params_b = final_params(config, tmp_path / "resumed")
  assert step_a == step_b == 8
  jax.tree.map(np.testing.assert_array_equal, params_a, params_b)


@pytest.mark.newest
def test_other_models_checkpoint_is_refused_and_untouched(tmp_path):
  run(small_config(), tmp_path)
  before = snapshot(tmp_path)
  with pytest.raises(checkpoint.CheckpointMismatchError, match="model 'b_lenet'.*'lenet'"):
    run(small_config(model="lenet", loss_weights=(1.0,)), tmp_path)
  with pytest.raises(checkpoint.CheckpointMismatchError, match="dataset 'mnist'"):
    run(small_config(dataset="fashion_mnist"), tmp_path)
  assert snapshot(tmp_path) == before


@pytest.mark.parametrize("overrides,match", [
    ({"model": "alexnet9"}, "Unknown model 'alexnet9'"),
    ({"dataset": "imagenet"}, "Unknown dataset 'imagenet'"),
    ({"loss_weights": (1.0, 1.0, 1.0)}, "loss_weights has 3 entries but b_lenet has 2"),
    ({"batch_size": 0}, "batch_size must be positive"),
    ({"lr_schedule": "step"}, "lr_schedule must be"),
    ({"warmup_epochs": -1.0}, "warmup_epochs must be >= 0"),
    ({"warmup_steps": 300}, "warmup_steps is now warmup_epochs"),
])
def test_bad_config_fails_before_writing(tmp_path, overrides, match):
  with pytest.raises(ValueError, match=match):
    run(small_config(**overrides), tmp_path / "w")
  assert not (tmp_path / "w").exists()


# Before warmup_epochs the configs gave these warmup_steps; workdirs that they wrote
# resume only while the same number of steps comes out.
@pytest.mark.parametrize("module,variant,train_examples,steps", [
    (lenet_mnist, "tuned", 60_000, 300), (lenet_fashion_mnist, "tuned", 60_000, 300),
    (alexnet_cifar10, "modern", 50_000, 1755), (resnet110_cifar10, "modern", 50_000, 702),
    (lenet_mnist, "smoke", 60_000, 0)])
def test_warmup_epochs_give_the_configs_warmup_steps(module, variant, train_examples, steps):
  c = module.get_config(variant)
  assert train.num_warmup_steps(c, (train_examples - c.num_validation) // c.batch_size) == steps


def test_the_configs_dataset_sizes_its_network():
  c = resnet110_cifar10.get_config("smoke")
  assert checkpoint.network(c).input_shape == (32, 32, 3)
  c.dataset = "fashion_mnist"
  net = checkpoint.network(c)
  assert (net.name, net.input_shape, net.num_classes) == ("b_resnet20", (28, 28, 1), 10)
  train.validate_config(c, net)
  c.model_options.input_shape = [32, 32, 3]  # As config.json holds a tuple: options win.
  c.dataset = "fashion_mnist"
  net = checkpoint.network(c)
  assert net.input_shape == (32, 32, 3)
  with pytest.raises(ValueError, match=r"takes \(32, 32, 3\) images but fashion_mnist has"):
    train.validate_config(c, net)


def test_missing_data_is_a_clear_error(tmp_path):
  config = small_config(data_dir=str(tmp_path / "empty"))
  with pytest.raises(data.DataNotFoundError, match="not prepared.*experiments.prepare_data"):
    train.train_and_evaluate(config, str(tmp_path / "w"))
  assert not (tmp_path / "w").exists()


def _cli(*args):
  return subprocess.run([sys.executable, "-m", "experiments.train", *args], cwd=REPO,
                        capture_output=True, text=True, timeout=300)


def test_cli_rejects_wrong_type_and_unknown_model(tmp_path):
  config = f"--config={REPO}/experiments/configs/lenet_mnist.py:smoke"
  bad_type = _cli(config, "--config.batch_size=big", f"--workdir={tmp_path / 'a'}")
  assert bad_type.returncode != 0
  assert "batch_size" in bad_type.stderr and "big" in bad_type.stderr
  unknown = _cli(config, "--config.model=vgg", f"--workdir={tmp_path / 'b'}")
  assert unknown.returncode == 2
  assert "Unknown model 'vgg'" in unknown.stderr
  assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_resuming_where_auto_resolves_otherwise_is_not_a_config_change(tmp_path, monkeypatch):
  """A run halted on CPU resumes with TPU's choices (XLA convolutions, bfloat16):
  runs.json records both runs' resolved choices, config.json keeps "auto"."""
  config = small_config(halt_after_steps=4)
  assert run(config, tmp_path) == {}
  monkeypatch.setattr(registry, "platform", lambda: "tpu")
  monkeypatch.setattr(runtime, "platform", lambda: "tpu")
  results = run(small_config(), tmp_path)
  assert checkpoint.latest_step(str(tmp_path)) == 8 and results["test"]["num_examples"] > 0
  written = json.loads((tmp_path / "config.json").read_text())
  assert written["model_options"] == {"conv1_impl": "auto", "conv_impl": "auto"}
  assert written["compute_dtype"] == "auto"
  first, second = checkpoint.runs(str(tmp_path))
  assert (first["start_step"], second["start_step"]) == (0, 4)
  assert first["model_options"] == {"conv1_impl": "im2col_batch_last",
                                    "conv1_kernel_grad": "autodiff",
                                    "conv_impl": "xla_channels_pad8", "conv_kernel_grad": "dot"}
  assert second["model_options"] == {"conv1_impl": "xla", "conv1_kernel_grad": "autodiff",
                                     "conv_impl": "xla", "conv_kernel_grad": "autodiff"}
  assert (first["compute_dtype"], second["compute_dtype"]) == ("float32", "bfloat16")
  for entry in (first, second):
    assert entry["versions"]["jax"] == jax.__version__ and entry["backend"] == "cpu"
  assert checkpoint.trained_compute_dtype(str(tmp_path), config) == "bfloat16"
