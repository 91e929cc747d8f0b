"""The multi-exit network representation every part of the library shares.

A BranchyNet is an ordered tuple of `Stage`s. Stage i maps the trunk activation
h_{i-1} to h_i with its `trunk` module; if it has a `head`, the head maps h_i to an
exit's logits. The last stage always has a head: the main classifier. Stages
without a head (a plain network's inner stages) are only trunk.

Variables are a dict of collections (``"params"``, and ``"batch_stats"`` for
networks with BatchNorm), each keyed by module name: ``trunk_i`` and ``head_i``.
A plain network obtained with `Network.main_network` has the same names minus the
inner heads, so a BranchyNet's parameters run its main path unchanged, and a trained
plain network's variables become a BranchyNet's main path (`transplant`).

Every module is called as ``module(x, train=bool)``. Modules are applied one at a
time with their own slice of the variables: the same parameters run in one fused
pass (`forward`) or stage by stage (`apply_trunk`, `apply_head`), which the
early-exit cascade and cost accounting rely on.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Collection, Mapping
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from bnet_jax import criteria

Variables = dict[str, Any]

MUTABLE_COLLECTIONS = ("batch_stats",)


@dataclasses.dataclass(frozen=True)
class Stage:
  """One trunk segment and, optionally, the exit head that follows it."""
  trunk: nn.Module
  head: nn.Module | None = None


@dataclasses.dataclass(frozen=True)
class Network:
  """A multi-exit network.

  Attributes:
    name: registry name, stored in checkpoints to refuse another model's weights.
    stages: trunk segments with their exit heads; the last has the main head.
    input_shape: (H, W, C) of one input image.
    num_classes: classes of every exit.
  """
  name: str
  stages: tuple[Stage, ...]
  input_shape: tuple[int, int, int]
  num_classes: int

  def __post_init__(self):
    if not self.stages or self.stages[-1].head is None:
      raise ValueError(f"{self.name}: the last stage must have a head (the main exit).")

  @property
  def exit_stages(self) -> tuple[int, ...]:
    """Indices of the stages that end in an exit, in order."""
    return tuple(i for i, s in enumerate(self.stages) if s.head is not None)

  @property
  def num_exits(self) -> int:
    return len(self.exit_stages)

  @property
  def compute_dtype(self) -> np.dtype:
    """The dtype the layers compute in (parameters are float32 whatever it is)."""
    return np.dtype(getattr(self.stages[0].trunk, "dtype", np.float32))

  def with_conv_impl(self, impl: str = "xla", kernel_grad: str = "autodiff") -> Network:
    """The same network with every stage module's convolutions implemented by `impl`.

    Implementations share parameters (see `layers.Conv`), so the result runs the
    same variables. Stage modules name their implementation fields ``conv_impl``
    and ``conv_kernel_grad`` (set to `kernel_grad`); strided convolutions, where a
    module has them (``strided_conv_impl``), become XLA's own, and BatchNorms
    (``norm_impl``) Flax's.
    """
    def swap(module: nn.Module | None) -> nn.Module | None:
      if module is None:
        return module
      fields = {}
      if hasattr(module, "conv_impl"):
        fields.update(conv_impl=impl, conv_kernel_grad=kernel_grad)
      if hasattr(module, "strided_conv_impl"):
        fields.update(strided_conv_impl="xla", strided_conv_kernel_grad="autodiff")
      if hasattr(module, "norm_impl"):
        fields.update(norm_impl="flax")
      return module.clone(**fields) if fields else module
    return dataclasses.replace(self, stages=tuple(
        Stage(swap(s.trunk), swap(s.head)) for s in self.stages))

  def main_network(self, name: str | None = None) -> Network:
    """The plain network: every trunk stage and only the last (main) head."""
    last = len(self.stages) - 1
    stages = tuple(dataclasses.replace(s, head=s.head if i == last else None)
                   for i, s in enumerate(self.stages))
    return dataclasses.replace(self, name=name or f"{self.name}_main", stages=stages)


class Outputs(NamedTuple):
  """Every exit's outputs for a batch.

  Attributes:
    logits: (E, B, num_classes), exits in order, last = main classifier.
    entropy: (E, B), entropy of each exit's softmax in nats.
  """
  logits: jax.Array
  entropy: jax.Array


def module_names(net: Network) -> list[str]:
  """Names of the network's modules in execution order."""
  names = []
  for i, stage in enumerate(net.stages):
    names.append(f"trunk_{i}")
    if stage.head is not None:
      names.append(f"head_{i}")
  return names


def _slice(variables: Variables, name: str) -> Variables:
  return {col: tree[name] for col, tree in variables.items() if name in tree}


