"""B-AlexNet on CIFAR-10.

Variants (pick one with ``--config=experiments/configs/alexnet_cifar10.py:VARIANT``):

- ``paper`` (default): the authors' schedule. 50 epochs of the main network alone,
  then 100 joint epochs; Adam lr 1e-3, beta1 0.99 (the paper; the authors' code ran
  Chainer's 0.9), batch 512, no augmentation, loss weight 1.0 on every exit. Inputs
  are scaled to [0, 1] and normalised per channel (the authors used ZCA whitening
  plus per-image min-max scaling). About 3 minutes an epoch on a shared 2-core CPU
  (joint training measured at 230 images/s at batch 512 with experiments.benchmark_stages),
  so about 8 hours in all.
- ``modern``: joint training from scratch for 180 epochs with Nesterov SGD (momentum
  0.9, weight decay 5e-4), warmup + cosine decay, batch 128, random crop + flip.
  The peak learning rate is 0.05, half the 0.1 used for the BatchNorm ResNet: AlexNet
  has no normalisation to keep a larger step stable. About 1.7 minutes an epoch on a
  shared 2-core CPU (450 images/s at batch 128), about 5 hours in all.
- ``smoke``: one main and one joint epoch, for checking that everything runs.

Exits follow the authors' code; ``--config.model_options.placement=paper`` puts them
where the paper does (after conv1 and conv2).

Launch (CIFAR-10 is downloaded and prepared through TFDS on the first run, which needs
internet)::

  python -m experiments.train --config=experiments/configs/alexnet_cifar10.py:paper \\
      --workdir=workdirs/alexnet_cifar10_paper

Every field can be overridden, e.g. ``--config.beta1=0.9``.
"""

import ml_collections

from experiments.configs import common

CIFAR10_TRAIN = 50_000


def get_config(variant: str = "paper") -> ml_collections.ConfigDict:
  """The config of `variant` ('paper', 'modern' or 'smoke')."""
  c = common.base("b_alexnet", {"placement": "code", "conv_impl": "auto"}, "cifar10", 3)
  c.max_shift = 4  # crop_flip: pad by 4, random 32x32 crop, random horizontal flip.

  if variant == "paper":
    pass
  elif variant == "modern":
    c.main_epochs = 0
    c.joint_epochs = 180
    c.batch_size = 128
    c.optimizer = "sgd"
    c.learning_rate = 0.05
    c.weight_decay = 5e-4
    c.lr_schedule = "cosine"
    # Five epochs of warmup at this batch size (steps, so recompute if batch_size changes).
    c.warmup_steps = 5 * ((CIFAR10_TRAIN - c.num_validation) // c.batch_size)
    c.augment = "crop_flip"
  elif variant == "smoke":
    c.main_epochs = 1
    c.joint_epochs = 1
    c.num_validation = 1000
    c.batch_size = 256
    c.checkpoint_every_epochs = 1
  else:
    raise ValueError(f"Unknown variant {variant!r}; expected 'paper', 'modern' or 'smoke'.")
  return c
