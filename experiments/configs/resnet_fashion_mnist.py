"""B-ResNet-20 on Fashion-MNIST (28x28x1), with exit heads sized to the trunk.

The network takes the dataset's 28x28x1 images and 10 classes (`checkpoint.network`).
The authors' exit 1 (sized for ResNet-110) costs more FLOPs than ResNet-20's whole
main path, so early exits could only lose; ``exit_heads="trunk"`` gives each early
exit one strided conv, a global average pool and an FC, a few percent of the main path.

Variants (pick one with ``--config=experiments/configs/resnet_fashion_mnist.py:VARIANT``):

- ``tuned`` (default): every exit trained jointly from scratch with the CIFAR recipe
  (`common.modern_cifar`: Nesterov SGD lr 0.1, warmup + cosine decay, batch 128,
  random crop + horizontal flip, here by 2 pixels of 28) for 14 epochs: under 45
  minutes on a 2-core CPU. Weight decay 5e-4, the usual choice for short schedules.
- ``plain``: the plain ResNet-20 (model ``resnet``: trunk and main exit, no early
  exits) with ``tuned``'s recipe; the network that ``heads`` adds exits to.
- ``heads``: exits on a trained plain ResNet-20 (SDN's "IC-only" training): with
  ``--config.init_from=W`` (a ``plain`` workdir) the trunk and main exit stay frozen
  and the two trunk heads train alone, 4 epochs of the same recipe.
- ``smoke``: one main and one joint epoch, for checking that everything runs.

``--config.model_options.depth=32`` (any 6n+2) trains a deeper B-ResNet with the same
exits; ``--config.model_options.exit_heads=authors`` the authors' heads.

Launch::

  python -m experiments.train --config=experiments/configs/resnet_fashion_mnist.py:tuned \\
      --workdir=workdirs/resnet_fashion_mnist_tuned

Exits on a trained network::

  python -m experiments.train --config=experiments/configs/resnet_fashion_mnist.py:plain \\
      --workdir=workdirs/resnet_fashion_mnist_plain
  python -m experiments.train --config=experiments/configs/resnet_fashion_mnist.py:heads \\
      --config.init_from=workdirs/resnet_fashion_mnist_plain \\
      --workdir=workdirs/resnet_fashion_mnist_heads
"""

import ml_collections

from experiments.configs import common


def tuned(c: ml_collections.ConfigDict) -> None:
  """The CIFAR recipe, shortened to 14 epochs (under 45 CPU minutes) with 1 of warmup."""
  common.modern_cifar(c, learning_rate=0.1, weight_decay=5e-4, warmup_epochs=1.0)
  c.joint_epochs = 14


def plain(c: ml_collections.ConfigDict) -> None:
  """`tuned`'s recipe on the plain ResNet (one exit), whose parameters B-ResNet shares."""
  tuned(c)
  c.model = "resnet"
  del c.model_options.exit_heads
  c.loss_weights = (1.0,)


def heads(c: ml_collections.ConfigDict) -> None:
  """The trunk heads alone on a frozen trained ResNet (``--config.init_from=W``): 4 epochs."""
  tuned(c)
  c.train_trunk = False
  c.joint_epochs = 4


VARIANTS: dict[str, common.Variant] = {"tuned": tuned, "plain": plain, "heads": heads,
                                       "smoke": common.smoke}


def get_config(variant: str = "tuned") -> ml_collections.ConfigDict:
  """The config of `variant`, a key of `VARIANTS`."""
  c = common.base("b_resnet", {"depth": 20, "placement": "code", "exit_heads": "trunk",
                               "conv_impl": "auto"}, "fashion_mnist", 3)
  c.max_shift = 2  # crop_flip: pad by 2, random 28x28 crop, random horizontal flip.
  return common.choose(c, variant, VARIANTS)
