"""What the training configs share: every field (the authors' schedule as defaults) and the
variants that more than one network uses.

A network's config builds `base(...)`, overrides what differs, and names its variants
(`choose`); `bnet_jax.train` documents and validates every field.
"""

from collections.abc import Callable, Mapping

import ml_collections

# A variant changes a config in place.
Variant = Callable[[ml_collections.ConfigDict], None]


def base(model: str, model_options: dict, dataset: str, num_exits: int
         ) -> ml_collections.ConfigDict:
  """The shared fields for `model` (with `model_options`) on `dataset`."""
  c = ml_collections.ConfigDict()
  c.model = model
  # Layer implementations (bnet_jax/nets/layers.py): "auto" chooses per platform
  # (nets.resolve_options; runs.json records the choice). They share parameters.
  c.model_options = ml_collections.ConfigDict(model_options)
  # "auto": bfloat16 on TPU, float32 on CPU and GPU; "float32" or "bfloat16" forces.
  # Parameters, optimizer state, logits, losses and exit scores stay float32.
  c.compute_dtype = "auto"
  c.dataset = dataset
  c.data_dir = ""  # Empty: $TFDS_DATA_DIR, else the checkout's .tfds/, else ~/tensorflow_datasets.
  c.download = True  # Download through TFDS if the dataset is not prepared.
  c.num_validation = 5000  # Held out from the end of the train split.
  c.seed = 0

  c.batch_size = 512
  c.main_epochs = 50  # Main network alone (trunk + last exit).
  c.joint_epochs = 100  # Every exit, from the main phase's weights.
  c.loss_weights = (1.0,) * num_exits  # One per exit, last = main classifier.
  c.optimizer = "adam"  # Or "sgd" (Nesterov momentum, L2 weight decay).
  c.learning_rate = 1e-3
  c.momentum = 0.9  # SGD only.
  c.beta1 = 0.99
  c.beta2 = 0.999
  c.weight_decay = 0.0  # > 0 switches Adam to AdamW.
  c.lr_schedule = "constant"  # Or "cosine" (warmup + cosine decay per phase).
  # Cosine only; in epochs, so it follows batch_size (steps: train.num_warmup_steps).
  c.warmup_epochs = 0.0
  c.augment = "none"  # "shift" (random translations) or "crop_flip"; up to max_shift px.
  c.max_shift = 2
  # Exits on a trained plain network: its workdir, and whether the trunk trains too
  # (False: heads only, trunk and main exit frozen; needs main_epochs = 0).
  c.init_from = ""
  c.train_trunk = True

  c.eval_batch_size = 1000
  c.checkpoint_every_epochs = 5
  c.keep_checkpoints = 3
  c.halt_after_steps = -1  # > 0: stop (with a checkpoint) after this many steps.
  # Resume a checkpoint although a training-defining field changed (train.TRAINING_FIELDS);
  # the change is recorded in W/config_history.json.
  c.allow_config_change = False
  return c


def paper(c: ml_collections.ConfigDict) -> None:
  """The authors' schedule: `base`'s fields and the network's own, unchanged."""


def smoke(c: ml_collections.ConfigDict, batch_size: int = 256) -> None:
  """One main and one joint epoch with 1,000 images held out: checks that everything runs."""
  c.main_epochs = 1
  c.joint_epochs = 1
  c.num_validation = 1000
  c.batch_size = batch_size
  c.checkpoint_every_epochs = 1


def modern_cifar(c: ml_collections.ConfigDict, learning_rate: float, weight_decay: float,
                 warmup_epochs: float) -> None:
  """The standard CIFAR recipe: every exit trained jointly from scratch for 180 epochs with
  Nesterov SGD (momentum 0.9), warmup + cosine decay, batch 128, random crop + flip."""
  c.main_epochs = 0
  c.joint_epochs = 180
  c.batch_size = 128
  c.optimizer = "sgd"
  c.learning_rate = learning_rate
  c.weight_decay = weight_decay
  c.lr_schedule = "cosine"
  c.warmup_epochs = warmup_epochs
  c.augment = "crop_flip"


def choose(c: ml_collections.ConfigDict, variant: str, variants: Mapping[str, Variant]
           ) -> ml_collections.ConfigDict:
  """`c` changed by `variants[variant]`; a ValueError names the variants otherwise."""
  if variant not in variants:
    names = [repr(v) for v in variants]
    listed = f"{', '.join(names[:-1])} or {names[-1]}" if len(names) > 1 else names[0]
    raise ValueError(f"Unknown variant {variant!r}; expected {listed}.")
  variants[variant](c)
  return c
