"""oneDNN's convolutions, batch normalization and max pooling for JAX on CPU, through
XLA's FFI.

XLA:CPU's convolutions, and the transposes that feed its kernel gradient, take most of
a ResNet's train step on a CPU, and its BatchNorm sums much of the rest; oneDNN's
(what PyTorch uses there) are several times faster. `conv` runs a float32 NHWC
convolution with its bias and their gradients as oneDNN calls, `batch_norm` batch
normalization with batch statistics (and a ReLU after it, if asked) and its
gradients, `max_pool` max pooling and its gradient.

They are native code, built on first use from `onednn_ops.cc` with the machine's C++
compiler against oneDNN 3 (the extra ``pip install bnet-jax[onednn]`` brings its headers
and library on x86-64 Linux) and cached, keyed by everything the build read, under
``$BNET_JAX_CACHE`` (default ``~/.cache/bnet_jax``). Where any of that is missing,
`unavailable_reason` says what, and layer implementation "auto" keeps XLA's
convolutions and Flax's BatchNorm. ``BNET_ONEDNN=0`` turns it off; ``BNET_ONEDNN_ROOT``
names a oneDNN installation (a prefix with ``include/`` and ``lib/``) other than this
Python's.
"""

import ctypes
import functools
import hashlib
import os
import shutil
import subprocess
import sys
import sysconfig
import tempfile
from pathlib import Path

import jax
import jax.numpy as jnp
import jaxlib
import numpy as np
from jax import lax

_SOURCE = Path(__file__).with_name("onednn_ops.cc")
_LIBRARY = "libdnnl.so.3"
# FFI target names -> the handler symbols of onednn_ops.cc.
_TARGETS = {"bnet_onednn_conv_forward": "BnetOnednnConvForward",
            "bnet_onednn_conv_input_grad": "BnetOnednnConvInputGrad",
            "bnet_onednn_conv_kernel_grad": "BnetOnednnConvKernelGrad",
            "bnet_onednn_norm_forward": "BnetOnednnNormForward",
            "bnet_onednn_norm_backward": "BnetOnednnNormBackward",
            "bnet_onednn_pool_forward": "BnetOnednnPoolForward",
            "bnet_onednn_pool_backward": "BnetOnednnPoolBackward"}


class OnednnUnavailableError(ValueError):
  """oneDNN's operations cannot be used here; the message says why and what to do."""


def _prefixes() -> list[Path]:
  """Where to look for oneDNN: $BNET_ONEDNN_ROOT alone if set, else this Python's prefix, /usr."""
  if os.environ.get("BNET_ONEDNN_ROOT"):
    return [Path(os.environ["BNET_ONEDNN_ROOT"])]
  return [Path(sysconfig.get_paths()["data"]), Path(sys.prefix), Path("/usr")]


def _find_onednn() -> tuple[Path, Path]:
  """The include and library directories of a oneDNN 3 installation."""
  for prefix in _prefixes():
    include = prefix / "include"
    for lib in (prefix / "lib", prefix / "lib64", prefix / "lib" / "x86_64-linux-gnu"):
      if (include / "oneapi" / "dnnl" / "dnnl.hpp").is_file() and (lib / _LIBRARY).is_file():
        return include, lib
  where = ", ".join(str(p) for p in _prefixes())
  raise OnednnUnavailableError(
      f"no oneDNN 3 headers and {_LIBRARY} under {where}: pip install 'bnet-jax[onednn]' "
      "(x86-64 Linux), or set BNET_ONEDNN_ROOT to a oneDNN 3 installation.")


def _compiler() -> str:
  """The C++ compiler: $CXX, else g++ or c++ on PATH."""
  for name in (os.environ.get("CXX"), "g++", "c++"):
    if name and shutil.which(name):
      return shutil.which(name)
  raise OnednnUnavailableError("no C++ compiler (g++ or $CXX) to build the oneDNN "
                               "operations: install g++.")


def _cache_dir() -> Path:
  """Where built libraries are kept: $BNET_JAX_CACHE, else ~/.cache/bnet_jax."""
  root = os.environ.get("BNET_JAX_CACHE") or Path.home() / ".cache" / "bnet_jax"
  return Path(root)


