"""Our networks transcribed to PyTorch (NCHW), for `experiments.benchmark_pytorch`'s peer timing.

Each builder mirrors a `bnet_jax.nets` constructor layer for layer: the same
convolutions (kernel, stride, symmetric padding, bias), BatchNorm (Flax's momentum
0.9 is PyTorch's 0.1; epsilon 1e-5), ceil-mode pooling, Chainer's LRN, dropout and
dense layers, with the same structural options (``depth``, ``placement``,
``exit_heads``, ``input_shape`` as (H, W, C), ``num_classes``). A network is a
`MultiExit`: modules named as our variables are (``trunk_i``, ``head_i``), so counts
compare module by module, and a forward pass returns one logits tensor per exit.
Dense layers take their input size from a probe of what precedes them, as Flax's
shape inference does. Weights keep PyTorch's initialisation: timing does not depend on
them. Only the benchmark imports this module (PyTorch is not a bnet-jax dependency).
"""

import re
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F  # noqa: N812

# Options of our networks that choose how a layer computes, not what: PyTorch has one way.
_IMPLEMENTATION_OPTION = re.compile(r".*_(impl|kernel_grad)$")


class MultiExit(nn.Module):
  """Trunk stages, each optionally followed by an exit head, as `nets.Network`."""

  def __init__(self, modules: dict[str, nn.Module]):
    super().__init__()
    self.stages = nn.ModuleDict(modules)  # trunk_0, head_0, trunk_1, ...
    self.num_stages = sum(name.startswith("trunk_") for name in modules)

  def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
    """(B, C, H, W) -> every exit's (B, num_classes) logits, in order."""
    logits = []
    for i in range(self.num_stages):
      x = self.stages[f"trunk_{i}"](x)
      if f"head_{i}" in self.stages:
        logits.append(self.stages[f"head_{i}"](x))
    return logits

  def main_network(self) -> "MultiExit":
    """The plain network: the same modules less the inner exits' heads."""
    last = f"head_{self.num_stages - 1}"
    return MultiExit({name: m for name, m in self.stages.items()
                      if not name.startswith("head_") or name == last})


def _probe(module: nn.Module, shape: Sequence[int]) -> torch.Size:
  """The (C, H, W) or (F,) shape `module` maps a (C, H, W) input to (eval mode, no grad)."""
  training = module.training
  module.eval()
  with torch.no_grad():
    out = module(torch.zeros(1, *shape)).shape[1:]
  module.train(training)
  return out


class _Lambda(nn.Module):
  """A parameter-free function as a module, so stages stay `nn.Sequential`s."""

  def __init__(self, fn: Callable[[torch.Tensor], torch.Tensor]):
    super().__init__()
    self.fn = fn

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    return self.fn(x)


def _flatten_dense(features: nn.Module, in_shape: Sequence[int], out: int) -> nn.Sequential:
  """`features`, flatten, Linear to `out`: the Linear sized from a probe."""
  flat = _probe(features, in_shape).numel()
  return nn.Sequential(features, nn.Flatten(), nn.Linear(flat, out))


def _batch_norm(channels: int) -> nn.BatchNorm2d:
  """Flax's BatchNorm(momentum=0.9, epsilon=1e-5): running = 0.9 running + 0.1 batch."""
  return nn.BatchNorm2d(channels, eps=1e-5, momentum=0.1)


def paper_lrn() -> nn.LocalResponseNorm:
  """`bnet_jax.nets.lrn.paper_lrn` (Chainer's n=3, k=2, alpha=5e-5, beta=0.75).

  Chainer scales the window's sum of squares by alpha; PyTorch scales its mean (over
  `size` channels, zeros past the edges counted), so alpha is multiplied by 3.
  """
  return nn.LocalResponseNorm(3, alpha=3 * 5e-5, beta=0.75, k=2.0)


def _global_mean(x: torch.Tensor) -> torch.Tensor:
  return x.mean(dim=(2, 3))


# B-LeNet (bnet_jax.nets.lenet).

def _pool2_relu(x: torch.Tensor) -> torch.Tensor:
  """`layers.Conv(pool=2)`'s ceil-mode 2x2 max pool, then the ReLU."""
  return F.relu(F.max_pool2d(x, 2, ceil_mode=True))


