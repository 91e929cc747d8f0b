"""Early-exit cascade: equal to the all-exits reference, bounded compilation, validation.

Comparisons are exact outside the tie band (`helpers.BAND`, docs/design.md): a sample
whose score at some exit lies within it of that exit's threshold may change exit, and
such samples are counted and must be few. Thresholds sit midway across wide gaps between
reference scores, so few samples are near."""

import math

import jax.numpy as jnp
import numpy as np
import pytest

from bnet_jax import cascade, criteria, data, nets
from helpers import BAND, Case, random_thresholds, random_variables, tiny_network

CRITERIA = ("entropy", "max_prob", "margin")


@pytest.fixture(scope="module")
def tiny() -> Case:
  net = tiny_network()
  x = np.random.default_rng(6).normal(size=(100, 8, 8, 2)).astype(np.float32)
  return Case(net, random_variables(net, 3), x, {}, {})


@pytest.fixture(scope="module")
def blenet() -> Case:
  net = nets.get("b_lenet")
  x = np.random.default_rng(1).normal(size=(100, 28, 28, 1)).astype(np.float32)
  return Case(net, random_variables(net, 0), x, {}, {})


# ---- helpers ------------------------------------------------------------------------

def assert_matches(pred, case, size, thresholds, criterion):
  """Equality with `reference` on the first `size` images, computed at batch 100.

  Exact except for samples within BAND of a threshold (counted: at most 1% + 1).
  """
  x = case.x
  ref = cascade.reference(case.net, case.variables, x, thresholds, criterion)
  scores = case.all_scores(criterion)[:, :size]
  ref = cascade.Prediction(*(a[:size] for a in ref))
  near = np.zeros(size, bool)
  for k, t in enumerate(thresholds):
    near |= (ref.exit >= k) & (np.abs(scores[k] - t) < BAND)
  assert near.sum() <= 1 + 0.01 * size, f"{near.sum()} samples within {BAND} of a threshold"
  far = ~near
  np.testing.assert_array_equal(pred.exit[far], ref.exit[far])
  np.testing.assert_array_equal(pred.label[far], ref.label[far])
  np.testing.assert_allclose(pred.score[far], ref.score[far], atol=1e-5)
  assert pred.label.dtype == pred.exit.dtype == np.int32 and pred.score.dtype == np.float32
  return ref


# ---- equality with the reference ---------------------------------------------------

@pytest.mark.parametrize("criterion, sizes", [
    pytest.param("entropy", (1, 2, 15, 16, 17, 31, 32, 33, 37, 100), marks=pytest.mark.newest),
    ("max_prob", (1, 2, 17, 37, 100)),  # Fewer sizes: each bucket costs a compilation.
    ("margin", (1, 2, 17, 37, 100))])
def test_blenet_equals_reference(blenet, criterion, sizes):
  cas = blenet.cascade(criterion)
  rng = np.random.default_rng(0)
  exits = []
  for size in sizes:
    t = random_thresholds(blenet.all_scores(criterion), rng)
    exits.append(assert_matches(cas.predict(blenet.x[:size], t), blenet, size, t, criterion).exit)
  assert 0.1 < np.mean(np.concatenate(exits) == 0) < 0.9  # Early and late exits mixed.


@pytest.mark.parametrize("criterion", CRITERIA)
def test_any_number_of_exits_equals_reference(tiny, criterion):
  assert tiny.net.num_exits == 3
  # Sparse buckets: with 3 exits every (bucket, smaller bucket) pair is a program.
  cas = tiny.cascade(criterion, buckets=(1, 4, 16, 64))
  rng = np.random.default_rng(1)
  seen = set()
  for size in (1, 3, 4, 5, 16, 17, 37, 64):
    for _ in range(2):
      t = random_thresholds(tiny.all_scores(criterion), rng)
      ref = assert_matches(cas.predict(tiny.x[:size], t), tiny, size, t, criterion)
      seen |= set(ref.exit.tolist())
  assert seen == {0, 1, 2}


@pytest.mark.parametrize("criterion, leave_all, leave_none", [
    ("entropy", math.log(10) + 1, 0.0), ("max_prob", 0.0, 1.0), ("margin", -1.0, 1.0)])
