"""Every layer implementation against its plain reference, values and gradients."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from bnet_jax.nets import layers

# (batch, size, C_in, C_out, kernel, padding): B-LeNet's shapes, shrunk, and odd cases.
CONV_CASES = [(2, 12, 1, 5, 5, 3), (2, 9, 5, 10, 3, 1), (1, 9, 10, 20, 5, 3), (2, 7, 3, 4, 3, 0),
              (1, 5, 2, 3, 1, 2)]


def _reference_conv(kernel, bias, x, pad):
  return lax.conv_general_dilated(x, kernel, (1, 1), [(pad, pad)] * 2,
                                  dimension_numbers=("NHWC", "HWIO", "NHWC")) + bias


@pytest.fixture(scope="module", params=CONV_CASES, ids=str)
def conv_case(request):
  """Inputs, output cotangent, and the reference output and gradients of one case."""
  b, size, cin, cout, k, pad = request.param
  rng = np.random.default_rng(0)
  kernel, bias, x = (jnp.asarray(rng.standard_normal(s), jnp.float32)
                     for s in ((k, k, cin, cout), (cout,), (b, size, size, cin)))
  ho = size + 2 * pad - k + 1
  g = jnp.asarray(rng.standard_normal((b, ho, ho, cout)), jnp.float32)
  loss = lambda kernel, bias, x: jnp.sum(_reference_conv(kernel, bias, x, pad) * g)
  grads = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(kernel, bias, x)
  return request.param, (kernel, bias, x), g, _reference_conv(kernel, bias, x, pad), grads


# Implementations that need no pool, with every kernel gradient they take.
UNPOOLED = [(name, grad) for name, impl in layers.CONV_IMPLS.items() if not impl.needs_pool
            for grad in layers.KERNEL_GRADS
            if grad == "autodiff" or not (impl.fuses_pool or impl.adds_bias)]
POOL_ONLY = tuple(name for name, impl in layers.CONV_IMPLS.items() if impl.needs_pool)


def test_every_implementation_is_described():
  for name, impl in layers.CONV_IMPLS.items():
    assert isinstance(impl, layers.ConvImpl) and callable(impl.forward), name
    assert impl.description and "\n" not in impl.description, name
  assert POOL_ONLY and all(layers.CONV_IMPLS[n].fuses_pool for n in POOL_ONLY)
  for name, description in layers.STRIDED_CONV_IMPLS.items():
    assert description and "\n" not in description, name


@pytest.mark.parametrize("impl,kernel_grad", UNPOOLED, ids="/".join)
def test_conv_matches_lax(conv_case, impl, kernel_grad):
  (_, _, _, cout, k, pad), args, g, want, want_grads = conv_case
  conv = layers.Conv(cout, k, padding=pad, impl=impl, kernel_grad=kernel_grad)
  ours = lambda kernel, bias, x: conv.apply({"params": {"kernel": kernel, "bias": bias}}, x)
  grad = jax.jit(jax.grad(lambda *a: jnp.sum(ours(*a) * g), (0, 1, 2)))
  np.testing.assert_allclose(jax.jit(ours)(*args), want, atol=1e-5, rtol=1e-5)
  for got, ref in zip(grad(*args), want_grads):
    np.testing.assert_allclose(got, ref, atol=1e-4 * float(jnp.max(jnp.abs(ref))), rtol=1e-4)


def _numpy_pool_ceil(x: np.ndarray, window: int) -> np.ndarray:
  """Brute-force max over each window's covered pixels (Chainer's cover_all)."""
  b, h, w, c = x.shape
  ho, wo = -(-h // window), -(-w // window)
  out = np.empty((b, ho, wo, c), x.dtype)
  for i in range(ho):
    for j in range(wo):
      out[:, i, j] = x[:, i * window:(i + 1) * window, j * window:(j + 1) * window].max((1, 2))
  return out


@pytest.mark.parametrize("impl", ("shifted_sum", "im2col_batch_last") + POOL_ONLY)
@pytest.mark.parametrize("pool", [2, 3])
def test_pooled_conv_matches_conv_then_numpy_pool(conv_case, impl, pool):
  """Conv(pool=p) = lax conv, then ceil max pooling; odd sizes exercise the ragged edge."""
  (_, _, _, cout, k, pad), (kernel, bias, x), _, want, _ = conv_case
  conv = layers.Conv(cout, k, padding=pad, impl=impl, pool=pool)
  variables = {"params": {"kernel": kernel, "bias": bias}}
  got = jax.jit(conv.apply)(variables, x)
  np.testing.assert_allclose(got, _numpy_pool_ceil(np.asarray(want), pool), atol=1e-5, rtol=1e-5)
  ref = layers.Conv(cout, k, padding=pad, impl="xla", pool=pool)
  grads = lambda m: jax.jit(jax.grad(lambda v, x: jnp.sum(m.apply(v, x) ** 2), (0, 1)))(
      variables, x)
  (got_v, got_x), (want_v, want_x) = grads(conv), grads(ref)
  for g, want_g in ((got_v["params"]["kernel"], want_v["params"]["kernel"]), (got_x, want_x)):
    np.testing.assert_allclose(g, want_g, atol=1e-3 * float(jnp.max(jnp.abs(want_g))), rtol=1e-4)


@pytest.mark.parametrize("options,match", [
    ({"impl": "pool_phase"}, "pool >= 2"),
    ({"impl": "pool_phase", "pool": 2, "kernel_grad": "dot"}, "only be 'autodiff'"),
    ({"impl": "onednn", "kernel_grad": "dot"}, "only be 'autodiff'"),  # Adds the bias.
    ({"impl": "phase", "pool": 2}, "Unknown conv impl 'phase'"),  # Old names: nets.get only.
    ({"kernel_grad": "fft"}, "Unknown kernel_grad 'fft'"),
])
def test_impossible_implementations_are_refused(options, match):
  with pytest.raises(ValueError, match=match):
    layers.Conv(4, 3, **options).init(jax.random.key(0), jnp.ones((1, 6, 6, 1)))


# (size_h, size_w, C_in, C_out, kernel, stride, padding): ResNet's stride-2 3x3 convs
# (even and odd sides), an unpadded one, a kernel that the stride divides (cropping the
# far edge), and stride 3.
STRIDED_CASES = [(10, 10, 4, 8, 3, 2, 1), (7, 7, 8, 16, 3, 2, 1), (7, 9, 3, 5, 3, 2, 0),
                 (9, 8, 2, 3, 2, 2, 0), (11, 11, 2, 4, 5, 3, 2)]


@pytest.mark.parametrize("case", STRIDED_CASES, ids=str)
def test_strided_conv_implementations_match_lax(case):
  h, w, cin, cout, k, stride, pad = case
  rng = np.random.default_rng(0)
  kernel, bias, x = (jnp.asarray(rng.standard_normal(s), jnp.float32)
                     for s in ((k, k, cin, cout), (cout,), (2, h, w, cin)))
  variables = {"params": {"kernel": kernel, "bias": bias}}
  want = lax.conv_general_dilated(x, kernel, (stride, stride), [(pad, pad)] * 2,
                                  dimension_numbers=("NHWC", "HWIO", "NHWC")) + bias
  g = jnp.asarray(rng.standard_normal(want.shape), jnp.float32)
  grads = lambda m: jax.jit(jax.grad(lambda v, x: jnp.sum(m.apply(v, x) * g), (0, 1)))(
      variables, x)
  want_grads = grads(layers.StridedConv(cout, k, padding=pad, stride=stride, impl="xla"))
  for impl in layers.STRIDED_CONV_IMPLS:
    for kernel_grad in ("autodiff", "dot") if impl == "space_to_depth" else ("autodiff",):
      conv = layers.StridedConv(cout, k, padding=pad, stride=stride, impl=impl,
                                  kernel_grad=kernel_grad)
      np.testing.assert_allclose(jax.jit(conv.apply)(variables, x), want, atol=1e-5, rtol=1e-5)
      for got, ref in zip(jax.tree.leaves(grads(conv)), jax.tree.leaves(want_grads)):
        np.testing.assert_allclose(got, ref, atol=1e-4 * float(jnp.max(jnp.abs(ref))),
                                   rtol=1e-4)


def test_strided_conv_has_flax_convs_parameters():
  """A checkpoint of `nn.Conv` runs in `StridedConv` (and back): same names, shapes, init."""
  x = jnp.ones((1, 8, 8, 3))
  theirs = nn.Conv(6, (3, 3), strides=2, padding=1).init(jax.random.key(0), x)
  ours = layers.StridedConv(6, 3, padding=1, impl="space_to_depth").init(jax.random.key(0), x)
  jax.tree.map(np.testing.assert_array_equal, ours, theirs)


@pytest.mark.parametrize("options,match", [
    ({"impl": "xla", "kernel_grad": "dot"}, r"takes a kernel_grad of \('autodiff',\)"),
    ({"impl": "space_to_depth", "kernel_grad": "fft"}, "takes a kernel_grad of"),
    ({"impl": "shifted_sum"}, "Unknown strided conv impl 'shifted_sum'"),
])
def test_impossible_strided_implementations_are_refused(options, match):
  with pytest.raises(ValueError, match=match):
    layers.StridedConv(4, 3, padding=1, **options).init(jax.random.key(0),
                                                        jnp.ones((1, 6, 6, 1)))


def _reduce_window_pool(x: jax.Array, window: int) -> jax.Array:
  """The previous implementation: `nn.max_pool` with -inf padding at the far edges."""
  pads = tuple((0, -(-n // window) * window - n) for n in x.shape[1:3])
  return nn.max_pool(x, (window, window), (window, window), padding=pads)


@pytest.mark.parametrize("size,out", [(30, 15), (15, 8), (17, 9), (11, 6)])
def test_max_pool_ceil_values_and_gradients(size, out):
  rng = np.random.default_rng(size)
  x = rng.standard_normal((2, size, size, 3)).astype(np.float32)
  y = layers.max_pool_ceil(jnp.asarray(x), 2)
  assert y.shape == (2, out, out, 3)
  np.testing.assert_array_equal(y, _numpy_pool_ceil(x, 2))
  g = jnp.asarray(rng.standard_normal(y.shape), jnp.float32)
  loss = lambda pool: lambda x: jnp.sum(nn.relu(pool(x, 2)) * g)
  np.testing.assert_array_equal(jax.jit(jax.grad(loss(layers.max_pool_ceil)))(x),
                                jax.grad(loss(_reduce_window_pool))(x))


def test_max_pool_ceil_ties_route_to_first_maximum_like_reduce_window():
  # Zero regions of real images make ties common; the gradient must match anyway.
  x = jnp.asarray(np.random.default_rng(0).integers(0, 2, (2, 9, 9, 2)), jnp.float32)
  loss = lambda pool: lambda x: jnp.sum(pool(x, 2) * jnp.arange(50.0).reshape(1, 5, 5, 2))
  np.testing.assert_array_equal(jax.jit(jax.grad(loss(layers.max_pool_ceil)))(x),
                                jax.grad(loss(_reduce_window_pool))(x))
