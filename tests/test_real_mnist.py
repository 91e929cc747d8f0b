"""B-LeNet learns real MNIST, in float32 and in bfloat16: the slow real-data tests."""

import numpy as np
import pytest

from bnet_jax import cascade, checkpoint, data, evaluate, nets, train
from experiments.configs import lenet_mnist

# bfloat16 keeps 8 significant bits: separately compiled programs (the cascade's
# segments with inference layers, the all-exits pass with training layers) round
# differently. Measured on this run: exit scores differ by up to 0.03 nats and
# logits by up to about 0.1 between the two, so a decision may differ only for a
# sample whose score is within SCORE_BAND of a threshold, and a label only where
# the top two logits are within LOGIT_BAND.
SCORE_BAND, LOGIT_BAND = 0.06, 0.25


@pytest.fixture(scope="module")
def trained(mnist_data_dir, tmp_path_factory):
  """Workdirs of one joint epoch (batch 128) in each compute dtype, same seed."""
  workdirs, results = {}, {}
  for dtype in ("float32", "bfloat16"):
    config = lenet_mnist.get_config("paper")
    config.update(data_dir=mnist_data_dir, download=False, main_epochs=0, joint_epochs=1,
                  batch_size=128, beta1=0.9, compute_dtype=dtype)
    workdirs[dtype] = str(tmp_path_factory.mktemp(dtype))
    results[dtype] = train.train_and_evaluate(config, workdirs[dtype])
  return workdirs, results


@pytest.mark.slow
def test_blenet_learns_real_mnist_in_one_joint_epoch(trained):
  results = trained[1]["float32"]
  test = results["test"]
  assert test["num_examples"] == 10_000
  assert results["validation"]["num_examples"] == 5_000
  assert test["accuracy_per_exit"][-1] >= 0.965, test
  assert test["accuracy_per_exit"][0] >= 0.90, test  # The branch learns too.


@pytest.mark.slow
def test_bfloat16_learns_as_float32_does(trained):
  f32, bf16 = (trained[1][d]["test"]["accuracy_per_exit"] for d in ("float32", "bfloat16"))
  print(f"test accuracy per exit: float32 {f32}, bfloat16 {bf16}")
  assert checkpoint.runs(trained[0]["bfloat16"])[-1]["compute_dtype"] == "bfloat16"
  np.testing.assert_allclose(bf16, f32, atol=0.01)


@pytest.mark.slow
def test_bfloat16_cascade_equals_its_reference_outside_the_tie_band(trained):
  workdir = trained[0]["bfloat16"]
  model = checkpoint.load_trained(workdir)
  assert model.net.compute_dtype == np.dtype("bfloat16")
  config = model.config
  images = data.preprocess("mnist", data.load("mnist", "test", config.data_dir).images)
  out = evaluate.all_exits(model.net, model.variables, images)
  t = float(np.quantile(out.entropy[0], 0.9))  # 90% leave at exit 1.
  ref = cascade.reference(model.net, model.variables, images, [t])
  cascade_ = cascade.Cascade(model.net, model.variables, [t], bucket_net=lambda b: checkpoint.network(
      config, "bfloat16", **nets.inference_options(config.model, b)))
  got = cascade.Prediction(*(np.concatenate(p) for p in zip(
      *[cascade_.predict(images[i:i + 256]) for i in range(0, len(images), 256)])))
  near_t = np.abs(out.entropy[0] - t) < SCORE_BAND
  top2 = np.sort(out.logits[ref.exit, np.arange(len(images))], axis=-1)[:, -2:]
  near_tie = top2[:, 1] - top2[:, 0] < LOGIT_BAND
  exit_differs, label_differs = got.exit != ref.exit, got.label != ref.label
  print(f"bfloat16 cascade vs reference, 10,000 test images: exits differ {exit_differs.sum()} "
        f"(band: {near_t.sum()}), labels differ {label_differs.sum()} (band: {near_tie.sum()})")
  assert not np.any(exit_differs & ~near_t)
  assert not np.any(label_differs & ~exit_differs & ~near_tie)
  assert exit_differs.sum() + label_differs.sum() <= 50  # A handful, not a systematic error.