def test_everyone_or_no_one_exits_early(blenet, criterion, leave_all, leave_none):
  cas = blenet.cascade(criterion)
  for size in (1, 37, 100):
    for t, exit_ in (([leave_all], 0), ([leave_none], 1)):
      pred = cas.predict(blenet.x[:size], t)
      np.testing.assert_array_equal(pred.exit, exit_)
      assert_matches(pred, blenet, size, t, criterion)


@pytest.mark.newest
@pytest.mark.parametrize("mode", ["host", "cond", "batched"])
def test_batch_one_is_identical_to_reference_at_batch_one(blenet, tiny, mode):
  for case in (blenet, tiny):
    cas = case.cascade("entropy", mode)
    t = random_thresholds(case.all_scores("entropy"), np.random.default_rng(2))
    for i in range(12):
      pred = cas.predict(case.x[i:i + 1], t)
      ref = cascade.reference(case.net, case.variables, case.x[i:i + 1], t)
      np.testing.assert_array_equal(pred.exit, ref.exit)
      np.testing.assert_array_equal(pred.label, ref.label)
      np.testing.assert_allclose(pred.score, ref.score, atol=1e-5)  # Other programs.


def test_auto_latency_mode_recomputes_only_a_cheap_trunk(blenet):
  """B-LeNet's conv1 is cheap to recompute ("host"); B-AlexNet's first stage is not."""
  lenet_cas = cascade.Cascade(blenet.net, blenet.variables, [0.5])
  alexnet = nets.get("b_alexnet")
  alex_cas = cascade.Cascade(alexnet, random_variables(alexnet, 0), [0.5, 0.5])
  assert lenet_cas.latency_mode == alex_cas.latency_mode == "auto"
  for cas, want in ((lenet_cas, "host"), (alex_cas, "cond")):
    cas.warmup([1])
    assert cas.latency_mode == want
  assert lenet_cas.num_compiled == 2 and alex_cas.num_compiled == 1


def test_choose_latency_mode_keeps_the_faster_and_predicts_alike(tiny):
  cas = cascade.Cascade(tiny.net, tiny.variables, [0.3, 0.3])
  before = [cas.predict(tiny.x[i:i + 1]) for i in range(4)]  # "auto" resolved first.
  ms = cas.choose_latency_mode(tiny.x[:6], repeats=2)
  assert set(ms) == {"host", "cond"} and min(ms.values()) > 0
  assert cas.latency_mode == min(ms, key=ms.get)
  assert cas.num_compiled == tiny.net.num_exits + 1  # Both strategies, compiled once.
  for i, want in enumerate(before):
    got = cas.predict(tiny.x[i:i + 1])
    np.testing.assert_array_equal(got.exit, want.exit)
    np.testing.assert_array_equal(got.label, want.label)
  with pytest.raises(ValueError, match="at least one image"):
    cas.choose_latency_mode(tiny.x[:0])


def test_chunks_buckets_and_parameters_as_arguments(tiny):
  t = random_thresholds(tiny.all_scores("entropy"), np.random.default_rng(3))
  for options in ({"chunk_size": 16, "buckets": (4, 16)}, {"buckets": (8, 24)},
                  {"params_as_constants": False, "buckets": (2, 8, 32)}):
    cas = cascade.Cascade(tiny.net, tiny.variables, t, **options)
    for size in (1, 23, 37):
      assert_matches(cas.predict(tiny.x[:size]), tiny, size, t, "entropy")


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_device_arrays_give_the_same_predictions_as_host_arrays(blenet, tiny, dtype):
  """jax.Array images (sliced, cast and padded on the device) run the same programs on the
  same float32 values as the host array: identical results. bfloat16 images hold values
  that bfloat16 represents exactly, so their float32 cast is the host array itself."""
  # B-LeNet's shared cascade (programs the other tests compile too); tiny in chunks of 16.
  tiny_chunks = cascade.Cascade(tiny.net, tiny.variables, [0.0, 0.0], chunk_size=16,
                                buckets=(4, 16))
  for case, cas in ((blenet, blenet.cascade()), (tiny, tiny_chunks)):
    x = np.asarray(jnp.asarray(case.x, dtype).astype(jnp.float32))
    t = random_thresholds(case.all_scores("entropy"), np.random.default_rng(7))
    whole = jnp.asarray(x, dtype)  # One device array, cut into chunks by the cascade.
    for size in (1, 2, 17, 37, 100):
      want = cas.predict(x[:size], t)
      for got in (cas.predict(jnp.asarray(x[:size], dtype), t), cas.predict(whole[:size], t)):
        for a, b in zip(got, want):
          assert type(a) is np.ndarray and a.dtype == b.dtype
          np.testing.assert_array_equal(a, b)
    assert len(set(cas.predict(whole, t).exit.tolist())) == case.net.num_exits


