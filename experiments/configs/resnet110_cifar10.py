"""B-ResNet-110 on CIFAR-10.

Variants (pick one with ``--config=experiments/configs/resnet110_cifar10.py:VARIANT``):

- ``paper`` (default): the authors' schedule. 100 epochs of the main network (ResNet-110)
  alone, then 100 joint epochs; Adam lr 1e-3, beta1 0.99 (the paper; the authors' code
  ran Chainer's 0.9), batch 64, no augmentation (as in the paper, whose accuracy
  docs/method.md gives), loss weight 1.0 on every exit.
- ``modern``: the standard CIFAR recipe (`common.modern_cifar`: joint from scratch,
  Nesterov SGD, warmup + cosine decay, random crop + flip) with lr 0.1, weight decay
  1e-4 and 2 epochs of warmup: the recipe behind the literature's CIFAR ResNet-110
  (docs/method.md; not yet run here). Slow on a CPU: a job for an accelerator.
- ``smoke``: ResNet-20, one main and one joint epoch, for checking that everything runs.

``--config.model_options.depth=20`` (any 6n+2) trains a smaller B-ResNet with the same
exits; ``--config.model_options.placement=paper`` puts exit 1 where the paper does.

Launch (CIFAR-10 is downloaded and prepared through TFDS on the first run, which needs
internet)::

  python -m experiments.train --config=experiments/configs/resnet110_cifar10.py:modern \\
      --workdir=workdirs/resnet110_cifar10_modern

Every field can be overridden, e.g. ``--config.batch_size=128``.
"""

import functools

import ml_collections

from experiments.configs import common


def smoke(c: ml_collections.ConfigDict) -> None:
  """`common.smoke` with ResNet-20 at batch 128: the deep network is slow to step."""
  c.model_options.depth = 20
  common.smoke(c, batch_size=128)


VARIANTS: dict[str, common.Variant] = {
    "paper": common.paper,
    "modern": functools.partial(common.modern_cifar, learning_rate=0.1, weight_decay=1e-4,
                                warmup_epochs=2.0),
    "smoke": smoke,
}


def get_config(variant: str = "paper") -> ml_collections.ConfigDict:
  """The config of `variant`, a key of `VARIANTS`."""
  c = common.base("b_resnet", {"depth": 110, "placement": "code", "conv_impl": "auto"},
                  "cifar10", 3)
  c.batch_size = 64
  c.main_epochs = 100
  c.max_shift = 4  # crop_flip: pad by 4, random 32x32 crop, random horizontal flip.
  c.eval_batch_size = 500
  c.checkpoint_every_epochs = 1  # Epochs are long on a CPU.
  return common.choose(c, variant, VARIANTS)