def _build() -> Path:
  """The shared library of onednn_ops.cc for this JAX and oneDNN, built if not cached."""
  include, lib = _find_onednn()
  compiler = _compiler()
  jax_include = jax.ffi.include_dir()
  dnnl = (lib / _LIBRARY).resolve()
  key = hashlib.sha256()
  for part in (_SOURCE.read_bytes(), jaxlib.__version__.encode(), str(jax_include).encode(),
               compiler.encode(), str(dnnl).encode(), str(dnnl.stat().st_size).encode(),
               (include / "oneapi" / "dnnl" / "dnnl_version.h").read_bytes()):
    key.update(part)
  target = _cache_dir() / f"onednn_ops-{key.hexdigest()[:16]}.so"
  if target.is_file():
    return target
  target.parent.mkdir(parents=True, exist_ok=True)
  # Built beside the target and renamed into place: concurrent builders never see half a file.
  with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
    built = Path(tmp) / target.name
    command = [compiler, "-O2", "-std=c++17", "-shared", "-fPIC", f"-I{jax_include}",
               f"-I{include}", str(_SOURCE), "-o", str(built), f"-L{lib}", f"-l:{_LIBRARY}",
               f"-Wl,-rpath,{lib}"]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode:
      errors = [line for line in done.stderr.splitlines() if "error" in line] or [""]
      raise OnednnUnavailableError(
          f"building the oneDNN operations failed ({Path(compiler).name} exit "
          f"{done.returncode}: {errors[0].strip()}); set BNET_ONEDNN=0 to use XLA's.")
    os.replace(built, target)
  return target


@functools.cache
def _library() -> ctypes.CDLL:
  """The built library, loaded, with its handlers registered with JAX (once a process)."""
  if os.environ.get("BNET_ONEDNN", "1") == "0":
    raise OnednnUnavailableError("turned off by BNET_ONEDNN=0.")
  if sys.platform != "linux":
    raise OnednnUnavailableError(f"built on Linux only, not {sys.platform}.")
  library = ctypes.CDLL(str(_build()))
  library.bnet_onednn_norm_relu_workspace_bytes.restype = ctypes.c_int64
  for target, symbol in _TARGETS.items():
    jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(getattr(library, symbol)),
                                platform="cpu")
  return library


@functools.cache
def unavailable_reason() -> str | None:
  """Why oneDNN's operations cannot be used here (None: they can; builds them if needed)."""
  try:
    _library()
  except OnednnUnavailableError as e:
    return str(e)
  except OSError as e:  # An unwritable cache, a library that does not load, ...
    return f"the oneDNN operations cannot be built or loaded: {e}"
  return None


def available() -> bool:
  """Whether `conv` and `batch_norm` run oneDNN's calls here (builds them on first use)."""
  return unavailable_reason() is None


def version() -> str:
  """The oneDNN version the convolutions run on, e.g. "3.2.0"."""
  v = _library().bnet_onednn_version()
  return f"{v // 10000}.{v // 100 % 100}.{v % 100}"


def _check_usable(instead: str) -> None:
  """Raises `OnednnUnavailableError` unless the oneDNN calls can run on this platform."""
  reason = (unavailable_reason() if jax.default_backend() == "cpu"
            else f"it runs on the CPU only, and JAX computes on {jax.default_backend()}.")
  if reason:
    raise OnednnUnavailableError(f"layer implementation 'onednn' cannot run here: {reason} "
                                 f"Use {instead}.")


def _attributes(strides: tuple[int, int], padding: tuple[int, int, int, int]) -> dict:
  (sh, sw), (pt, pb, pl, pr) = strides, padding
  return {name: np.int64(v) for name, v in zip(
      ("stride_h", "stride_w", "pad_top", "pad_bottom", "pad_left", "pad_right"),
      (sh, sw, pt, pb, pl, pr))}


def _output_hw(x_shape: tuple[int, ...], window: tuple[int, int], strides: tuple[int, int],
               padding: tuple[int, int, int, int]) -> tuple[int, int]:
  """(OH, OW) of a convolution or pooling window sliding over x (B, H, W, C)."""
  (_, h, w, _), (kh, kw), (sh, sw), (pt, pb, pl, pr) = x_shape, window, strides, padding
  return (h + pt + pb - kh) // sh + 1, (w + pl + pr - kw) // sw + 1


def _forward(x: jax.Array, kernel: jax.Array, bias: jax.Array, strides: tuple[int, int],
             padding: tuple[int, int, int, int]) -> jax.Array:
  oh, ow = _output_hw(x.shape, kernel.shape[:2], strides, padding)
  out = jax.ShapeDtypeStruct((x.shape[0], oh, ow, kernel.shape[3]), jnp.float32)
  return jax.ffi.ffi_call("bnet_onednn_conv_forward", out)(
      x, kernel, bias, **_attributes(strides, padding))


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _conv(x: jax.Array, kernel: jax.Array, bias: jax.Array, strides: tuple[int, int],
          padding: tuple[int, int, int, int]) -> jax.Array:
  return _forward(x, kernel, bias, strides, padding)