class LeNetStage1(nn.Module):
  """conv1 C->5 5x5 pad 3, pool, ReLU: (B, 1, 28, 28) -> (B, 5, 15, 15)."""

  def __init__(self, channels: int):
    super().__init__()
    self.conv1 = nn.Conv2d(channels, 5, 5, padding=3)

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    return _pool2_relu(self.conv1(x))


class LeNetExit1(nn.Module):
  """conv 5->10 3x3 pad 1, pool, ReLU, FC: (B, 5, 15, 15) -> (B, num_classes)."""

  def __init__(self, in_shape: Sequence[int], num_classes: int):
    super().__init__()
    self.exit_conv = nn.Conv2d(in_shape[0], 10, 3, padding=1)
    flat = _probe(nn.Sequential(self.exit_conv, _Lambda(_pool2_relu)), in_shape).numel()
    self.exit_fc = nn.Linear(flat, num_classes)

  def forward(self, h: torch.Tensor) -> torch.Tensor:
    return self.exit_fc(_pool2_relu(self.exit_conv(h)).flatten(1))


class LeNetStage2(nn.Module):
  """conv 5->10 and 10->20 (5x5 pad 3, each pooled and ReLU'd), FC to 84."""

  def __init__(self, in_shape: Sequence[int]):
    super().__init__()
    self.conv2 = nn.Conv2d(in_shape[0], 10, 5, padding=3)
    self.conv3 = nn.Conv2d(10, 20, 5, padding=3)
    convs = nn.Sequential(self.conv2, _Lambda(_pool2_relu), self.conv3, _Lambda(_pool2_relu))
    self.fc1 = nn.Linear(_probe(convs, in_shape).numel(), 84)

  def forward(self, h: torch.Tensor) -> torch.Tensor:
    return self.fc1(_pool2_relu(self.conv3(_pool2_relu(self.conv2(h)))).flatten(1))


def b_lenet(*, input_shape: Sequence[int] = (28, 28, 1), num_classes: int = 10) -> MultiExit:
  """`bnet_jax.nets.lenet.b_lenet`: exit 1 after conv1's pool, main exit FC 84->classes
  with no ReLU between the FC layers (the code's)."""
  h, w, c = input_shape
  stage1 = LeNetStage1(c)
  shape1 = _probe(stage1, (c, h, w))
  stage2 = LeNetStage2(shape1)
  return MultiExit({"trunk_0": stage1, "head_0": LeNetExit1(shape1, num_classes),
                    "trunk_1": stage2, "head_1": nn.Linear(84, num_classes)})


# B-ResNet (bnet_jax.nets.resnet).

class ResBlock(nn.Module):
  """conv 3x3 pad 1 (stride s) + BN + ReLU, conv 3x3 pad 1 + BN, option-A shortcut, ReLU."""

  def __init__(self, in_channels: int, features: int, stride: int = 1):
    super().__init__()
    self.stride = stride
    self.conv1 = nn.Conv2d(in_channels, features, 3, stride=stride, padding=1)
    self.bn1 = _batch_norm(features)
    self.conv2 = nn.Conv2d(features, features, 3, padding=1)
    self.bn2 = _batch_norm(features)

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    h = F.relu(self.bn1(self.conv1(x)))
    h = self.bn2(self.conv2(h))
    if x.shape != h.shape:  # Option A: subsample, prepend zero channels; no parameters.
      x = x[:, :, ::self.stride, ::self.stride]
      x = F.pad(x, (0, 0, 0, 0, h.shape[1] - x.shape[1], 0))
    return F.relu(h + x)


def _resnet_trunk(in_channels: int, stem: bool, blocks: Sequence[tuple[int, int]],
                  pool: bool) -> nn.Sequential:
  """`resnet.Trunk`: [stem conv C->16 3x3 pad 0 + BN + ReLU], blocks, [6x6 avg pool, flatten]."""
  layers: list[nn.Module] = []
  if stem:
    layers += [nn.Conv2d(in_channels, 16, 3, padding=0), _batch_norm(16), nn.ReLU()]
    in_channels = 16
  for features, stride in blocks:
    layers.append(ResBlock(in_channels, features, stride))
    in_channels = features
  if pool:
    layers += [nn.AvgPool2d(6, stride=1), nn.Flatten()]
  return nn.Sequential(*layers)


