"""bnet-jax: BranchyNet early-exit networks in JAX and Flax.

The source follows the pipeline, one sub-package per step; a module imports only
from its own package and the ones listed before it (`tests/test_layout.py`):

=============  ===============================================================
top level      `criteria` (exit scores and how they compare), `runtime`
               (per-platform settings, `jit`), `parallel` (device mesh),
               `progress`, `timing`
`nets`         multi-exit networks: the `Network` representation, layers, the
               B-LeNet / B-AlexNet / B-ResNet families and their registry
`inputs`       `data` (TFDS splits, batches), `offline` (preparing MNIST and
               Fashion-MNIST without a network), `augment`
`training`     `losses`, `train` (the step and the loop), `checkpoint` (the
               workdir), `evaluate` (all-exits pass and its cache), `summary`
`inference`    `cascade` (early-exit inference), `cost` (XLA FLOPs), `predict`
`thresholds`   `screening` (grids, figures, rules), `selection` (a rule on a
               trained workdir's cached exits)
`reporting`    `benchmark` (Table 1), `plots`, `tables`
=============  ===============================================================

Entry points: `nets.get` (a network by name), `train.train_and_evaluate` (a config
into a workdir), `checkpoint.load_trained`, `evaluate.cache_exits` (all exits of a
split, cached), `selection.choose` (thresholds by a rule), `cascade.Cascade` (early-
exit inference), `predict.predict_split`, `benchmark.run` (Table 1), and `criteria`
(`Criterion`, `register`) to add an exit criterion.

The public API is every module by its short name, ``from bnet_jax import cascade``
(or ``import bnet_jax.cascade``), as README, notebooks and experiments use it; the
sub-package path (``bnet_jax.inference.cascade``) names the same module object.
"""

import importlib
import importlib.abc
import importlib.machinery
import importlib.util
import sys
import types

__version__ = "0.1.0"

# Short name -> module, for every public module that lives in a sub-package.
MODULES: dict[str, str] = {
    **{m: f"bnet_jax.inputs.{m}" for m in ("data", "offline", "augment")},
    **{m: f"bnet_jax.training.{m}" for m in ("losses", "checkpoint", "evaluate", "summary",
                                              "train")},
    **{m: f"bnet_jax.inference.{m}" for m in ("cascade", "cost", "predict")},
    **{m: f"bnet_jax.thresholds.{m}" for m in ("screening", "selection")},
    **{m: f"bnet_jax.reporting.{m}" for m in ("benchmark", "plots", "tables")},
}
# Modules that stay at the top level, imported on first use like the others.
_TOP = ("criteria", "runtime", "parallel", "progress", "timing", "nets")

__all__ = sorted([*MODULES, *_TOP])


class _ShortNames(importlib.abc.MetaPathFinder, importlib.abc.Loader):
  """Makes ``import bnet_jax.cascade`` load (once) and return bnet_jax.inference.cascade."""

  def find_spec(self, fullname: str, path=None, target=None) -> importlib.machinery.ModuleSpec | None:
    short = fullname.removeprefix(f"{__name__}.")
    return importlib.util.spec_from_loader(fullname, self) if short in MODULES else None

  def __init__(self) -> None:
    self._specs: dict[str, importlib.machinery.ModuleSpec] = {}

  def create_module(self, spec: importlib.machinery.ModuleSpec) -> types.ModuleType:
    module = importlib.import_module(MODULES[spec.name.removeprefix(f"{__name__}.")])
    self._specs[spec.name] = module.__spec__
    return module

  def exec_module(self, module: types.ModuleType) -> None:
    # The import system stamped the alias spec on the real module; give its own back.
    module.__spec__ = self._specs.pop(module.__spec__.name, module.__spec__)


if not any(isinstance(f, _ShortNames) for f in sys.meta_path):
  sys.meta_path.append(_ShortNames())


def __getattr__(name: str) -> types.ModuleType:
  """``bnet_jax.cascade`` and the other public modules, imported on first use."""
  if name in MODULES:
    return importlib.import_module(MODULES[name])
  if name in _TOP:
    return importlib.import_module(f"{__name__}.{name}")
  raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
  return sorted([*globals(), *__all__])