def test_layer_options_per_bucket_give_the_same_decisions(blenet):
  """B-LeNet with its per-batch inference layers: every tier, batch 1 and batched."""
  tiers = {nets.get("b_lenet", **nets.inference_options("b_lenet", b)).stages[1].trunk
           for b in (1, 16, 256)}
  assert len(tiers) > 1  # The registry really switches implementations.
  t = random_thresholds(blenet.all_scores("entropy"), np.random.default_rng(5))
  made = []

  def bucket_net(b):
    made.append(b)
    return nets.get("b_lenet", **nets.inference_options("b_lenet", b))

  cas = cascade.Cascade(blenet.net, blenet.variables, t, bucket_net=bucket_net)
  for size in (1, 3, 100):
    assert_matches(cas.predict(blenet.x[:size]), blenet, size, t, "entropy")
  assert {1, 3, 128} <= set(made)


def test_bucket_net_must_be_the_same_network(blenet):
  cas = cascade.Cascade(blenet.net, blenet.variables, [0.5],
                        bucket_net=lambda b: nets.get("b_alexnet"))
  with pytest.raises(ValueError, match="must be b_lenet with other layer options"):
    cas.predict(blenet.x[:4])


def test_single_exit_network_is_its_main_path(blenet):
  net = blenet.net.main_network()
  want = np.argmax(nets.main_logits(net, blenet.variables, blenet.x[:5]), axis=-1)
  for mode, x in (("host", blenet.x[:1]), ("cond", blenet.x[:1]), ("batched", blenet.x[:5])):
    pred = cascade.Cascade(net, blenet.variables, [], latency_mode=mode).predict(x)
    np.testing.assert_array_equal(pred.exit, 0)
    np.testing.assert_array_equal(pred.label, want[:len(x)])


def test_segment_fns_compose_to_the_all_exits_pass(tiny):
  out, _ = nets.forward(tiny.net, tiny.variables, tiny.x)
  h = tiny.x
  for k in range(tiny.net.num_exits):
    h, logits, score = cascade.segment_fn(tiny.net, k, "margin")(tiny.variables, h)
    np.testing.assert_allclose(logits, out.logits[k], atol=1e-5)
    np.testing.assert_allclose(score, criteria.margin(out.logits[k]), atol=1e-5)


# ---- compilation -------------------------------------------------------------------

def test_warmup_compiles_a_bounded_set(tiny):
  cas = cascade.Cascade(tiny.net, tiny.variables, [0.0, 0.0], latency_mode="batched")
  cas.warmup([5])
  # Bucket 6 for exit 0; exits 1 and 2 at buckets 1, 2, 3, 4, 6; gathers 6 -> each of
  # those after exit 0, and every (b_in, b_out <= b_in) pair of them after exit 1.
  assert cas.num_compiled == cas.num_traces == 1 + (5 + 5) + (15 + 5)


def test_default_buckets_are_powers_of_two_and_one_and_a_half_times_them():
  assert [cascade.default_bucket(n) for n in range(1, 14)] == [1, 2, 3, 4, 6, 6, 8, 8, 12, 12,
                                                               12, 12, 16]
  assert cascade.default_bucket(182) == 192 and cascade.default_bucket(1454) == 1536
  assert cascade.default_buckets(100) == [1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 96, 128]


