"""B-LeNet on MNIST.

Variants (pick one with ``--config=experiments/configs/lenet_mnist.py:VARIANT``):

- ``paper`` (default): the authors' schedule. 50 epochs of the main network alone,
  then 100 joint epochs; Adam lr 1e-3, beta1 0.99 (the paper; the authors' code ran
  Chainer's 0.9), batch 512, no augmentation, loss weight 1.0 on every exit. It falls
  short of the paper's accuracy: with a constant learning rate and no regularisation
  the network overfits.
- ``tuned``: the same architecture and initialisation trained for accuracy in a short
  CPU run: joint from the start, AdamW with warmup + cosine decay, light random shifts.
- ``smoke``: one main and one joint epoch, for checking that everything runs.

Launch::

  python -m experiments.train --config=experiments/configs/lenet_mnist.py:tuned \\
      --workdir=workdirs/lenet_mnist_tuned

Every field can be overridden, e.g. ``--config.beta1=0.9``.
"""

import ml_collections

from experiments.configs import common


def tuned(c: ml_collections.ConfigDict) -> None:
  """Joint training from scratch for accuracy: AdamW, warmup + cosine decay, random shifts."""
  c.main_epochs = 0
  c.joint_epochs = 60  # Chosen on validation.
  c.batch_size = 256
  c.beta1 = 0.9
  c.learning_rate = 3e-3
  c.weight_decay = 1e-4
  c.lr_schedule = "cosine"
  c.warmup_epochs = 1.4  # 300 steps at batch 256.
  c.augment = "shift"
  c.max_shift = 2


VARIANTS: dict[str, common.Variant] = {"paper": common.paper, "tuned": tuned,
                                       "smoke": common.smoke}


def get_config(variant: str = "paper") -> ml_collections.ConfigDict:
  """The config of `variant`, a key of `VARIANTS`."""
  c = common.base("b_lenet", {"conv1_impl": "auto", "conv_impl": "auto"}, "mnist", 2)
  return common.choose(c, variant, VARIANTS)
