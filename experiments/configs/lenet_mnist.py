"""B-LeNet on MNIST.

Variants (pick one with ``--config=experiments/configs/lenet_mnist.py:VARIANT``):

- ``paper`` (default): the authors' schedule. 50 epochs of the main network alone,
  then 100 joint epochs; Adam lr 1e-3, beta1 0.99 (the paper; the authors' code ran
  Chainer's 0.9), batch 512, no augmentation, loss weight 1.0 on every exit.
  Measured 2026-11-30 with the authors' code as it ran (``--config.beta1=0.9
  --config.num_validation=0``): test 98.93% final / 98.42% exit 1 (LeNet after the
  main phase 98.65%, at most 98.94% over 30 checkpoints); as configured (beta1
  0.99, 5,000 held out), test 98.75% final / 98.50% exit 1 in 1,842 s, and with
  ``--config.seed=1`` 98.90% / 98.21% (2,479 s, sharing the cores). None closes
  the gap to the paper's 99.20/99.25%: the three runs span 0.18 points and leave
  32-50 more test errors out of 10,000 than the paper's B-LeNet. With a constant
  learning rate and no regularisation the network overfits (train accuracy
  99.7-100%), and ``tuned`` reaches 99.36% with the same architecture and
  initialisation.
- ``tuned``: the same architecture trained for accuracy in about 15 minutes on a
  2-core CPU: joint from the start, AdamW with warmup + cosine decay, light random
  shifts, 60 epochs. Measured 2026-11-30: 722.6 s, test 99.36% final / 99.01%
  exit 1. The epoch count was chosen on validation: 30 epochs (434 s) gave 99.20%
  there, 60 gave 99.32%.
- ``smoke``: a few steps, for checking that everything runs (seconds).

Launch::

  python -m experiments.train --config=experiments/configs/lenet_mnist.py:tuned \\
      --workdir=workdirs/lenet_mnist_tuned

Every field can be overridden, e.g. ``--config.beta1=0.9``.
"""

import ml_collections

from experiments.configs import common


def get_config(variant: str = "paper") -> ml_collections.ConfigDict:
  """The config of `variant` ('paper', 'tuned' or 'smoke')."""
  c = common.base("b_lenet", {"conv1_impl": "auto", "conv_impl": "auto"}, "mnist", 2)

  if variant == "paper":
    pass
  elif variant == "tuned":
    c.main_epochs = 0
    c.joint_epochs = 60
    c.batch_size = 256
    c.beta1 = 0.9
    c.learning_rate = 3e-3
    c.weight_decay = 1e-4
    c.lr_schedule = "cosine"
    c.warmup_steps = 300
    c.augment = "shift"
    c.max_shift = 2
  elif variant == "smoke":
    c.main_epochs = 1
    c.joint_epochs = 1
    c.num_validation = 1000
    c.batch_size = 256
    c.checkpoint_every_epochs = 1
  else:
    raise ValueError(f"Unknown variant {variant!r}; expected 'paper', 'tuned' or 'smoke'.")
  return c