def test_no_recompilation_after_warmup(tiny):
  sizes = (1, 5, 12)
  batched = cascade.Cascade(tiny.net, tiny.variables, [0.0, 0.0], latency_mode="batched",
                            chunk_size=8)
  host = cascade.Cascade(tiny.net, tiny.variables, [0.0, 0.0], latency_mode="host")
  cond = cascade.Cascade(tiny.net, tiny.variables, [0.0, 0.0], latency_mode="cond")
  batched.warmup(sizes)  # Chunks of 8 and 4 rows.
  host.warmup([1])
  cond.warmup([1])
  every = (batched, host, cond)
  before = [(c.num_traces, c.num_compiled) for c in every]
  rng = np.random.default_rng(4)
  exits = set()
  for _ in range(10):
    t = random_thresholds(tiny.all_scores("entropy"), rng)
    t[rng.integers(2)] = float(rng.choice([0.0, 10.0, t[0]]))  # Extremes too.
    for size in sizes:
      batched.predict(tiny.x[:size], t)
    for i in range(3):
      exits.add(int(host.predict(tiny.x[i:i + 1], t).exit[0]))
      cond.predict(tiny.x[i:i + 1], t)
  assert [(c.num_traces, c.num_compiled) for c in every] == before
  assert before[1:] == [(3, 3), (1, 1)]  # One program per exit; one cond program.
  assert exits == {0, 1, 2}  # Every exit program ran.


# ---- validation --------------------------------------------------------------------

@pytest.mark.parametrize("thresholds, match", [
    ([0.5, 0.5], "2 exits, so it needs 1 threshold"),
    ([], "needs 1 threshold"),
    ([float("nan")], "NaN"),
    ([-0.1], "entropy scores are never below 0"),
    (None, "thresholds are required: b_lenet needs a sequence of 1 float threshold"),
    (["low"], "needs a sequence of 1 float threshold"),
])
def test_bad_thresholds(blenet, thresholds, match):
  with pytest.raises(ValueError, match=match):
    cascade.Cascade(blenet.net, blenet.variables, thresholds)
  for size in (0, 1, 2):  # predict(x, None) means the cascade's own: reference only.
    with pytest.raises(ValueError, match=match):
      cascade.reference(blenet.net, blenet.variables, blenet.x[:size], thresholds)
    if thresholds is not None:
      with pytest.raises(ValueError, match=match):
        blenet.cascade().predict(blenet.x[:size], thresholds)


def _predictors(case):
  """(name, predict(images)) of `reference` and of the cascade on every path: batched,
  batch 1 in each latency mode, and the numpy batch-1 hot path (warmed up first)."""
  t = [0.5] * (case.net.num_exits - 1)
  out = [("reference", lambda x: cascade.reference(case.net, case.variables, x, t))]
  for mode in ("host", "cond", "batched"):
    cas = case.cascade("entropy", mode)
    cas.predict(case.x[:1])  # Compiles batch 1: later float32 images take the hot path.
    out.append((mode, cas.predict))
  return out


def test_empty_batch_gives_empty_arrays_everywhere(blenet):
  for name, predict in _predictors(blenet):
    for x in (blenet.x[:0], jnp.asarray(blenet.x[:0])):
      pred = predict(x)
      assert [(a.shape, a.dtype) for a in pred] == [((0,), np.int32)] * 2 + [((0,), np.float32)], name


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("size", [1, 5])
def test_non_finite_images_are_refused_everywhere(blenet, bad, size):
  """Never a label for a NaN or inf image: reference, every batch-1 path (the hot path
  too: a NaN score passes no threshold) and batched, host and device arrays alike."""
  x = blenet.x[:size].copy()
  x[-1, 3, 4, 0] = bad
  if size > 1:
    x[0, 0, 0, 0] = bad
  want = f"Images must be finite; {min(size, 2)} of {size} hold NaN or inf"
  for name, predict in _predictors(blenet):
    for images in (x, jnp.asarray(x), jnp.asarray(x, jnp.bfloat16)):
      with pytest.raises(ValueError, match=want):
        predict(images)
        pytest.fail(f"{name} gave a label for a non-finite {type(images).__name__}")


