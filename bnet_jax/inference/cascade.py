"""Early-exit inference that skips work: each sample runs only up to the exit it leaves at.

An exit *segment* k is the trunk stages since exit k-1 (stages without a head belong
to the next exit's segment), exit k's head and the criterion score (`segment_fn`).
A sample leaves exit k < E-1 when ``criterion.exits(score, T_k)`` holds;
everyone still running leaves at the last exit. `reference` gives the same decisions
from the all-exits pass; the cascade must equal it (docs/design.md: the tie band).

Batched path (B > 1). XLA compiles one program per shape, so batches are padded to
a fixed set of *buckets* (powers of two and 1.5 times them by default) and every
program is compiled ahead of time into a dict keyed by (kind, segment, bucket...),
which bounds the number of programs and makes recompilation impossible once warmed
up (`warmup`). Per segment:

1. A *stage program* (segment + argmax + exit decision) on a bucket-sized batch of
   which the first n rows are real. It returns the activation, a stable partition of
   "does not continue" (continuing rows first, in input order; padding rows never
   continue) and a (4, bucket) int32 *record*: each row's original position, label,
   score bits and whether it left here (padding rows never leave).
2. The record is the one array read on the host per stage run (each transfer has a
   fixed cost, so label, score and flags travel together): the rows that left are
   scattered into the results in input order, and the count c of continuing rows
   chooses the next bucket. A tiny *prefix program* gathers the first bucket(c) rows
   of the order (activations and positions) on device; rows past c are padding for
   the next stage. When nobody left and the bucket is unchanged the gather is the
   identity and is skipped; when c = 0 the batch is done.

Large batches run in chunks of `chunk_size` rows, 2048 by default, which bounds the
top bucket (so the programs to compile and the padding of an odd-sized batch). Fewer,
larger chunks are faster while activations fit the cache: the few samples that
continue then form one larger, more efficient batch for the later segments. Chunks
advance together, segment by segment, so the device computes one chunk while the
host reads another's record.

Batch-1 path. A batch of one is latency-bound: per-call dispatch, host reads and
XLA's per-op overhead dominate. ``latency_mode="host"`` runs one *exit program* per
exit reached, each from the input image: exit k's program recomputes the trunk
before segment k (no heads), runs segment k and returns label, exit (-1 when the
sample goes on) and score in one (3, 1) array read on the host. The common case, a
sample leaving at exit 1, is one dispatch of the cheapest program; a sample that
goes on pays another dispatch and the recomputed trunk (B-LeNet: conv1, 12% of the
main path's FLOPs, for the few samples that go on). ``"cond"`` runs one program with
nested `lax.cond` between segments (never vmapped: under vmap cond becomes select and
runs every branch). ``"batched"`` sends batch 1 down the batched path.

``"auto"`` picks "host" when the trunk that the last exit's program recomputes is
cheap (at most `HOST_MAX_RECOMPUTE_FLOPS` by XLA's count), else "cond": XLA's
conditional costs every sample time even when the branch taken only returns, and
so would handing the stage-1 activation on as a second output, while recomputing a
cheap trunk costs only the few samples that go on; a costly trunk (B-AlexNet,
B-ResNet-110) tips the balance to "cond". How many go on decides it too, and "auto"
cannot know that: `Cascade.choose_latency_mode` times both on given images and keeps
the faster (the benchmark does, on the validation split).

On a mesh (``mesh=``, see `parallel`) every program is compiled with shardings: each
stage's bucket-sized batch is split over the mesh's data axis (buckets are multiples
of the device count), variables are replicated, and the record and order come back
replicated, so the host logic above is unchanged; XLA gathers the rows a prefix
program selects across devices. Decisions equal one device's (docs/design.md: the tie band).

Input policy (`reference` and `Cascade.predict` alike, so `predict.predict_split` and
``experiments.predict``). Images must be a (B, H, W, C) float batch of the network's
image size (`nets.check_images`), and finite and on the training scale: a batch
holding NaN or inf is a ValueError naming how many images are bad ("images must be
finite; 3 of 256 hold NaN or inf"), never a label; so is a batch with a pixel beyond
``pixel_limit`` in magnitude (default `PIXEL_LIMIT` = 10: preprocessed images lie in
[0, 1] for MNIST and within [-2.0, 2.2] for normalised CIFAR-10, while raw 0-255
pixels exceed 10 in any image that is not almost black), which names the count and
points to `bnet_jax.data.preprocess`; ``pixel_limit=None`` keeps only the finiteness
check (inputs on another scale). Host arrays are checked on the host before any
program runs (min and max of the batch, small beside the cascade itself); a
`jax.Array` is checked on its devices by one reduction, dispatched before the first
stage and read before the first record, so the split never travels to the host. The
batch-1 hot path (a float32 (1, H, W, C) host array once batch 1 is compiled) adds
nothing to the common case, a sample leaving at the first exit, where the check would
be a visible share of the latency: it checks the image only when the first program
reports no exit. A NaN image always gets there (a NaN score passes no threshold, and
the batch-1 programs report a NaN score at the last exit as no exit), so it is refused
on every path; an inf or unscaled image whose first exit is nonetheless confident is
the one case that goes unchecked. Thresholds are required (E-1 numbers, none NaN, none
beyond the criterion's `Criterion.never_exit`); an empty batch gives empty arrays.
`reference` and `predict` make the same checks in the same order (shape and dtype,
thresholds, pixels) and raise the same messages.

Parameters are closed over as compile-time constants by default: passing the parameter
pytree on every call adds dispatch time to each call. Thresholds are always a runtime
argument, so changing them never recompiles. Modules always run in eval mode with
every variable collection (e.g. BatchNorm's ``batch_stats``).

The measurements behind these choices are in docs/performance.md.
"""