def _conv_fwd(x, kernel, bias, strides, padding):
  return _forward(x, kernel, bias, strides, padding), (x, kernel)


def _conv_bwd(strides, padding, residuals, g):
  x, kernel = residuals
  attributes = _attributes(strides, padding)
  dx = jax.ffi.ffi_call("bnet_onednn_conv_input_grad", jax.ShapeDtypeStruct(x.shape, x.dtype))(
      g, kernel, **attributes)
  dkernel, dbias = jax.ffi.ffi_call(
      "bnet_onednn_conv_kernel_grad",
      (jax.ShapeDtypeStruct(kernel.shape, kernel.dtype),
       jax.ShapeDtypeStruct(kernel.shape[-1:], kernel.dtype)))(x, g, **attributes)
  return dx, dkernel, dbias


_conv.defvjp(_conv_fwd, _conv_bwd)


def conv(x: jax.Array, kernel: jax.Array, strides: tuple[int, int] = (1, 1),
         padding: tuple[tuple[int, int], tuple[int, int]] = ((0, 0), (0, 0)),
         bias: jax.Array | None = None) -> jax.Array:
  """`lax.conv_general_dilated` (NHWC, HWIO) plus `bias` as oneDNN calls, forward and
  gradients.

  The bias is added, and its gradient summed, inside the convolution's own calls.
  Other dtypes than float32 run XLA's convolution: the oneDNN calls are float32 only.

  Args:
    x: (B, H, W, C_in).
    kernel: (KH, KW, C_in, C_out), HWIO.
    strides: (stride_h, stride_w).
    padding: ((top, bottom), (left, right)) zeros.
    bias: (C_out,), or None for none.

  Returns:
    (B, (H + top + bottom - KH) // stride_h + 1, (W + left + right - KW) // stride_w + 1,
    C_out).

  Raises:
    OnednnUnavailableError: float32 operands and no oneDNN here (`unavailable_reason`),
      or a platform other than the CPU.
  """
  if bias is None:
    bias = jnp.zeros(kernel.shape[-1:], kernel.dtype)
  if x.dtype != jnp.float32 or kernel.dtype != jnp.float32 or bias.dtype != jnp.float32:
    return lax.conv_general_dilated(x, kernel, strides, padding,
                                    dimension_numbers=("NHWC", "HWIO", "NHWC")) + bias
  _check_usable("'auto' or 'xla'")
  (pt, pb), (pl, pr) = padding
  return _conv(x, kernel, bias, tuple(int(s) for s in strides),
               (int(pt), int(pb), int(pl), int(pr)))


def _norm_results(x: jax.Array, scale: jax.Array) -> tuple[jax.ShapeDtypeStruct, ...]:
  """What both BatchNorm calls return first: one x-shaped array and two per-channel ones."""
  channels = jax.ShapeDtypeStruct(scale.shape, jnp.float32)
  return jax.ShapeDtypeStruct(x.shape, jnp.float32), channels, channels


def _norm_workspace(x: jax.Array, epsilon: float, relu: bool) -> jax.ShapeDtypeStruct:
  """The bytes in which the forward records where its ReLU passed (none without one)."""
  if not relu:
    return jax.ShapeDtypeStruct((0,), jnp.uint8)
  size = _library().bnet_onednn_norm_relu_workspace_bytes(
      *(ctypes.c_int64(d) for d in x.shape), ctypes.c_float(epsilon))
  if size < 0:
    raise OnednnUnavailableError(f"oneDNN {version()} has no batch normalization with a "
                                 f"ReLU for {x.shape}; use relu=False.")
  return jax.ShapeDtypeStruct((size,), jnp.uint8)


def _norm_forward(x: jax.Array, scale: jax.Array, shift: jax.Array, epsilon: float,
                  relu: bool) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
  return jax.ffi.ffi_call("bnet_onednn_norm_forward",
                          (*_norm_results(x, scale), _norm_workspace(x, epsilon, relu)))(
      x, scale, shift, epsilon=np.float32(epsilon), relu=relu)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _batch_norm(x: jax.Array, scale: jax.Array, shift: jax.Array, epsilon: float, relu: bool
                ) -> tuple[jax.Array, jax.Array, jax.Array]:
  return _norm_forward(x, scale, shift, epsilon, relu)[:3]


def _batch_norm_fwd(x, scale, shift, epsilon, relu):
  y, mean, variance, workspace = _norm_forward(x, scale, shift, epsilon, relu)
  return (y, mean, variance), (x, scale, mean, variance, workspace)