def _apply(module: nn.Module, variables: Variables, name: str, x: jax.Array,
           train: bool, rng: jax.Array | None) -> tuple[jax.Array, Variables]:
  """Applies one module; returns its output and its updated mutable state."""
  v = _slice(variables, name)
  if not train:
    return module.apply(v, x, train=False), {}
  rngs = {"dropout": rng} if rng is not None else {}
  y, updates = module.apply(v, x, train=True, rngs=rngs, mutable=list(MUTABLE_COLLECTIONS))
  return y, {col: {name: tree} for col, tree in updates.items() if tree}


def _merge(into: Variables, updates: Variables) -> None:
  for col, tree in updates.items():
    into.setdefault(col, {}).update(tree)


def init(net: Network, rng: jax.Array, batch_size: int = 1) -> Variables:
  """Initialises every module of `net`, in one compiled program.

  Compiled, not eager: op-by-op shape inference through the custom convolutions took
  seconds per network (minutes in float64); the random bits are the same either way.

  Args:
    net: the network.
    rng: a PRNG key.
    batch_size: batch of the dummy input used to infer shapes.

  Returns:
    Variables: ``{"params": {"trunk_0": ..., "head_0": ..., ...}, ...}``.
  """
  return _init_program(net, batch_size)(rng)


@functools.cache
def _init_program(net: Network, batch_size: int) -> Callable[[jax.Array], Variables]:
  """`init`'s jitted body for one network and dummy batch (cached: compiled once)."""

  def body(rng: jax.Array) -> Variables:
    h = jnp.zeros((batch_size, *net.input_shape), jnp.float32)
    variables: Variables = {}
    for i, stage in enumerate(net.stages):
      key = jax.random.fold_in(rng, i)
      v = stage.trunk.init({"params": key, "dropout": key}, h, train=False)
      _merge(variables, {col: {f"trunk_{i}": tree} for col, tree in v.items()})
      h = stage.trunk.apply(v, h, train=False)
      if stage.head is not None:
        hkey = jax.random.fold_in(key, 1_000_003)
        v = stage.head.init({"params": hkey, "dropout": hkey}, h, train=False)
        _merge(variables, {col: {f"head_{i}": tree} for col, tree in v.items()})
    return variables

  return jax.jit(body)


def apply_trunk(net: Network, variables: Variables, i: int, h: jax.Array, *,
                train: bool = False, rng: jax.Array | None = None
                ) -> tuple[jax.Array, Variables]:
  """Runs trunk stage `i`: (B, ...) activation in, (B, ...) activation out."""
  key = None if rng is None else jax.random.fold_in(rng, 2 * i)
  return _apply(net.stages[i].trunk, variables, f"trunk_{i}", h, train, key)


def apply_head(net: Network, variables: Variables, i: int, h: jax.Array, *,
               train: bool = False, rng: jax.Array | None = None
               ) -> tuple[jax.Array, Variables]:
  """Runs the exit head of stage `i` on its trunk output: returns (B, C) logits.

  Logits are at least float32 whatever the compute dtype (bfloat16 gives float32), so
  softmax, scores and losses are too.
  """
  key = None if rng is None else jax.random.fold_in(rng, 2 * i + 1)
  z, updates = _apply(net.stages[i].head, variables, f"head_{i}", h, train, key)
  return z.astype(jnp.promote_types(z.dtype, jnp.float32)), updates


def forward(net: Network, variables: Variables, x: jax.Array, *, train: bool = False,
            rng: jax.Array | None = None, eval_modules: Collection[str] = ()
            ) -> tuple[Outputs, Variables]:
  """All exits in one pass.

  Args:
    net: the network.
    variables: as returned by `init`.
    x: (B, H, W, C) float images, preprocessed (any float dtype; the layers cast
      them to the network's compute dtype).
    train: batch statistics and dropout when True; running statistics otherwise.
    rng: dropout key (needed only by networks with dropout, in training).
    eval_modules: names of modules (``trunk_i``, ``head_i``) that run in eval mode even
      when `train` is True (running statistics, no dropout, no updates): a frozen trunk
      computes what it computes in inference.

  Returns:
    `Outputs` with float32 logits (E, B, C) and entropy (E, B), and the updated mutable
    collections (empty unless `train`; none of `eval_modules`).
  """
  updates: Variables = {}
  logits = []
  h = x
  for i, stage in enumerate(net.stages):
    h, u = apply_trunk(net, variables, i, h, train=train and f"trunk_{i}" not in eval_modules,
                       rng=rng)
    _merge(updates, u)
    if stage.head is not None:
      z, u = apply_head(net, variables, i, h, train=train and f"head_{i}" not in eval_modules,
                        rng=rng)
      _merge(updates, u)
      logits.append(z)
  logits = jnp.stack(logits)
  return Outputs(logits, criteria.entropy(logits)), updates


