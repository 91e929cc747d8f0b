"""B-LeNet on MNIST.

Variants (pick one with ``--config=experiments/configs/lenet_mnist.py:VARIANT``):

- ``paper`` (default): the authors' schedule. 50 epochs of the main network alone,
  then 100 joint epochs; Adam lr 1e-3, beta1 0.99 (the paper; the authors' code ran
  Chainer's 0.9), batch 512, no augmentation, loss weight 1.0 on every exit.
- ``tuned``: the same architecture trained for accuracy in about 15 minutes on a
  2-core CPU: joint from the start, AdamW with warmup + cosine decay, light random
  shifts.
- ``smoke``: a few steps, for checking that everything runs (seconds).

Launch::

  python -m experiments.train --config=experiments/configs/lenet_mnist.py:tuned \\
      --workdir=workdirs/lenet_mnist_tuned

Every field can be overridden, e.g. ``--config.beta1=0.9``.
"""

import ml_collections


def get_config(variant: str = "paper") -> ml_collections.ConfigDict:
  """The config of `variant` ('paper', 'tuned' or 'smoke')."""
  c = ml_collections.ConfigDict()
  c.model = "b_lenet"
  # Layer implementations (see bnet_jax/nets/layers.py); they share parameters.
  c.model_options = ml_collections.ConfigDict({"conv1_impl": "xla", "conv_impl": "xla_dotgrad"})
  c.dataset = "mnist"
  c.data_dir = ""  # Empty: $TFDS_DATA_DIR, else ~/tensorflow_datasets.
  c.download = True  # Download through TFDS if the dataset is not prepared.
  c.num_validation = 5000  # Held out from the end of the train split.
  c.seed = 0

  c.batch_size = 512
  c.main_epochs = 50  # Main network alone (trunk + last exit).
  c.joint_epochs = 100  # Every exit, from the main phase's weights.
  c.loss_weights = (1.0, 1.0)  # One per exit, last = main classifier.
  c.optimizer = "adam"  # Or "sgd" (Nesterov momentum, L2 weight decay).
  c.learning_rate = 1e-3
  c.momentum = 0.9  # SGD only.
  c.beta1 = 0.99
  c.beta2 = 0.999
  c.weight_decay = 0.0  # > 0 switches Adam to AdamW.
  c.lr_schedule = "constant"  # Or "cosine" (warmup + cosine decay per phase).
  c.warmup_steps = 0
  c.augment = "none"  # "shift": random translations of up to max_shift pixels; "crop_flip".
  c.max_shift = 2

  c.eval_batch_size = 1000
  c.checkpoint_every_epochs = 5
  c.keep_checkpoints = 3
  c.halt_after_steps = -1  # > 0: stop (with a checkpoint) after this many steps.

  if variant == "paper":
    pass
  elif variant == "tuned":
    c.main_epochs = 0
    c.joint_epochs = 30
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