from __future__ import annotations

import functools
import itertools
import math
from collections.abc import Callable, Iterable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import Mesh

from bnet_jax import criteria, nets, parallel, runtime, timing
from bnet_jax.criteria import Criterion

LATENCY_MODES = ("auto", "host", "cond", "batched")
DEFAULT_CHUNK_SIZE = 2048
# "auto" runs batch 1 as "host" when its recomputed trunk is at most this many FLOPs
# per sample: recomputing that much costs less than the conditional that "host" saves.
HOST_MAX_RECOMPUTE_FLOPS = 1e6
# Largest pixel magnitude accepted by default: preprocessed images of every dataset in
# `data.DATASETS` lie within [-2.0, 2.2]; raw 0-255 pixels exceed it (module docstring).
PIXEL_LIMIT = 10.0
_F32 = np.dtype(np.float32)


class Prediction(NamedTuple):
  """Per-sample results of early-exit inference, in input order.

  Attributes:
    label: (B,) int32 predicted class (argmax of the exit's logits).
    exit: (B,) int32 index of the exit the sample left at, 0..E-1.
    score: (B,) float32 criterion score at that exit.
  """
  label: np.ndarray
  exit: np.ndarray
  score: np.ndarray


def segments(net: nets.Network) -> list[tuple[int, ...]]:
  """The stages each exit runs beyond the previous exit: one tuple per exit."""
  out, start = [], 0
  for stage in net.exit_stages:
    out.append(tuple(range(start, stage + 1)))
    start = stage + 1
  return out


def segment_fn(net: nets.Network, k: int, criterion: Criterion | str = "entropy"
               ) -> Callable[[nets.Variables, jax.Array], tuple[jax.Array, jax.Array, jax.Array]]:
  """Exit segment k as a pure function ``(variables, h) -> (h_next, logits, score)``.

  This is exactly what the cascade's stage programs compute, minus bookkeeping, so
  cost accounting can compile it for XLA's FLOP count.

  Args:
    net: the network.
    k: exit index, 0..E-1.
    criterion: a `criteria.Criterion`, or a name in `criteria.CRITERIA`.

  Returns:
    A function of the variables (all collections) and `h` (B, ...), the activation
    after exit k-1's stage (the images for k = 0), returning `h_next` (B, ...) that
    feeds segment k+1, logits (B, C) and score (B,). Runs in eval mode.
  """
  stages = segments(net)[k]
  trunk, score_fn = _trunk_fn(net, stages), criteria.get(criterion).score

  def run(variables: nets.Variables, h: jax.Array):
    h = trunk(variables, h)
    logits, _ = nets.apply_head(net, variables, stages[-1], h)
    return h, logits, score_fn(logits)

  return run


def _trunk_fn(net: nets.Network, stages: Sequence[int]
              ) -> Callable[[nets.Variables, jax.Array], jax.Array]:
  """Trunk stages `stages` in order, no heads, as ``(variables, h) -> h`` (eval mode)."""
  def run(variables: nets.Variables, h: jax.Array) -> jax.Array:
    for i in stages:
      h, _ = nets.apply_trunk(net, variables, i, h)
    return h

  return run


def _stages_before(net: nets.Network, k: int) -> list[int]:
  """The trunk stages of every segment before exit k's."""
  return [i for s in segments(net)[:k] for i in s]


def check_thresholds(net: nets.Network, thresholds: Any, criterion: Criterion | str
                     ) -> np.ndarray:
  """Validates E-1 exit thresholds (`Criterion.check`); returns them as a (E-1,) float32 array."""
  criterion = criteria.get(criterion)
  want = net.num_exits - 1
  need = (f"{net.name} needs a sequence of {want} float threshold(s), one per exit except "
          f"the last")
  if thresholds is None:
    raise ValueError(f"Exit thresholds are required: {need}; got None.")
  try:
    t = np.asarray(thresholds, dtype=np.float64).reshape(-1)
  except (TypeError, ValueError):
    raise ValueError(f"{need}; got {thresholds!r}.") from None
  if t.size != want:
    raise ValueError(f"{net.name} has {net.num_exits} exits, so it needs {want} threshold(s) "
                     f"(one per exit except the last); got {t.size}.")
  if np.isnan(t).any():
    raise ValueError(f"Exit thresholds must not be NaN; got {t.tolist()}.")
  criterion.check(t)
  return t.astype(np.float32)