def _leaf_shapes(tree: Any) -> dict[str, tuple[int, ...]]:
  """{leaf path, e.g. "['Dense_0']['kernel']": shape} of a pytree."""
  return {jax.tree_util.keystr(path): tuple(np.shape(leaf))
          for path, leaf in jax.tree_util.tree_leaves_with_path(tree)}


def transplant(net: Network, trained: Variables, fresh: Variables,
               rename: Mapping[str, str] | None = None) -> Variables:
  """`net`'s variables with its main path from a trained plain network: exits on a trained
  network (SDN's internal classifiers).

  Every module of `net.main_network()` (each trunk stage and the main exit) takes all its
  collections (parameters, BatchNorm statistics) from `trained`; the other exits' heads
  keep `fresh`'s. `trained`'s arrays are copied: a train step donates its state's buffers,
  and `trained` stays usable.

  Args:
    net: the multi-exit network.
    trained: ``{collection: {module: tree}}`` of the trained plain network, its modules
      named as `net`'s (``trunk_i`` and the last ``head_i``: the networks this library
      trains), or as the user's own model names them, with `rename`.
    fresh: every module's variables, e.g. ``nets.init(net, key)``.
    rename: {a top-level module name in `trained`: `net`'s name for it}, e.g.
      ``{"features": "trunk_0", "classifier": "head_1"}`` for a model whose submodules
      are `net`'s stages.

  Returns:
    `fresh` with the main path's subtrees replaced by `trained`'s.

  Raises:
    ValueError: `trained` lacks a main-path module's collection, holds a module that is
      not on the main path, or a leaf's name or shape differs (the first one named).
  """
  rename = rename or {}
  main = set(module_names(net.main_network()))
  out = {col: dict(tree) for col, tree in fresh.items()}
  for col, tree in trained.items():
    for name, subtree in tree.items():
      name = rename.get(name, name)
      if name not in main or name not in fresh.get(col, {}):
        raise ValueError(
            f"trained {col} hold module {name!r}, which {net.name}'s main path lacks (its "
            f"modules: {', '.join(sorted(main))}): map your names with rename={{...}}.")
      want, got = _leaf_shapes(fresh[col][name]), _leaf_shapes(subtree)
      if want != got:
        leaf = next(k for k in sorted(set(want) | set(got)) if want.get(k) != got.get(k))
        raise ValueError(
            f"trained {col}[{name!r}]{leaf} has shape {got.get(leaf, 'absent')} but "
            f"{net.name} needs {want.get(leaf, 'absent')}: the stage modules must be the "
            f"trained model's own.")
      out[col][name] = jax.tree.map(jnp.array, subtree)
  for col, tree in fresh.items():
    missing = sorted((main & set(tree)) - {rename.get(n, n) for n in trained.get(col, {})})
    if missing:
      raise ValueError(f"trained variables lack {col} of {', '.join(missing)} on "
                       f"{net.name}'s main path: pass every collection of every trunk "
                       f"stage and the main exit (rename maps other names).")
  return out


def main_logits(net: Network, variables: Variables, x: jax.Array) -> jax.Array:
  """The main path alone (every trunk stage + last head), in eval mode: (B, C)."""
  return forward(net.main_network(), variables, x)[0].logits[-1]


def check_images(net: Network, x: Any) -> None:
  """Raises a ValueError naming the problem if `x` is not a batch `net` accepts."""
  shape = tuple(np.shape(x))
  h, w, c = net.input_shape
  if len(shape) != 4:
    raise ValueError(f"{net.name} expects a batch of images (B, {h}, {w}, {c}); got shape "
                     f"{shape}. Add a batch axis with x[None] for a single image.")
  if shape[1:3] != (h, w):
    raise ValueError(f"{net.name} expects {h}x{w} images; got {shape[1]}x{shape[2]} "
                     f"(shape {shape}). Resize the input or pick a network for this size.")
  if shape[3] != c:
    raise ValueError(f"{net.name} expects {c} channel(s) in the last axis (NHWC); got "
                     f"{shape[3]} (shape {shape}).")
  dtype = np.dtype(getattr(x, "dtype", np.float32))
  if not jnp.issubdtype(dtype, jnp.floating):  # bfloat16 and float16 included.
    raise ValueError(f"{net.name} expects float images scaled as in training; got {dtype}. "
                     "Convert with bnet_jax.data.preprocess(dataset, images).")


def count_params(tree: Any) -> int:
  """Number of scalars in a pytree of arrays."""
  return sum(int(np.prod(np.shape(a))) for a in jax.tree.leaves(tree))
