"""Fields every training config has, with the authors' schedule as their defaults.

A network's config calls `base(...)` and overrides what differs; `bnet_jax.train`
documents and validates every field.
"""

import ml_collections


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
  c.warmup_steps = 0
  c.augment = "none"  # "shift" (random translations) or "crop_flip"; up to max_shift px.
  c.max_shift = 2

  c.eval_batch_size = 1000
  c.checkpoint_every_epochs = 5
  c.keep_checkpoints = 3
  c.halt_after_steps = -1  # > 0: stop (with a checkpoint) after this many steps.
  # Resume a checkpoint although a training-defining field changed (train.TRAINING_FIELDS);
  # the change is recorded in W/config_history.json.
  c.allow_config_change = False
  return c
