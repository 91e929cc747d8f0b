"""bfloat16 as a compute dtype: what runs in it, what stays float32, and its inputs."""

import jax
import jax.numpy as jnp
import ml_collections
import ml_dtypes
import numpy as np
import pytest

from bnet_jax import cascade, nets, train

FAMILIES = [pytest.param("b_lenet", {}, marks=pytest.mark.newest), ("b_alexnet", {}),
            ("b_resnet", {"depth": 8})]


def _dtypes(tree) -> set[str]:
  return {str(a.dtype) for a in jax.tree.leaves(tree)}


@pytest.mark.parametrize("name, options", FAMILIES, ids=["b_lenet", "b_alexnet", "b_resnet"])
def test_bfloat16_step_keeps_parameters_state_and_logits_float32(name, options):
  net = nets.get(name, dtype="bfloat16", **options)
  assert net.compute_dtype == jnp.bfloat16
  variables = nets.init(net, jax.random.key(0))
  assert _dtypes(variables) == {"float32"}  # Parameters and BatchNorm statistics.
  x = jax.random.uniform(jax.random.key(1), (4, *net.input_shape))
  h, _ = jax.eval_shape(lambda v, x: nets.apply_trunk(net, v, 0, x), variables, x)
  assert h.dtype == jnp.bfloat16  # Activations between stages.
  out, _ = jax.eval_shape(lambda v, x: nets.forward(net, v, x), variables, x)
  assert out.logits.dtype == out.entropy.dtype == jnp.float32
  config = ml_collections.ConfigDict(dict(optimizer="adam", learning_rate=1e-3, beta1=0.9,
                                          beta2=0.999, weight_decay=0.0, lr_schedule="constant"))
  phase = train.Phase("joint", net, (1.0,) * net.num_exits, 0, 1)
  tx = train.make_optimizer(config, 1)
  state = train.initial_state(phase, tx, variables, 0)
  batch = {"image": np.asarray(x), "label": np.arange(4, dtype=np.int32)}
  state, metrics = train.make_train_step(phase, tx)(state, batch, jax.random.key(0))
  assert _dtypes(state.params) == _dtypes(state.model_state or {"_": jnp.zeros(())}) == {"float32"}
  assert _dtypes(state.opt_state) <= {"float32", "int32"}
  assert metrics["loss"].dtype == jnp.float32 and np.isfinite(float(metrics["loss"]))


@pytest.mark.newest
def test_bfloat16_is_close_to_float32_on_the_same_parameters():
  f32, bf16 = nets.get("b_lenet"), nets.get("b_lenet", dtype="bfloat16")
  variables = nets.init(f32, jax.random.key(0))
  x = jax.random.uniform(jax.random.key(1), (64, 28, 28, 1))
  a, b = (jax.jit(lambda v, x, n=n: nets.forward(n, v, x)[0].logits)(variables, x)
          for n in (f32, bf16))
  assert float(jnp.max(jnp.abs(a - b))) < 0.05 * float(jnp.max(jnp.abs(a)))
  assert not np.array_equal(a, b)  # bfloat16 really ran.


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16, np.float64, ml_dtypes.bfloat16])
def test_images_of_any_float_dtype_are_accepted(dtype):
  net = nets.get("b_lenet")
  variables = nets.init(net, jax.random.key(0))
  # Multiples of 1/8 in [0, 1]: exact in every float dtype, so results must be equal.
  x = np.random.default_rng(0).integers(0, 9, (6, 28, 28, 1)).astype(np.float32) / 8
  model = cascade.Cascade(net, variables, [0.5])
  want = model.predict(x)
  got = model.predict(np.asarray(x).astype(dtype) if dtype is not jnp.bfloat16
                      else jnp.asarray(x, dtype))
  for a, b in zip(want, got):
    np.testing.assert_array_equal(a, b)
  ref = cascade.reference(net, variables, np.asarray(x).astype(np.float16), [0.5])
  np.testing.assert_array_equal(ref.exit, want.exit)