def _pixel_report(x: jax.Array, limit: jax.Array) -> jax.Array:
  """(B, ...) images -> (3,) float32: how many hold NaN or inf, how many have a finite
  pixel beyond `limit` in magnitude, and the largest finite magnitude (for the message)."""
  a = jnp.abs(x.astype(jnp.float32)).reshape(x.shape[0], -1)
  finite = jnp.isfinite(a)
  biggest = jnp.max(jnp.where(finite, a, 0.0), axis=1)
  return jnp.stack([jnp.sum(~finite.all(axis=1)).astype(jnp.float32),
                    jnp.sum(finite.all(axis=1) & (biggest > limit)).astype(jnp.float32),
                    jnp.max(biggest)])


_pixel_report_program = jax.jit(_pixel_report)


def _raise_for_pixels(report: Any, total: int, limit: float | None) -> None:
  """Raises the ValueError of the input policy if `_pixel_report`'s (3,) counts say so."""
  nonfinite, far, biggest = (float(v) for v in np.asarray(report))
  if nonfinite:
    raise ValueError(f"Images must be finite; {int(nonfinite)} of {total} hold NaN or inf. "
                     "Drop or repair them before prediction.")
  if far:
    raise ValueError(
        f"{int(far)} of {total} images have pixels beyond +-{limit:g} (largest magnitude "
        f"{biggest:g}), far outside the training scale ([0, 1] for MNIST): this looks like "
        "unscaled 0-255 pixels; use bnet_jax.data.preprocess(dataset, images), or pass "
        "pixel_limit=None for inputs on another scale.")


def _limit(pixel_limit: float | None) -> float:
  """`pixel_limit` as a float bound (None: no bound), checked."""
  limit = math.inf if pixel_limit is None else float(pixel_limit)
  if not limit > 0:
    raise ValueError(f"pixel_limit must be positive or None; got {pixel_limit}.")
  return limit


def check_pixels(images: np.ndarray, pixel_limit: float | None = PIXEL_LIMIT) -> None:
  """The input policy on a host batch (B, ...): finite, and within +-`pixel_limit`.

  The common case costs a min and a max over the batch; the counts for the message
  are computed only when one of them fails (NaN fails every comparison).
  """
  limit = _limit(pixel_limit)
  if images.size and not (-limit <= images.min() and images.max() <= limit):
    _raise_for_pixels(_pixel_report(np.asarray(images, np.float32), limit), len(images),
                      pixel_limit)


def _checked_images(images: Any, pixel_limit: float | None
                    ) -> tuple[np.ndarray | jax.Array, jax.Array | None]:
  """Images under the input policy, as the programs take them, and the check's result.

  A host batch becomes float32 and is checked here (`check_pixels`): the check is
  None. A `jax.Array` stays as it is, and `_pixel_report` is dispatched on the devices
  holding it (None for an empty batch); `_read_pixel_check` raises on it.
  """
  if isinstance(images, jax.Array):
    pending = (_pixel_report_program(images, np.float32(_limit(pixel_limit)))
               if images.shape[0] else None)
    return images, pending
  x = np.asarray(images, np.float32)
  check_pixels(x, pixel_limit)
  return x, None


def _read_pixel_check(pending: jax.Array | None, total: int, limit: float | None) -> None:
  """Reads a device batch's `_pixel_report` (if any) and raises as `check_pixels` does."""
  if pending is not None:
    _raise_for_pixels(parallel.fetch(pending), total, limit)


def reference(net: nets.Network, variables: nets.Variables, images: Any,
              thresholds: Sequence[float], criterion: Criterion | str = "entropy", *,
              pixel_limit: float | None = PIXEL_LIMIT) -> Prediction:
  """Early-exit decisions from the all-exits pass: the ground truth for `Cascade`.

  Args:
    net, variables: the network and its variables (eval mode).
    images: (B, H, W, C) float images, finite and preprocessed (module docstring,
      "Input policy": the same checks and errors as `Cascade.predict`).
    thresholds: E-1 floats, exits in order (required).
    criterion: a `criteria.Criterion`, or a name in `criteria.CRITERIA`.
    pixel_limit: largest pixel magnitude accepted (None: finiteness only).

  Returns:
    `Prediction` with (B,) label, exit and score; empty arrays for an empty batch.
  """
  nets.check_images(net, images)
  t = check_thresholds(net, thresholds, criterion)
  criterion = criteria.get(criterion)
  images, pending = _checked_images(images, pixel_limit)
  _read_pixel_check(pending, images.shape[0], pixel_limit)
  if images.shape[0] == 0:
    return _empty_prediction()
  logits, scores = jax.device_get(
      logits_and_scores(net, criterion, variables, jnp.asarray(images, jnp.float32)))
  leave = criterion.exits(scores[:-1], t[:, None])
  leave = np.concatenate([leave, np.ones_like(scores[-1:], bool)])
  exit_ = np.argmax(leave, axis=0).astype(np.int32)
  cols = np.arange(scores.shape[1])
  label = np.argmax(logits[exit_, cols], axis=-1).astype(np.int32)
  return Prediction(label, exit_, scores[exit_, cols].astype(np.float32))


