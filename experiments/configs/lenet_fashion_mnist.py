"""B-LeNet on Fashion-MNIST: the MNIST configs with the dataset swapped.

Launch::

  python -m experiments.train --config=experiments/configs/lenet_fashion_mnist.py:tuned \\
      --workdir=workdirs/lenet_fashion_mnist_tuned
"""

import ml_collections

from experiments.configs import lenet_mnist


def get_config(variant: str = "paper") -> ml_collections.ConfigDict:
  """`lenet_mnist.get_config(variant)` on fashion_mnist."""
  c = lenet_mnist.get_config(variant)
  c.dataset = "fashion_mnist"
  return c
