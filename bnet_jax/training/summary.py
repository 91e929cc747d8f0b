"""Training curves for TensorBoard: per-exit loss and accuracy, learning rate.

Event files go to ``workdir/tensorboard/{train,validation}/``, one TensorBoard
*run* per split, so train and validation curves of the same tag share a chart::

  tensorboard --logdir workdir/tensorboard      # or, in Colab: %tensorboard --logdir ...

Tags: ``loss/exit_k`` and ``accuracy/exit_k`` with k = 1..E counted from the first
exit (the main phase trains the main network alone, whose one exit is exit E),
``loss/total`` (the phase's weighted joint loss), ``learning_rate`` and
``images_per_second`` (train only). Steps are global training steps.

Written with tensorboardX, which needs neither TensorFlow nor TensorBoard to write.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import jax
from tensorboardX import SummaryWriter


def logdir(workdir: str) -> str:
  """The TensorBoard log directory of a workdir."""
  return os.path.join(workdir, "tensorboard")


class Writer:
  """Scalars of one training run, a TensorBoard run per split.

  Args:
    workdir: the run's workdir.
    num_exits: exits of the full network (E), for the exit numbers in the tags.
    start_step: the checkpoint step training resumes from; events an earlier run
      wrote after it are hidden by TensorBoard (that run's later state was lost).

  In a multi-process run only process 0 writes; the others' calls do nothing.
  """

  def __init__(self, workdir: str, num_exits: int, start_step: int = 0):
    self.num_exits = num_exits
    self._logdir = logdir(workdir)
    self._purge_step = start_step + 1 if start_step else None
    self._writers: dict[str, SummaryWriter] = {}  # Created on first use: no empty runs.

  def scalar(self, split: str, tag: str, value: float, step: int) -> None:
    """One scalar of `split` (a run name: "train", "validation", ...)."""
    if jax.process_index() != 0:
      return
    if split not in self._writers:
      self._writers[split] = SummaryWriter(os.path.join(self._logdir, split),
                                           purge_step=self._purge_step)
    self._writers[split].add_scalar(tag, float(value), int(step))

  def per_exit(self, split: str, name: str, values: Sequence[float], step: int) -> None:
    """``name/exit_k`` for the last ``len(values)`` exits of the full network."""
    first = self.num_exits - len(values)
    for i, value in enumerate(values):
      self.scalar(split, f"{name}/exit_{first + i + 1}", value, step)

  def flush(self) -> None:
    """Writes pending events to disk."""
    for w in self._writers.values():
      w.flush()

  def close(self) -> None:
    """Flushes and closes every event file."""
    for w in self._writers.values():
      w.close()
