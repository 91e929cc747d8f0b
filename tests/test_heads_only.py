"""Exits on a trained network (SDN's "IC-only" training): from a plain network's workdir
(config.init_from, config.train_trunk) and from Python (nets.transplant,
train.heads_only_phase), on mock MNIST and the tiny network."""

import json
import re

import jax
import numpy as np
import optax
import pytest

from bnet_jax import checkpoint, nets, train
from helpers import REPO, random_variables, run, small_config, snapshot, tiny_network

MAIN_PATH = ("trunk_0", "trunk_1", "head_1")  # B-LeNet's modules that LeNet has too.


def config(**overrides):
  """One joint (or heads) epoch of 4 mock steps, no validation split: the cheapest run."""
  return small_config(main_epochs=0, num_validation=0, **overrides)


@pytest.fixture(scope="module")
def plain(tmp_path_factory):
  """A trained LeNet workdir (checkpoint 4)."""
  workdir = tmp_path_factory.mktemp("plain") / "w"
  run(config(model="lenet", loss_weights=(1.0,)), workdir)
  return workdir


@pytest.fixture(scope="module")
def heads(plain, tmp_path_factory):
  """B-LeNet with only exit 1's head trained on `plain`'s frozen network (checkpoint 4)."""
  workdir = tmp_path_factory.mktemp("heads") / "w"
  run(config(init_from=str(plain), train_trunk=False), workdir)
  return workdir


def images(n=64):
  """(n, 28, 28, 1) random pixels in [0, 1)."""
  return np.random.default_rng(0).random((n, 28, 28, 1), np.float32)


def main_exit(net, variables, x):
  """The main exit's (B, C) logits in eval mode, in one compiled program (eager: slower)."""
  return jax.jit(lambda v, x: nets.forward(net, v, x)[0].logits[-1])(variables, x)


def test_heads_only_keeps_the_plain_networks_main_path(plain, heads):
  before, after = checkpoint.load_trained(str(plain)), checkpoint.load_trained(str(heads))
  assert after.step == 4 and sorted(before.variables) == ["params"]  # LeNet: no statistics.
  for name in MAIN_PATH:
    jax.tree.map(np.testing.assert_array_equal, after.variables["params"][name],
                 before.variables["params"][name])
  x = images()
  np.testing.assert_allclose(main_exit(after.net, after.variables, x),
                             main_exit(before.net, before.variables, x), rtol=0, atol=1e-6)
  (entry,) = checkpoint.runs(str(heads))
  assert entry["init_from"] == {"workdir": str(plain), "step": 4}


def test_fine_tuning_starts_from_the_plain_network_and_trains_the_trunk(plain, tmp_path, capsys):
  assert run(config(init_from=str(plain), halt_after_steps=2), tmp_path) == {}
  assert "Phase joint (b_lenet): steps 0..2" in capsys.readouterr().out
  before, after = checkpoint.load_trained(str(plain)), checkpoint.load_trained(str(tmp_path))
  for name in MAIN_PATH:  # Two Adam steps of 1e-3 from LeNet's weights: moved, not far.
    moved = jax.tree.leaves(jax.tree.map(lambda a, b: float(np.max(np.abs(a - b))),
                                         after.variables["params"][name],
                                         before.variables["params"][name]))
    assert 0 < max(moved) < 0.01


@pytest.mark.parametrize("case,error,match", [
    ("b_lenet workdir", checkpoint.CheckpointMismatchError,
     r"init_from=\S+ holds model 'b_lenet' \(step 4\), but b_lenet's exits go on 'lenet' "
     r"\(b_lenet's main network\) \(4 parameters differ, e.g. \['head_0'\]"),
    ("missing", FileNotFoundError, r"init_from=\S+missing does not exist: pass the workdir"),
    ("other dataset", checkpoint.CheckpointMismatchError,
     r"holds 'lenet' trained on 'mnist', but this run is on 'fashion_mnist'"),
    ("main phase", ValueError, r"main_epochs is 1 but train_trunk=False .*main_epochs=0\."),
    ("no init_from", ValueError, r"train_trunk=False freezes .* set --config.init_from=W"),
])
def test_refusals_are_one_line_and_write_nothing(plain, heads, tmp_path, case, error, match):
  overrides = {"b_lenet workdir": {"init_from": str(heads), "train_trunk": False},
               "missing": {"init_from": str(tmp_path / "missing")},
               "other dataset": {"init_from": str(plain), "dataset": "fashion_mnist"},
               "main phase": {"init_from": str(plain), "train_trunk": False, "main_epochs": 1},
               "no init_from": {"train_trunk": False}}[case]
  before = snapshot(plain), snapshot(heads)
  with pytest.raises(error, match=match) as e:
    run(small_config(num_validation=0, **{"main_epochs": 0, **overrides}), tmp_path / "w")
  assert "\n" not in str(e.value)
  assert not (tmp_path / "w").exists() and (snapshot(plain), snapshot(heads)) == before


def test_the_fields_are_training_defining_and_absent_means_their_defaults():
  old = train.config_fields(small_config())
  del old["init_from"], old["train_trunk"]  # config.json as written before the fields existed.
  assert train.check_config_change(old, small_config(init_from="", train_trunk=True), 8) == {}
  with pytest.raises(train.ConfigChangeError, match=r"\(init_from: '' -> 'W'\)"):
    train.check_config_change(old, small_config(init_from="W"), 8)
  assert train.check_config_change(old, small_config(init_from="W", allow_config_change=True),
                                   8)["init_from"] == ("", "W")


def restored(workdir, net, step):
  """Checkpoint `step` of a heads-only run, restored into the heads phase's state."""
  phase = train.make_phases(config(train_trunk=False), net, 4)[-1]
  target = train.initial_state(phase, train.make_optimizer(config(), phase.num_steps),
                               random_variables(net, 0), step)
  with checkpoint.manager(str(workdir), create=False) as mngr:
    return checkpoint.restore(mngr, step, target)


