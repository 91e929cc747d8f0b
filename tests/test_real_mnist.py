"""B-LeNet learns real MNIST: the one slow real-data test of training."""

import pytest

from bnet_jax import train
from experiments.configs import lenet_mnist


@pytest.mark.slow
def test_blenet_two_joint_epochs_on_real_mnist(mnist_data_dir, tmp_path):
  config = lenet_mnist.get_config("paper")
  config.data_dir = mnist_data_dir
  config.download = False
  config.main_epochs = 0
  config.joint_epochs = 2
  config.batch_size = 64
  config.beta1 = 0.9
  results = train.train_and_evaluate(config, str(tmp_path))
  test = results["test"]
  assert test["num_examples"] == 10_000
  assert results["validation"]["num_examples"] == 5_000
  assert test["accuracy_per_exit"][-1] >= 0.975, test
  assert test["accuracy_per_exit"][0] >= 0.90, test  # The branch learns too.
