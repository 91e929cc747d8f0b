"""Inputs: TFDS splits and batches (`data`), offline preparation (`offline`), augmentation."""