def _empty_prediction() -> Prediction:
  empty = np.zeros(0, np.int32)
  return Prediction(empty, empty, np.zeros(0, np.float32))


def logits_and_scores(net: nets.Network, criterion: Criterion | str, variables: nets.Variables,
                      x: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Logits (E, B, C) and criterion scores (E, B) of every exit in one pass."""
  return _logits_and_scores_program(net, criteria.get(criterion))(variables, x)


@functools.cache
def _logits_and_scores_program(net: nets.Network, criterion: Criterion) -> Callable:
  """`logits_and_scores` jitted for one network and criterion (built on first use)."""
  def run(variables: nets.Variables, x: jax.Array) -> tuple[jax.Array, jax.Array]:
    logits = nets.forward(net, variables, x)[0].logits
    return logits, criterion.score(logits)

  return runtime.jit(run)


def _next_pow2(n: int) -> int:
  return 1 << max(0, (n - 1).bit_length())


def default_bucket(n: int) -> int:
  """The smallest default bucket that holds n rows: a power of two or 1.5 times one.

  With powers of two alone a bucket can be half padding (B-ResNet-20's stage 2, with 71%
  of a batch continuing, ran on the whole batch); with the 1.5x steps (1, 2, 3, 4, 6,
  8, 12, ...) it is at most a third (docs/performance.md has the measurements).
  """
  p = _next_pow2(n)
  return 3 * p // 4 if p >= 4 and 3 * p // 4 >= n else p


def default_buckets(n: int) -> list[int]:
  """Every default bucket up to `default_bucket(n)`: [1, 2, 3, 4, 6, 8, ...]."""
  top = default_bucket(n)
  sizes = [1 << i for i in range(top.bit_length())] + [3 << i for i in range(top.bit_length())]
  return sorted(s for s in sizes if s <= top)


class _Group(NamedTuple):
  """A bucket-sized batch in flight: rows [0, n) are real samples."""
  h: Any     # (b, ...) activation entering the next segment.
  pos: Any   # (b,) int32 original positions (meaningless past n).
  n: int
  b: int


class Cascade:
  """Early-exit inference for one network, its variables and a criterion.

  Args:
    net: the network (any number of exits).
    variables: all its collections ("params", "batch_stats", ...); run in eval mode.
    thresholds: E-1 floats, one per exit except the last.
    criterion: a `criteria.Criterion` or its name: "entropy" (exit when score < T),
      "max_prob" or "margin" (score > T). Held resolved, as a `Criterion`.
    buckets: batch sizes that programs are compiled for; a batch is padded up to the
      smallest bucket that holds it. Default: powers of two and 1.5 times them
      (`default_bucket`).
    chunk_size: batches larger than this run in chunks of this size (None: never).
      With explicit buckets, chunks never exceed the largest bucket.
    latency_mode: batch-1 strategy: "host", "cond", "batched" or "auto" ("host"
      for networks whose early trunk is cheap to recompute, else "cond"; resolved
      when batch 1 is first run or warmed up). `choose_latency_mode` measures
      instead, on images like the ones to serve.
    params_as_constants: compile parameters into the programs (faster dispatch; one
      cascade per set of variables) instead of passing them on every call.
    mesh: split every stage's batch over this mesh's data axis (None: one device).
      Buckets must be multiples of its device count D (default: D times the default
      buckets, up to the first that holds `chunk_size`, or 2**20 rows without chunks);
      batch 1 takes the batched path (latency_mode "batched"). With several
      processes, each calls `predict` with the same images and gets the whole result.
    bucket_net: the network whose layer implementations run a given bucket size
      (the same parameters and shapes as `net`; e.g. ``lambda b: nets.get(name,
      **nets.inference_options(name, b))``, as the benchmark does): the fastest
      convolution differs between batch 1, the small buckets of the samples that
      continue, and large batches. None: `net` for every bucket.
    pixel_limit: largest pixel magnitude `predict` accepts (None: finiteness only;
      module docstring, "Input policy").
  """

  def __init__(self, net: nets.Network, variables: nets.Variables,
               thresholds: Sequence[float], *, criterion: Criterion | str = "entropy",
               buckets: Iterable[int] | None = None,
               chunk_size: int | None = DEFAULT_CHUNK_SIZE,
               latency_mode: str = "auto", params_as_constants: bool = True,
               mesh: Mesh | None = None,
               bucket_net: Callable[[int], nets.Network] | None = None,
               pixel_limit: float | None = PIXEL_LIMIT):
    if latency_mode not in LATENCY_MODES:
      raise ValueError(f"Unknown latency_mode {latency_mode!r}; expected one of {LATENCY_MODES}.")
    _limit(pixel_limit)
    self.pixel_limit = pixel_limit
    self.net = net
    self.criterion = criteria.get(criterion)
    self.thresholds = check_thresholds(net, thresholds, self.criterion)
    self.latency_mode = latency_mode
    self._mesh = mesh
    self._rows = self._whole = None  # Shardings of batch-sized and whole arrays (mesh only).
    if mesh is not None:
      d = mesh.size
      if buckets is None:
        buckets = [d * b for b in default_buckets(-(-(chunk_size or 1 << 20) // d))]
      elif any(int(b) % d for b in buckets):
        raise ValueError(f"On a mesh of {d} devices every bucket must be a multiple of {d}; "
                         f"got {sorted(buckets)}. Pass multiples of {d}, or buckets=None.")
      self.latency_mode = "batched"
      self._rows, self._whole = parallel.data_sharding(mesh), parallel.replicated(mesh)
      variables = parallel.replicate(variables, mesh)
    if buckets is not None:
      self._buckets = tuple(sorted({int(b) for b in buckets}))
      if not self._buckets or self._buckets[0] < 1:
        raise ValueError(f"Buckets must be positive batch sizes; got {buckets}.")
      chunk_size = min(chunk_size or math.inf, self._buckets[-1])
    else:
      self._buckets = None
    if chunk_size is not None and chunk_size < 1:
      raise ValueError(f"chunk_size must be positive or None; got {chunk_size}.")
    self.chunk_size = chunk_size
    self._variables = variables
    self._constants = params_as_constants
    self._segments = [segment_fn(net, k, self.criterion) for k in range(net.num_exits)]
    self._bucket_net = bucket_net
    self._programs: dict[tuple, Any] = {}
    # The batch-1 hot path: its programs once compiled, input shape and thresholds
    # (kept on the device).
    self._one: tuple | None = None
    self._one_shape, self._one_t = (1, *net.input_shape), jax.device_put(self.thresholds)
    self.num_traces = 0  # Python-side trace counter: grows only when a program compiles.
    # Per-sample shape and dtype entering each segment, for ahead-of-time compilation.
    h = jax.ShapeDtypeStruct((1, *net.input_shape), jnp.float32)
    self._in_specs = []
    for seg in self._segments:
      self._in_specs.append(h)
      h = jax.eval_shape(seg, variables, h)[0]

  @property
  def num_compiled(self) -> int:
    """Number of compiled programs held."""
    return len(self._programs)

  # ---- public entry points ------------------------------------------------------

  def predict(self, images: Any, thresholds: Sequence[float] | None = None) -> Prediction:
    """Early-exit predictions.

    Args:
      images: (B, H, W, C) float images, finite and preprocessed as in training
        (module docstring, "Input policy": a ValueError otherwise): a host array,
        or a `jax.Array` of any float dtype (e.g. a whole split put on the devices
        once), which stays on the devices: chunks are sliced, cast to float32 and
        padded there, and on a mesh resharded over its data axis.
      thresholds: E-1 floats replacing the cascade's own for this call (no recompile).

    Returns:
      `Prediction` of numpy arrays: label (B,) int32, exit (B,) int32, score (B,) float32;
      empty for an empty batch.
    """
    progs = self._one
    if (progs is not None and thresholds is None and type(images) is np.ndarray
        and images.dtype is _F32 and images.shape == self._one_shape):
      # The batch-1 hot path, with the checks below done by this test: every
      # microsecond shows at batch 1, and each Python step here costs several after
      # XLA's run has evicted the interpreter's caches. Thresholds live on the device.
      out = np.asarray(progs[0](images, self._one_t))
      if out[1, 0] < 0:  # Goes on past the first exit: the rare case, checked here.
        check_pixels(images, self.pixel_limit)  # Every NaN image comes this way.
        out = _run_one(progs, images, self._one_t, out, self.net.num_exits - 1)
      return Prediction(out[0], out[1], out[2].view(_F32))
    nets.check_images(self.net, images)
    t = (self.thresholds if thresholds is None
         else check_thresholds(self.net, thresholds, self.criterion))
    x, pending = _checked_images(images, self.pixel_limit)
    if x.shape[0] == 0:
      return _empty_prediction()
    if x.shape[0] == 1 and self.latency_mode != "batched":
      if isinstance(x, jax.Array):
        _read_pixel_check(pending, 1, self.pixel_limit)
        x = x.astype(jnp.float32)  # The programs take float32; cast where the image is.
      progs = self._one_programs()
      out = _run_one(progs, x, t, np.asarray(progs[0](x, t)), self.net.num_exits - 1)
      return Prediction(out[0], out[1], out[2].view(_F32))
    return self._predict_batched(x, t, pending)

  def warmup(self, batch_sizes: Iterable[int]) -> None:
    """Compiles every program that batches of these sizes can reach, whatever the thresholds."""
    for size in batch_sizes:
      if size == 1 and self.latency_mode != "batched":
        self._one_programs()
        continue
      for n in {len(c) for c in self._chunks(size)}:
        reach = self._bucket_list(n)
        self._stage_program(0, self._bucket(n))
        prev = [self._bucket(n)]
        for k in range(1, self.net.num_exits):
          for b_in, b_out in itertools.product(prev, reach):
            if b_out <= b_in:
              self._prefix_program(k - 1, b_in, b_out)
          for b in reach:
            self._stage_program(k, b)
          prev = reach

  def choose_latency_mode(self, images: np.ndarray, *, repeats: int = 3) -> dict[str, float]:
    """Times batch 1 as "host" and as "cond" on `images` and keeps the faster.

    Which one wins depends on how many samples go on past exit 1, which "auto"
    cannot know: "host" recomputes the early trunk for them, "cond" pays its
    conditional on every sample. Pass images drawn like the ones to serve, not the
    ones to report on (the benchmark uses the validation split). Both are warmed up,
    then timed in rotation (`timing.interleaved_medians`), one image per call.

    Args:
      images: (N, H, W, C) float32 preprocessed images, N >= 1.
      repeats: timed passes over `images` per mode.

    Returns:
      ms per sample by mode; `latency_mode` is now the faster one.

    Raises:
      ValueError: a cascade on a mesh (batch 1 runs batched there) or no images.
    """
    if self._mesh is not None:
      raise ValueError("A cascade on a mesh runs batch 1 batched: no latency mode to choose.")
    singles = [np.ascontiguousarray(images[i:i + 1], np.float32) for i in range(len(images))]
    if not singles:
      raise ValueError("choose_latency_mode needs at least one image.")
    programs = {"host": tuple(self._exit_program(k) for k in range(self.net.num_exits)),
                "cond": (self._cond_program(),)}

    def run(mode: str) -> None:
      self.latency_mode, self._one = mode, programs[mode]
      for x in singles:
        self.predict(x)

    seconds = timing.interleaved_medians(
        {mode: functools.partial(run, mode) for mode in programs}, repeats=repeats, warmup=1)
    best = min(seconds, key=seconds.get)
    self.latency_mode, self._one = best, programs[best]
    return {mode: 1e3 * s / len(singles) for mode, s in seconds.items()}

  # ---- buckets and chunks -------------------------------------------------------

  def _bucket(self, n: int) -> int:
    if self._buckets is None:
      return default_bucket(n)
    return next(b for b in self._buckets if b >= n)

  def _bucket_list(self, n: int) -> list[int]:
    """Buckets of every count 1..n: the bucket sizes a chunk of n rows can reach."""
    if self._buckets is None:
      return default_buckets(n)
    return [b for b in self._buckets if b <= self._bucket(n)]

  def _chunks(self, size: int) -> list[range]:
    step = self.chunk_size or size
    return [range(s, min(s + step, size)) for s in range(0, size, step)]

  # ---- programs -------------------------------------------------------------------

  def _compile(self, key: tuple, fn: Callable, *specs: Any, out_shardings: Any = None) -> Any:
    """Compiles `fn(variables, *args)` once per key, ahead of time.

    On a mesh, `specs` carry the input shardings and `out_shardings` the outputs'.
    """
    prog = self._programs.get(key)
    if prog is None:
      def traced(*args):
        self.num_traces += 1
        return fn(*args)
      options = {} if self._mesh is None else {"out_shardings": out_shardings}
      if self._constants:
        v = self._variables
        prog = runtime.jit(lambda *args: traced(v, *args), **options).lower(*specs).compile()
      else:
        compiled = runtime.jit(traced, **options).lower(self._variables, *specs).compile()
        prog = lambda *args: compiled(self._variables, *args)  # noqa: E731
      self._programs[key] = prog
    return prog

  def _segment(self, k: int, b: int) -> Callable:
    """Segment k with the layer implementations chosen for bucket b."""
    if self._bucket_net is None:
      return self._segments[k]
    net = self._bucket_net(b)
    if (net.name, net.num_exits, net.input_shape) != (
        self.net.name, self.net.num_exits, self.net.input_shape):
      raise ValueError(f"bucket_net({b}) gave {net.name} ({net.num_exits} exits, input "
                       f"{net.input_shape}); it must be {self.net.name} with other layer "
                       f"options only.")
    return segment_fn(net, k, self.criterion)

  def _spec(self, k: int, b: int) -> jax.ShapeDtypeStruct:
    s = self._in_specs[k]
    return jax.ShapeDtypeStruct((b, *s.shape[1:]), s.dtype, sharding=self._rows)

  def _t_spec(self) -> jax.ShapeDtypeStruct:
    return jax.ShapeDtypeStruct((self.net.num_exits - 1,), jnp.float32, sharding=self._whole)

  def _stage_program(self, k: int, b: int) -> Any:
    """(h (b, ...), pos (b,), n, T (E-1,)) -> (h_next, order (b,), record (4, b)).

    `order` lists continuing rows first, in input order; the last segment returns the
    record alone. See `_record` for the record's rows.
    """
    prog = self._programs.get(("stage", k, b))
    if prog is not None:  # The hot path: nothing below is cheap (specs, networks).
      return prog
    seg, last, crit = self._segment(k, b), k == self.net.num_exits - 1, self.criterion

    def stage(variables, h, pos, n, t):
      h, logits, score = seg(variables, h)
      valid = jnp.arange(h.shape[0]) < n
      leave = valid if last else valid & crit.exits(score, t[k])
      record = _record(pos, logits, score, leave)
      if last:
        return record
      return h, _continuing_first(valid & ~leave), record

    idx = jax.ShapeDtypeStruct((b,), jnp.int32, sharding=self._rows)
    rows, whole = self._rows, self._whole
    return self._compile(("stage", k, b), stage, self._spec(k, b), idx,
                         jax.ShapeDtypeStruct((), jnp.int32, sharding=whole), self._t_spec(),
                         out_shardings=whole if last else (rows, whole, whole))

  def _prefix_program(self, k: int, b_in: int, b_out: int) -> Any:
    """(h, order, record) of segment k at b_in -> its first b_out rows in `order`: (h, pos)."""
    prog = self._programs.get(("prefix", k, b_in, b_out))
    if prog is not None:  # The hot path: the shape inference below traces segment k.
      return prog
    def prefix(variables, h, order, record):
      del variables
      idx = order[:b_out]
      return h[idx], record[0, idx]

    h = jax.eval_shape(self._segments[k], self._variables, self._spec(k, b_in))[0]
    rows, whole = self._rows, self._whole
    return self._compile(("prefix", k, b_in, b_out), prefix,
                         jax.ShapeDtypeStruct(h.shape, h.dtype, sharding=rows),
                         jax.ShapeDtypeStruct((b_in,), jnp.int32, sharding=whole),
                         jax.ShapeDtypeStruct((4, b_in), jnp.int32, sharding=whole),
                         out_shardings=(rows, rows))

  def _one_programs(self) -> tuple:
    """The batch-1 programs, run in turn until one returns an exit (see `_run_one`)."""
    if self._one is None:
      if self.latency_mode == "auto":
        self.latency_mode = ("host" if self._recompute_flops() <= HOST_MAX_RECOMPUTE_FLOPS
                             else "cond")
      if self.latency_mode == "cond":
        self._one = (self._cond_program(),)
      else:
        self._one = tuple(self._exit_program(k) for k in range(self.net.num_exits))
    return self._one

  def _recompute_flops(self) -> float:
    """Per-sample FLOPs of the trunk before the last exit's segment (XLA's count, on its
    own convolutions: it counts none inside a custom call such as `nets.onednn`'s)."""
    before = _stages_before(self.net, self.net.num_exits - 1)
    if not before:
      return 0.0
    trunk = jax.jit(_trunk_fn(self.net.with_conv_impl("xla"), before))
    return float(trunk.lower(self._variables, self._spec(0, 1)).cost_analysis().get("flops", 0.0))

  def _exit_program(self, k: int) -> Any:
    """(x (1, H, W, C), T (E-1,)) -> (3, 1) int32: exit k from the input image.

    Rows: label, k if the sample leaves here else -1, score bits. The trunk stages
    before segment k are recomputed (no heads).
    """
    net = self._bucket_net(1) if self._bucket_net is not None else self.net
    seg, last, crit = self._segment(k, 1), k == self.net.num_exits - 1, self.criterion
    trunk = _trunk_fn(net, _stages_before(self.net, k))

    def run(variables, x, t):
      _, logits, score = seg(variables, trunk(variables, x))
      leave = ~jnp.isnan(score[0]) if last else crit.exits(score[0], t[k])
      return _one_record(logits, score, jnp.where(leave, k, -1))

    return self._compile(("exit", k), run, self._spec(0, 1), self._t_spec())

  def _cond_program(self) -> Any:
    """(x (1, H, W, C), T (E-1,)) -> (3, 1) int32: label, exit, score bits; one program."""
    segs = [self._segment(k, 1) for k in range(self.net.num_exits)]
    last, crit = self.net.num_exits - 1, self.criterion

    def run_from(variables, k, h, t):
      h, logits, score = segs[k](variables, h)
      if k == last:  # A NaN score is no exit: the host checks the image (`predict`).
        return _one_record(logits, score, jnp.where(jnp.isnan(score[0]), -1, k))
      done = _one_record(logits, score, jnp.int32(k))
      return lax.cond(crit.exits(score[0], t[k]),
                      lambda h: done, lambda h: run_from(variables, k + 1, h, t), h)

    return self._compile(("cond",), lambda v, x, t: run_from(v, 0, x, t),
                         self._spec(0, 1), self._t_spec())

  # ---- the batched path -----------------------------------------------------------

  def _predict_batched(self, x: np.ndarray | jax.Array, t: np.ndarray,
                       pending: jax.Array | None) -> Prediction:
    """Every chunk of x (N, ...) through the stage programs; `pending`: the device
    array's `_pixel_report`, read (raising on bad images) before the first record."""
    groups = [self._chunk(x, rows) for rows in self._chunks(x.shape[0])]
    size = x.shape[0]
    label, exit_, score = (np.zeros(size, np.int32), np.zeros(size, np.int32),
                           np.zeros(size, np.float32))
    last = self.net.num_exits - 1
    for k in range(self.net.num_exits):
      # Dispatch every chunk before reading any result, so reads overlap compute.
      outs = [self._stage_program(k, g.b)(g.h, g.pos, np.int32(g.n), t) for g in groups]
      _read_pixel_check(pending, x.shape[0], self.pixel_limit)  # Computed before stage 0.
      pending = None
      survivors = []
      for g, out in zip(groups, outs):
        h, order, record = (None, None, out) if k == last else out
        rec = np.asarray(record)  # The one read per stage run: it carries the count too.
        leave = rec[3].astype(bool)
        p = rec[0, leave]
        label[p], exit_[p], score[p] = rec[1, leave], k, rec[2, leave].view(np.float32)
        c = g.n - int(leave.sum())
        if k == last or c == 0:
          continue
        b = self._bucket(c)
        if c == g.n and b == g.b:  # Nobody left: the gather would be the identity.
          survivors.append(_Group(h, g.pos, c, b))
        else:
          survivors.append(_Group(*self._prefix_program(k, g.b, b)(h, order, record), c, b))
      groups = survivors
    return Prediction(label, exit_, score)

  def _chunk(self, x: np.ndarray | jax.Array, rows: range) -> _Group:
    """Rows `rows` of the images x (N, H, W, C), padded to their bucket, for segment 0.

    A host array (float32) is cut and padded on the host; on a mesh every process
    holds the whole chunk and puts its devices' rows. A `jax.Array` never leaves the
    devices: `_take_rows` slices, casts and pads it where it lives, and on a mesh
    `jax.device_put` moves the result to the row sharding (a no-op when the slice of
    a row-sharded array already has it).
    """
    n, b = len(rows), self._bucket(len(rows))
    pos = np.arange(rows.start, rows.start + b, dtype=np.int32)
    if not isinstance(x, jax.Array):
      h = x[rows.start:rows.stop]
      if b > n:
        h = np.concatenate([h, np.zeros((b - n, *h.shape[1:]), h.dtype)])
      if self._mesh is not None:
        h, pos = parallel.put(h, self._rows), parallel.put(pos, self._rows)
      return _Group(h, pos, n, b)
    if n == b == x.shape[0] and x.dtype == _F32:  # The whole array, as the programs take it.
      h = x
    elif len(x.sharding.device_set) > 1:
      h = _take_rows_at(x, rows.start, n, b)
    else:
      h = _take_rows_from(x, np.int32(rows.start), n, b)
    if self._mesh is not None:
      h, pos = jax.device_put(h, self._rows), parallel.put(pos, self._rows)
    return _Group(h, pos, n, b)


def _take_rows(x: jax.Array, start: Any, n: int, b: int) -> jax.Array:
  """Rows [start, start + n) of x (N, ...) as float32, zero rows appended: (b, ...)."""
  h = lax.dynamic_slice_in_dim(x, start, n).astype(jnp.float32)
  return jnp.pad(h, [(0, b - n)] + [(0, 0)] * (x.ndim - 1))


# On one device the start is an argument: one program per (chunk size, bucket). On
# several it is a constant, which XLA partitions into a permute of just the rows that
# move between devices; a start known only at run time made every device gather the
# whole array (jax 0.10.2).
_take_rows_from = jax.jit(_take_rows, static_argnums=(2, 3))
_take_rows_at = jax.jit(_take_rows, static_argnums=(1, 2, 3))


def _continuing_first(cont: jax.Array) -> jax.Array:
  """(b,) bool -> (b,) int32 permutation: rows where `cont` holds first, each part in order.

  A stable partition by prefix sums and one scatter: linear in b, where a stable
  sort is b log b.
  """
  c = cont.astype(jnp.int32)
  dest = jnp.where(cont, jnp.cumsum(c) - 1, jnp.sum(c) + jnp.cumsum(1 - c) - 1)
  rows = jnp.arange(cont.shape[0], dtype=jnp.int32)
  return jnp.zeros_like(rows).at[dest].set(rows, unique_indices=True)


def _run_one(programs: Sequence[Any], x: Any, t: Any, first: np.ndarray, last: int
             ) -> np.ndarray:
  """Runs batch-1 programs after the first, whose record is `first`, until one's record
  has an exit; returns that record.

  Each returns a (3, 1) int32 record (`_one_record`): label, exit (-1: goes on), score
  bits. The last exit's program gives -1 for a NaN score; for an image that passed the
  input checks (NaN from the variables, say) the sample leaves there, as when batched.
  """
  out = first
  for prog in programs[1:]:
    if out[1, 0] >= 0:
      return out
    out = np.asarray(prog(x, t))
  if out[1, 0] < 0:
    out = out.copy()
    out[1, 0] = last
  return out


def _one_record(logits: jax.Array, score: jax.Array, exit_: jax.Array) -> jax.Array:
  """(3, 1) int32 rows of a batch of one: label, `exit_` (a scalar), score's float32 bits."""
  return jnp.stack([jnp.argmax(logits, axis=-1).astype(jnp.int32),
                    jnp.reshape(exit_, (1,)).astype(jnp.int32),
                    lax.bitcast_convert_type(score, jnp.int32)])


def _record(pos: jax.Array, logits: jax.Array, score: jax.Array, leave: jax.Array
            ) -> jax.Array:
  """(4, b) int32 rows: position, label, score's float32 bits, left here (0/1).

  One array because each device-to-host transfer has a fixed cost, which dominates
  at batch 1.
  """
  return jnp.stack([pos, jnp.argmax(logits, axis=-1).astype(jnp.int32),
                    lax.bitcast_convert_type(score, jnp.int32), leave.astype(jnp.int32)])