def _resnet_exit1(in_shape: Sequence[int], num_classes: int) -> nn.Sequential:
  """`resnet.Exit1`: conv 64 5x5 pad 2, ReLU, LRN, conv 32 3x3 + ReLU, conv 32 + ReLU, FC."""
  features = nn.Sequential(nn.Conv2d(in_shape[0], 64, 5, padding=2), nn.ReLU(), paper_lrn(),
                           nn.Conv2d(64, 32, 3, padding=1), nn.ReLU(),
                           nn.Conv2d(32, 32, 3, padding=1), nn.ReLU())
  return _flatten_dense(features, in_shape, num_classes)


def _resnet_exit2(in_shape: Sequence[int], num_classes: int) -> nn.Sequential:
  """`resnet.Exit2`: one residual block 16->16, FC."""
  return _flatten_dense(ResBlock(in_shape[0], 16), in_shape, num_classes)


def _resnet_trunk_exit(in_shape: Sequence[int], num_classes: int) -> nn.Sequential:
  """`resnet.TrunkExit`: conv 2C 3x3 stride 2 pad 1 + BN + ReLU, global mean, FC 2C->classes."""
  c = in_shape[0]
  return nn.Sequential(nn.Conv2d(c, 2 * c, 3, stride=2, padding=1), _batch_norm(2 * c),
                       nn.ReLU(), _Lambda(_global_mean), nn.Linear(2 * c, num_classes))


def b_resnet(depth: int = 110, placement: str = "code", *,
             input_shape: Sequence[int] = (32, 32, 3), num_classes: int = 10,
             exit_heads: str = "authors") -> MultiExit:
  """`bnet_jax.nets.resnet.b_resnet` (its checks are not repeated: build ours first)."""
  n = (depth - 2) // 6
  first = 1 if placement == "paper" else 0  # Blocks at 16 channels before exit 1.

  def stage(features: int) -> tuple[tuple[int, int], ...]:
    return tuple((features, 2 if i == 0 and features > 16 else 1) for i in range(n))

  h, w, c = input_shape
  trunk0 = _resnet_trunk(c, True, stage(16)[:first], False)
  trunk1 = _resnet_trunk(16, False, stage(16)[first:], False)
  trunk2 = _resnet_trunk(16, False, stage(32) + stage(64), True)
  shape0 = _probe(trunk0, (c, h, w))
  shape2 = _probe(nn.Sequential(trunk0, trunk1, trunk2), (c, h, w))
  if exit_heads == "authors":
    heads = _resnet_exit1(shape0, num_classes), _resnet_exit2(shape0, num_classes)
  else:
    heads = _resnet_trunk_exit(shape0, num_classes), _resnet_trunk_exit(shape0, num_classes)
  return MultiExit({"trunk_0": trunk0, "head_0": heads[0], "trunk_1": trunk1,
                    "head_1": heads[1], "trunk_2": trunk2,
                    "head_2": nn.Linear(shape2.numel(), num_classes)})


# B-AlexNet (bnet_jax.nets.alexnet).

def _max_pool_3x3_s2(x: torch.Tensor) -> torch.Tensor:
  """`alexnet.max_pool_3x3_s2`: 3x3 stride 2, rounding up (Chainer's cover_all): H -> H // 2."""
  return F.max_pool2d(x, 3, stride=2, ceil_mode=True)


def _alexnet_trunk(in_shape: Sequence[int], blocks: Sequence[str]) -> nn.Sequential:
  """`alexnet.Trunk` on (C, H, W) inputs: conv1, conv2 [conv, ReLU, pool, LRN], conv3 [conv,
  ReLU], top [conv4, conv5 (each + ReLU), pool, fc1 256, fc2 128 (each + ReLU + dropout)]."""
  layers: list[nn.Module] = []
  channels = in_shape[0]
  for block in blocks:
    if block == "conv1":
      layers += [nn.Conv2d(channels, 32, 5, padding=2), nn.ReLU(),
                 _Lambda(_max_pool_3x3_s2), paper_lrn()]
      channels = 32
    elif block == "conv2":
      layers += [nn.Conv2d(channels, 64, 5, padding=2), nn.ReLU(),
                 _Lambda(_max_pool_3x3_s2), paper_lrn()]
      channels = 64
    elif block == "conv3":
      layers += [nn.Conv2d(channels, 96, 3, padding=1), nn.ReLU()]
      channels = 96
    elif block == "top":
      layers += [nn.Conv2d(channels, 96, 3, padding=1), nn.ReLU(),
                 nn.Conv2d(96, 64, 3, padding=1), nn.ReLU(),
                 _Lambda(_max_pool_3x3_s2), nn.Flatten()]
      flat = _probe(nn.Sequential(*layers), in_shape).numel()
      layers += [nn.Linear(flat, 256), nn.ReLU(), nn.Dropout(0.5),
                 nn.Linear(256, 128), nn.ReLU(), nn.Dropout(0.5)]
    else:
      raise ValueError(f"Unknown AlexNet block {block!r}.")
  return nn.Sequential(*layers)


