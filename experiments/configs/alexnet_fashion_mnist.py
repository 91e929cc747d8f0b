"""B-AlexNet on Fashion-MNIST (28x28x1).

The network takes the dataset's 28x28x1 images and 10 classes (`checkpoint.network`).
The authors' exit heads stay: on AlexNet they are already small (exit 1 about 7% of
the main path's FLOPs, exit 2 1%) and, unlike ``exit_heads="trunk"``, keep the
spatial layout in their FC.

Variants (pick one with ``--config=experiments/configs/alexnet_fashion_mnist.py:VARIANT``):

- ``tuned`` (default): every exit trained jointly from scratch with the CIFAR recipe
  (`common.modern_cifar`: Nesterov SGD, warmup + cosine decay, batch 128, random crop +
  horizontal flip, here by 2 pixels of 28) for 28 epochs: under 45 minutes on a 2-core
  CPU (README has the measured time and accuracy). Peak learning rate 0.05 and weight
  decay 5e-4, as `alexnet_cifar10`'s ``modern``.
- ``smoke``: one main and one joint epoch, for checking that everything runs.

Launch::

  python -m experiments.train --config=experiments/configs/alexnet_fashion_mnist.py:tuned \\
      --workdir=workdirs/alexnet_fashion_mnist_tuned
"""

import ml_collections

from experiments.configs import common


def tuned(c: ml_collections.ConfigDict) -> None:
  """The CIFAR recipe, shortened to 28 epochs (under 45 CPU minutes) with 1 of warmup."""
  common.modern_cifar(c, learning_rate=0.05, weight_decay=5e-4, warmup_epochs=1.0)
  c.joint_epochs = 28


VARIANTS: dict[str, common.Variant] = {"tuned": tuned, "smoke": common.smoke}


def get_config(variant: str = "tuned") -> ml_collections.ConfigDict:
  """The config of `variant`, a key of `VARIANTS`."""
  c = common.base("b_alexnet", {"placement": "code", "exit_heads": "authors",
                                "conv_impl": "auto"}, "fashion_mnist", 3)
  c.max_shift = 2  # crop_flip: pad by 2, random 28x28 crop, random horizontal flip.
  return common.choose(c, variant, VARIANTS)