def test_heads_only_resume_is_exact_and_keeps_train_trunk(plain, heads, tmp_path):
  halted = config(init_from=str(plain), train_trunk=False, halt_after_steps=2)
  assert run(halted, tmp_path) == {}
  before = snapshot(tmp_path)
  with pytest.raises(train.ConfigChangeError, match=r"train_trunk: False -> True: the "
                     r"checkpoint \(step 2\) holds optimizer state for the exit heads only"):
    run(config(init_from=str(plain), allow_config_change=True), tmp_path)
  assert snapshot(tmp_path) == before
  net = nets.get("b_lenet")
  midway = restored(tmp_path, net, 2)
  run(config(init_from=str(plain), train_trunk=False), tmp_path)
  straight, resumed = restored(heads, net, 4), restored(tmp_path, net, 4)
  assert list(straight.opt_state[0].mu) == ["head_0"]  # Adam's moments: exit 1's head alone.
  jax.tree.map(np.testing.assert_array_equal, straight, resumed)
  for name in MAIN_PATH:  # Frozen from step 0; exit 1's head learns.
    jax.tree.map(np.testing.assert_array_equal, midway.params[name], straight.params[name])
  assert all(jax.tree.leaves(jax.tree.map(lambda a, b: bool(np.any(a != b)),
                                          midway.params["head_0"], straight.params["head_0"])))
  saved = json.loads((tmp_path / "config.json").read_text())
  assert (saved["init_from"], saved["train_trunk"]) == (str(plain), False)


def test_python_api_trains_heads_on_a_frozen_batchnorm_trunk():
  net = tiny_network()  # Exits after stages 0, 2, 3; stage 1 has BatchNorm.
  trained = random_variables(net.main_network(), 1)
  variables = nets.transplant(net, trained, random_variables(net, 2))
  phase = train.heads_only_phase(net, num_steps=5)
  assert phase.loss_weights == (1.0, 1.0, 0.0)
  assert list(phase.trainable(variables["params"])) == ["head_0", "head_2"]
  tx = optax.adam(1e-2)
  state = train.initial_state(phase, tx, variables, 0)
  step = train.make_train_step(phase, tx)
  rng = np.random.default_rng(0)
  batch = {"image": rng.normal(size=(32, 8, 8, 2)).astype(np.float32),
           "label": rng.integers(0, 5, 32).astype(np.int32)}
  plain_logits = main_exit(net.main_network(), trained, batch["image"])
  for _ in range(phase.num_steps):
    state, metrics = step(state, batch, jax.random.key(0))
  # Inside the step the trunk ran on its running statistics: the main exit's loss is the
  # plain network's in inference, and the total counts the early exits only.
  plain_loss = optax.softmax_cross_entropy_with_integer_labels(plain_logits, batch["label"])
  np.testing.assert_allclose(metrics["loss_per_exit"][-1], plain_loss.mean(), rtol=1e-6)
  np.testing.assert_allclose(metrics["loss"], metrics["loss_per_exit"][:-1].sum(), rtol=1e-6)
  after = {"params": state.params, **state.model_state}
  for col, tree in trained.items():
    jax.tree.map(np.testing.assert_array_equal, {k: after[col][k] for k in tree}, tree)
  for head in ("head_0", "head_2"):
    assert not np.array_equal(after["params"][head]["Dense_0"]["kernel"],
                              variables["params"][head]["Dense_0"]["kernel"])
  np.testing.assert_allclose(main_exit(net, after, batch["image"]), plain_logits, rtol=0,
                             atol=1e-6)


def test_transplant_maps_names_and_refuses_what_does_not_fit():
  net = tiny_network()
  trained, fresh = random_variables(net.main_network(), 1), random_variables(net, 2)
  names = {"trunk_0": "conv", "trunk_1": "bn", "trunk_2": "dense", "trunk_3": "dense_1",
           "head_3": "out"}
  own = {col: {names[k]: v for k, v in tree.items()} for col, tree in trained.items()}
  by_name = nets.transplant(net, own, fresh, rename={v: k for k, v in names.items()})
  jax.tree.map(np.testing.assert_array_equal, by_name, nets.transplant(net, trained, fresh))
  jax.tree.map(np.testing.assert_array_equal, by_name["params"]["head_0"],
               fresh["params"]["head_0"])
  wide = jax.tree.map(lambda a: a, trained)
  wide["params"]["head_3"]["Dense_0"]["kernel"] = np.zeros((16, 6), np.float32)
  for bad, match in [
      ({"params": trained["params"]}, r"lack batch_stats of trunk_1 on tiny's main path"),
      (fresh, r"trained params hold module 'head_0', which tiny's main path lacks"),
      (own, r"module 'bn', which tiny's main path lacks .*rename="),
      (wide, r"trained params\['head_3'\]\['Dense_0'\]\['kernel'\] has shape \(16, 6\) but "
             r"tiny needs \(16, 5\)")]:
    with pytest.raises(ValueError, match=match) as e:
      nets.transplant(net, bad, fresh)
    assert "\n" not in str(e.value)


def test_workspace_example_runs():
  section = (REPO / "WORKSPACE.md").read_text().split("## Exits on a trained network\n")[1]
  (code,) = re.findall(r"```python\n(.*?)```", section.split("\n## ")[0], re.DOTALL)
  scope = {}
  exec(compile(code, "WORKSPACE.md", "exec"), scope)  # It checks the main exit itself.
  assert list(scope["state"].opt_state[0].mu) == ["head_0"]
  assert scope["metrics"]["loss_per_exit"].shape == (2,)
