"""B-ResNet-110 on CIFAR-10.

Variants (pick one with ``--config=experiments/configs/resnet110_cifar10.py:VARIANT``):

- ``paper`` (default): the authors' schedule. 100 epochs of the main network (ResNet-110)
  alone, then 100 joint epochs; Adam lr 1e-3, beta1 0.99 (the paper; the authors' code
  ran Chainer's 0.9), batch 64, no augmentation (the paper's ResNet-110 reached 80.7%),
  loss weight 1.0 on every exit. About an hour an epoch on a shared 2-core CPU
  (joint training ran 12 images/s at batch 128 with experiments.benchmark_stages).
- ``modern``: the standard CIFAR ResNet recipe, trained jointly from scratch for 180
  epochs: Nesterov SGD (momentum 0.9, weight decay 1e-4), lr 0.1 with 2 epochs of
  warmup and cosine decay, batch 128, random crop + flip: the recipe that takes ResNet-110
  to about 93% in the literature (not yet run here). About an hour an epoch on a shared
  2-core CPU (12 images/s at batch 128): a job for an accelerator.
- ``smoke``: ResNet-20, one main and one joint epoch, for checking that everything runs.

``--config.model_options.depth=20`` (any 6n+2) trains a smaller B-ResNet with the same
exits; ``--config.model_options.placement=paper`` puts exit 1 where the paper does.

Launch (CIFAR-10 is downloaded and prepared through TFDS on the first run, which needs
internet)::

  python -m experiments.train --config=experiments/configs/resnet110_cifar10.py:modern \\
      --workdir=workdirs/resnet110_cifar10_modern

Every field can be overridden, e.g. ``--config.batch_size=128``.
"""

import ml_collections

from experiments.configs import common

CIFAR10_TRAIN = 50_000


def get_config(variant: str = "paper") -> ml_collections.ConfigDict:
  """The config of `variant` ('paper', 'modern' or 'smoke')."""
  c = common.base("b_resnet", {"depth": 110, "placement": "code", "conv_impl": "auto"},
                  "cifar10", 3)
  c.batch_size = 64
  c.main_epochs = 100
  c.max_shift = 4  # crop_flip: pad by 4, random 32x32 crop, random horizontal flip.
  c.eval_batch_size = 500
  c.checkpoint_every_epochs = 1  # Epochs are long on a CPU.

  if variant == "paper":
    pass
  elif variant == "modern":
    c.main_epochs = 0
    c.joint_epochs = 180
    c.batch_size = 128
    c.optimizer = "sgd"
    c.learning_rate = 0.1
    c.weight_decay = 1e-4
    c.lr_schedule = "cosine"
    # Two epochs of warmup at this batch size (steps, so recompute if batch_size changes).
    c.warmup_steps = 2 * ((CIFAR10_TRAIN - c.num_validation) // c.batch_size)
    c.augment = "crop_flip"
  elif variant == "smoke":
    c.model_options.depth = 20
    c.main_epochs = 1
    c.joint_epochs = 1
    c.num_validation = 1000
    c.batch_size = 128
  else:
    raise ValueError(f"Unknown variant {variant!r}; expected 'paper', 'modern' or 'smoke'.")
  return c
