"""B-AlexNet on CIFAR-10.

Variants (pick one with ``--config=experiments/configs/alexnet_cifar10.py:VARIANT``):

- ``paper`` (default): the authors' schedule. 50 epochs of the main network alone,
  then 100 joint epochs; Adam lr 1e-3, beta1 0.99 (the paper; the authors' code ran
  Chainer's 0.9), batch 512, no augmentation, loss weight 1.0 on every exit. Inputs
  are scaled to [0, 1] and normalised per channel (the authors used ZCA whitening
  plus per-image min-max scaling).
- ``modern``: the standard CIFAR recipe (`common.modern_cifar`: joint from scratch,
  Nesterov SGD, warmup + cosine decay, random crop + flip) with weight decay 5e-4 and
  5 epochs of warmup. The peak learning rate is 0.05, half the 0.1 used for the
  BatchNorm ResNet: AlexNet has no normalisation to keep a larger step stable.
- ``smoke``: one main and one joint epoch, for checking that everything runs.

Exits follow the authors' code; ``--config.model_options.placement=paper`` puts them
where the paper does (after conv1 and conv2).

Launch (CIFAR-10 is downloaded and prepared through TFDS on the first run, which needs
internet)::

  python -m experiments.train --config=experiments/configs/alexnet_cifar10.py:paper \\
      --workdir=workdirs/alexnet_cifar10_paper

Every field can be overridden, e.g. ``--config.beta1=0.9``.
"""

import functools

import ml_collections

from experiments.configs import common

VARIANTS: dict[str, common.Variant] = {
    "paper": common.paper,
    "modern": functools.partial(common.modern_cifar, learning_rate=0.05, weight_decay=5e-4,
                                warmup_epochs=5.0),
    "smoke": common.smoke,
}


def get_config(variant: str = "paper") -> ml_collections.ConfigDict:
  """The config of `variant`, a key of `VARIANTS`."""
  c = common.base("b_alexnet", {"placement": "code", "conv_impl": "auto"}, "cifar10", 3)
  c.max_shift = 4  # crop_flip: pad by 4, random 32x32 crop, random horizontal flip.
  return common.choose(c, variant, VARIANTS)