def _batch_norm_bwd(epsilon, relu, residuals, cotangents):
  # The statistics' cotangents are dropped: they feed only the running averages.
  x, scale, mean, variance, workspace = residuals
  return jax.ffi.ffi_call("bnet_onednn_norm_backward", _norm_results(x, scale))(
      x, cotangents[0], mean, variance, scale, workspace, epsilon=np.float32(epsilon),
      relu=relu)


_batch_norm.defvjp(_batch_norm_fwd, _batch_norm_bwd)


def batch_norm(x: jax.Array, scale: jax.Array, shift: jax.Array, epsilon: float,
               relu: bool = False) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Batch normalization with batch statistics as oneDNN calls, forward and gradients.

  y = (x - mean) / sqrt(variance + epsilon) * scale + shift, the statistics over (B, H,
  W) per channel, and then max(y, 0) with `relu`, in the same call; the gradients
  reach x, scale and shift (not through the statistics returned, which only feed
  running averages).

  Args:
    x: (B, H, W, C) float32.
    scale, shift: (C,) float32.
    epsilon: added to the variance.
    relu: apply a ReLU to the result (its gradient rides on a bitmask of x's size).

  Returns:
    y (B, H, W, C), mean (C,) and biased variance (C,).

  Raises:
    OnednnUnavailableError: no oneDNN here (`unavailable_reason`), or not the CPU.
  """
  _check_usable("norm_impl='flax'")
  return _batch_norm(x, scale, shift, float(epsilon), bool(relu))


def _pool_attributes(window: int, stride: int, padding: tuple[int, int, int, int]) -> dict:
  """A convolution's attributes (`_attributes`) and the window's sides."""
  return {"window_h": np.int64(window), "window_w": np.int64(window),
          **_attributes((stride, stride), padding)}


def _pool_forward(x: jax.Array, window: int, stride: int, padding: tuple[int, int, int, int]
                  ) -> tuple[jax.Array, jax.Array]:
  n, _, _, c = x.shape
  shape = (n, *_output_hw(x.shape, (window, window), (stride, stride), padding), c)
  # The workspace: for each output, which input of its window was the max (one byte).
  return jax.ffi.ffi_call("bnet_onednn_pool_forward", (
      jax.ShapeDtypeStruct(shape, jnp.float32), jax.ShapeDtypeStruct(shape, jnp.uint8)))(
          x, **_pool_attributes(window, stride, padding))


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2, 3, 4))
def _max_pool(x: jax.Array, window: int, stride: int, padding: tuple[int, int, int, int],
              x_shape: tuple[int, ...]) -> jax.Array:
  return _pool_forward(x, window, stride, padding)[0]


def _max_pool_fwd(x, window, stride, padding, x_shape):
  y, workspace = _pool_forward(x, window, stride, padding)
  return y, workspace


def _max_pool_bwd(window, stride, padding, x_shape, workspace, g):
  return (jax.ffi.ffi_call("bnet_onednn_pool_backward",
                           jax.ShapeDtypeStruct(x_shape, jnp.float32))(
      g, workspace, **_pool_attributes(window, stride, padding)),)


_max_pool.defvjp(_max_pool_fwd, _max_pool_bwd)


def max_pool(x: jax.Array, window: int, stride: int,
             padding: tuple[tuple[int, int], tuple[int, int]] = ((0, 0), (0, 0))) -> jax.Array:
  """Max pooling of square windows as oneDNN calls, forward and gradient.

  Padding never wins (as -inf padding). The gradient goes to one max of each window
  (where a window has several equal maxima, to one of them), through a one-byte
  workspace per output that the forward writes.

  Args:
    x: (B, H, W, C) float32.
    window: side of the square window (at most 15: the workspace holds its index).
    stride: step of the window in both directions.
    padding: ((top, bottom), (left, right)), each less than `window`.

  Returns:
    (B, (H + top + bottom - window) // stride + 1, (W + left + right - window) // stride
    + 1, C).

  Raises:
    ValueError: a window over 15.
    OnednnUnavailableError: no oneDNN here (`unavailable_reason`), or not the CPU.
  """
  if window > 15:
    raise ValueError(f"onednn.max_pool takes windows up to 15 (its workspace holds the "
                     f"max's index in one byte); got {window}. Pool with XLA instead.")
  _check_usable("'auto' or 'xla'")
  (pt, pb), (pl, pr) = padding
  return _max_pool(x, int(window), int(stride), (int(pt), int(pb), int(pl), int(pr)),
                   x.shape)