def _alexnet_branch(in_shape: Sequence[int], num_convs: int, pool_first: bool,
                    num_classes: int) -> nn.Sequential:
  """`alexnet.Branch`: [pool, LRN], `num_convs` x (conv 32 3x3 pad 1 + ReLU), pool, FC."""
  layers: list[nn.Module] = []
  if pool_first:
    layers += [_Lambda(_max_pool_3x3_s2), paper_lrn()]
  channels = in_shape[0]
  for _ in range(num_convs):
    layers += [nn.Conv2d(channels, 32, 3, padding=1), nn.ReLU()]
    channels = 32
  layers.append(_Lambda(_max_pool_3x3_s2))
  return _flatten_dense(nn.Sequential(*layers), in_shape, num_classes)


def _alexnet_trunk_branch(in_shape: Sequence[int], num_classes: int) -> nn.Sequential:
  """`alexnet.TrunkBranch`: conv 32 3x3 pad 1 + ReLU, global mean, FC 32->classes."""
  return nn.Sequential(nn.Conv2d(in_shape[0], 32, 3, padding=1), nn.ReLU(),
                       _Lambda(_global_mean), nn.Linear(32, num_classes))


def b_alexnet(placement: str = "code", *, input_shape: Sequence[int] = (32, 32, 3),
              num_classes: int = 10, exit_heads: str = "authors") -> MultiExit:
  """`bnet_jax.nets.alexnet.b_alexnet` (its checks are not repeated: build ours first)."""
  h, w, c = input_shape
  if placement == "code":
    blocks = (("conv1", "conv2"), ("conv3",), ("top",))
  else:
    blocks = (("conv1",), ("conv2",), ("conv3", "top"))
  modules: dict[str, nn.Module] = {}
  shape: Sequence[int] = (c, h, w)
  for i, stage_blocks in enumerate(blocks):
    trunk = _alexnet_trunk(shape, stage_blocks)
    modules[f"trunk_{i}"] = trunk
    shape = _probe(trunk, shape)
    if i == 2:
      modules["head_2"] = nn.Linear(shape[0], num_classes)  # fc3.
    elif exit_heads == "authors":  # Exit 2 pools first where the trunk does not pool next.
      modules[f"head_{i}"] = _alexnet_branch(shape, 2 - i, i == 1 and placement == "code",
                                             num_classes)
    else:
      modules[f"head_{i}"] = _alexnet_trunk_branch(shape, num_classes)
  return MultiExit(modules)


_BUILDERS: dict[str, Callable[..., MultiExit]] = {
    "b_lenet": b_lenet,
    "lenet": lambda **o: b_lenet(**o).main_network(),
    "b_alexnet": b_alexnet,
    "alexnet": lambda **o: b_alexnet(**o, exit_heads="trunk").main_network(),
    "b_resnet": b_resnet,
    "resnet": lambda **o: b_resnet(**o).main_network(),
}


def names() -> list[str]:
  """Networks transcribed here, by their `bnet_jax.nets` registry names."""
  return sorted(_BUILDERS)


def get(name: str, **options: Any) -> MultiExit:
  """The PyTorch transcription of registered network `name` with our keyword `options`.

  Layer-implementation options (``*_impl``, ``*_kernel_grad``) are ignored: they change
  how our layers compute, not what. Build ours with the same options first: the
  option checks (depth 6n + 2, smallest input side) are ours.

  Raises:
    ValueError: a network not transcribed, a dtype other than float32, or an option
      the transcription does not take.
  """
  if name not in _BUILDERS:
    raise ValueError(f"No PyTorch transcription of {name!r} in experiments/torch_nets.py; "
                     f"it has {names()}.")
  if str(options.pop("dtype", "float32")) != "float32":
    raise ValueError("the PyTorch peer computes in float32 only: leave the dtype option out.")
  options = {k: v for k, v in options.items() if not _IMPLEMENTATION_OPTION.match(k)}
  try:
    return _BUILDERS[name](**options)
  except TypeError as e:
    raise ValueError(f"Bad options {options} for the PyTorch {name!r}: {e}") from e