def test_unscaled_pixels_are_refused_outside_the_hot_path(blenet):
  raw = np.clip(blenet.x[:5] * 80 + 120, 0, 255).round().astype(np.float32)  # 0-255 pixels.
  want = "5 of 5 images have pixels beyond \\+-10 .* unscaled 0-255 pixels; use bnet_jax.data.preprocess"
  for name, predict in _predictors(blenet):
    # The numpy hot path ("host", "cond") checks only images that go past exit 1.
    one = [raw[:1]] if name in ("reference", "batched") else []
    for images in [raw, jnp.asarray(raw), jnp.asarray(raw[:1])] + one:
      n = len(images)
      with pytest.raises(ValueError, match=want.replace("5 of 5", f"{n} of {n}")):
        predict(images)
  # pixel_limit=None: another scale on purpose; a pixel limit of your own.
  t = [0.5]
  assert len(cascade.reference(blenet.net, blenet.variables, raw, t, pixel_limit=None).label) == 5
  cas = cascade.Cascade(blenet.net, blenet.variables, t, pixel_limit=None)
  assert len(cas.predict(raw).label) == 5
  with pytest.raises(ValueError, match="1 of 5 images have pixels beyond \\+-0.5 \\(largest magnitude 0.7\\)"):
    x = np.full((5, 28, 28, 1), 0.1, np.float32)
    x[2, 5, 5] = 0.7
    cascade.reference(blenet.net, blenet.variables, x, t, pixel_limit=0.5)
  with pytest.raises(ValueError, match="pixel_limit must be positive"):
    cascade.Cascade(blenet.net, blenet.variables, t, pixel_limit=0)


def test_pixel_limit_is_generous_for_every_dataset():
  """Preprocessed pixels of every dataset lie well inside PIXEL_LIMIT; raw ones beyond it."""
  for name, spec in data.DATASETS.items():
    extremes = np.array([0, 255], np.uint8).reshape(2, 1, 1, 1) * np.ones(spec.image_shape,
                                                                           np.uint8)
    scaled = data.preprocess(name, extremes)
    assert np.abs(scaled).max() <= cascade.PIXEL_LIMIT / 4, name
  assert 255 / 2 > cascade.PIXEL_LIMIT  # Even a dim raw image (max 128) is refused.


def test_unknown_criterion(blenet):
  with pytest.raises(ValueError, match="Unknown exit criterion 'top1'"):
    cascade.Cascade(blenet.net, blenet.variables, [0.5], criterion="top1")
  with pytest.raises(ValueError, match="Unknown exit criterion 'top1'"):
    cascade.reference(blenet.net, blenet.variables, blenet.x[:2], [0.5], "top1")


def test_negative_threshold_is_fine_for_max_prob(blenet):
  pred = blenet.cascade("max_prob").predict(blenet.x[:2], [-0.5])
  np.testing.assert_array_equal(pred.exit, 0)


@pytest.mark.parametrize("images, match", [
    (np.zeros((28, 28, 1), np.float32), "batch of images"),
    (np.zeros((2, 32, 32, 1), np.float32), "28x28"),
    (np.zeros((1, 28, 28, 3), np.float32), "channel"),
    (np.zeros((2, 28, 28, 1), np.uint8), "float"),
    (np.zeros((1, 28, 28, 1), np.int32), "float"),
    (np.zeros((0, 28, 28, 1), bool), "float"),
    (np.zeros((0, 28, 28), np.float32), "batch of images"),
])
def test_bad_images(blenet, images, match):
  for name, predict in _predictors(blenet):
    for x in (images, jnp.asarray(images)):
      with pytest.raises(ValueError, match=match):
        predict(x)


def test_bad_options(blenet):
  with pytest.raises(ValueError, match="latency_mode"):
    cascade.Cascade(blenet.net, blenet.variables, [0.5], latency_mode="fast")
  with pytest.raises(ValueError, match="Buckets"):
    cascade.Cascade(blenet.net, blenet.variables, [0.5], buckets=[0, 4])
