// oneDNN's primitives for training on JAX's CPU backend, as XLA FFI handlers: 2-D
// convolutions with a bias (float32, NHWC activations, HWIO kernels; forward, input
// gradient, kernel and bias gradient), batch normalization with batch statistics and
// an optional ReLU (forward, backward), and max pooling (forward, backward).
//
// XLA:CPU's own convolutions (and the transposes that feed its kernel gradient) take
// most of a ResNet train step on a CPU, and its BatchNorm sums, pooling gradients and
// bias sums much of the rest; oneDNN's are several times faster. Built by
// bnet_jax/nets/onednn.py, which also registers the handlers with JAX.
#include <array>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <map>
#include <memory>
#include <mutex>
#include <stdexcept>
#include <string>
#include <unordered_map>

#include "oneapi/dnnl/dnnl.hpp"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;
using dnnl::memory;
using tag = dnnl::memory::format_tag;
using dt = dnnl::memory::data_type;

namespace {

enum Kind { kForward = 0, kInputGrad = 1, kKernelGrad = 2 };

// One convolution: input (N, H, W, C), kernel (KH, KW, C, O), output (N, OH, OW, O).
struct Geometry {
  int64_t n, h, w, c, kh, kw, o, oh, ow, sh, sw, pt, pb, pl, pr;
};

dnnl::engine& Engine() {
  static dnnl::engine engine(dnnl::engine::kind::cpu, 0);
  return engine;
}

// The stream every call runs on, one call at a time (`Guard`).
dnnl::stream& Stream() {
  static dnnl::stream stream(Engine());
  return stream;
}

// A buffer for reordered operands and oneDNN's scratchpad, reused across calls so that
// no call allocates and page-faults fresh memory.
class Arena {
 public:
  ~Arena() { std::free(data_); }
  char* Get(size_t bytes) {
    if (bytes > capacity_) {
      std::free(data_);
      capacity_ = Round(bytes + bytes / 4);
      data_ = std::aligned_alloc(4096, capacity_);
      if (data_ == nullptr) throw std::bad_alloc();
    }
    return static_cast<char*>(data_);
  }
  static size_t Round(size_t bytes) { return (bytes + 4095) / 4096 * 4096; }

 private:
  void* data_ = nullptr;
  size_t capacity_ = 0;
};

// The arena every pass uses: calls run one at a time (`Guard`).
Arena& SharedArena() {
  static Arena arena;
  return arena;
}

// A scratchpad of layout `desc` in the shared arena, for a pass that needs no other
// arena memory.
memory Scratchpad(const memory::desc& desc) {
  return memory(desc, Engine(), SharedArena().Get(Arena::Round(desc.get_size())));
}

// Plans made once per key and shared by every calling thread.
template <typename Key, typename Plan>
class PlanCache {
 public:
  template <typename Make>
  std::shared_ptr<Plan> Get(const Key& key, Make make) {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      auto it = plans_.find(key);
      if (it != plans_.end()) return it->second;
    }
    std::shared_ptr<Plan> plan = make();
    std::lock_guard<std::mutex> lock(mutex_);
    return plans_.emplace(key, plan).first->second;
  }

 private:
  std::mutex mutex_;
  std::map<Key, std::shared_ptr<Plan>> plans_;
};

// Calls run one at a time. Each runs on every core through OpenMP, and XLA runs
// independent operations concurrently (a convolution's two gradients, for one): two
// calls at once would each start an OpenMP team and oversubscribe the cores.
std::mutex exclusive;

// Runs `f` alone, reporting any exception (oneDNN's included) to XLA as an error of
// `what`.
template <typename F>
ffi::Error Guard(const char* what, F f) {
  try {
    std::lock_guard<std::mutex> lock(exclusive);
    f();
    return ffi::Error::Success();
  } catch (const std::exception& e) {
    return ffi::Error(ffi::ErrorCode::kInternal, std::string(what) + ": " + e.what());
  }
}

bool Rank4(ffi::Span<const int64_t> x) { return x.size() == 4; }

// A compiled primitive with the layouts it wants and the reorders from and to the
// plain NHWC / HWIO buffers XLA hands over (absent where the layouts agree).
struct Plan {
  dnnl::primitive primitive;
  memory::desc a, b, out;              // The primitive's operand layouts.
  memory::desc a_plain, b_plain, out_plain;
  memory::desc bias;                   // (O): the forward's bias, the kernel gradient's.
  memory::desc scratch;
  std::unique_ptr<dnnl::reorder> to_a, to_b, from_out;
};

PlanCache<std::array<int64_t, 16>, Plan> plans;

// The strides of `d` when it addresses memory like an unblocked layout (one inner
// block spanning a whole dimension, as in aBcd16b with 16 channels, is such a layout),
// with size-1 dimensions' strides zeroed; empty otherwise.
memory::dims PlainStrides(const memory::desc& d) {
  if (d.get_format_kind() != memory::format_kind::blocked || d.get_submemory_offset() != 0 ||
      d.get_padded_dims() != d.get_dims() || d.get_inner_nblks() > 1) {
    return {};
  }
  memory::dims strides = d.get_strides();
  const memory::dims dims = d.get_dims();
  if (d.get_inner_nblks() == 1) {
    const int64_t dim = d.get_inner_idxs()[0];
    if (dims[dim] != d.get_inner_blks()[0]) return {};
    strides[dim] = 1;
  }
  for (size_t i = 0; i < dims.size(); ++i) {
    if (dims[i] == 1) strides[i] = 0;
  }
  return strides;
}

// A reorder between two layouts, or none where they address memory alike.
std::unique_ptr<dnnl::reorder> Reorder(const memory::desc& from, const memory::desc& to) {
  if (from == to) return nullptr;
  const memory::dims plain = PlainStrides(from);
  if (!plain.empty() && plain == PlainStrides(to)) return nullptr;
  return std::make_unique<dnnl::reorder>(
      dnnl::reorder::primitive_desc(Engine(), from, Engine(), to));
}

// The plan for one geometry and pass. The gradients let oneDNN choose its
// own (blocked) layouts, reordering to and from the plain ones: with plain layouts
// they are 2-3x slower. The forward pass is fastest on the plain layouts. The forward
// adds the bias, and the kernel gradient computes the bias gradient in the same pass:
// in XLA each would be one more pass over the output.
std::shared_ptr<Plan> MakePlan(const Geometry& g, Kind kind) {
  const memory::dims src = {g.n, g.c, g.h, g.w}, wei = {g.o, g.c, g.kh, g.kw},
                     dst = {g.n, g.o, g.oh, g.ow};
  const memory::dims strides = {g.sh, g.sw}, pad_l = {g.pt, g.pl}, pad_r = {g.pb, g.pr};
  const memory::desc src_plain(src, dt::f32, tag::nhwc), wei_plain(wei, dt::f32, tag::hwio),
      dst_plain(dst, dt::f32, tag::nhwc), bias({g.o}, dt::f32, tag::a);
  const bool any = kind != kForward;
  const memory::desc src_q = any ? memory::desc(src, dt::f32, tag::any) : src_plain;
  const memory::desc wei_q = any ? memory::desc(wei, dt::f32, tag::any) : wei_plain;
  const memory::desc dst_q = any ? memory::desc(dst, dt::f32, tag::any) : dst_plain;
  dnnl::primitive_attr attr;
  attr.set_scratchpad_mode(dnnl::scratchpad_mode::user);
  const dnnl::convolution_forward::primitive_desc forward(
      Engine(), dnnl::prop_kind::forward_training, dnnl::algorithm::convolution_direct,
      src_q, wei_q, bias, dst_q, strides, pad_l, pad_r, attr);

  auto plan = std::make_shared<Plan>();
  plan->bias = bias;
  if (kind == kForward) {
    plan->primitive = dnnl::convolution_forward(forward);
    plan->a = forward.src_desc(), plan->a_plain = src_plain;
    plan->b = forward.weights_desc(), plan->b_plain = wei_plain;
    plan->out = forward.dst_desc(), plan->out_plain = dst_plain;
    plan->scratch = forward.scratchpad_desc();
  } else if (kind == kInputGrad) {
    const dnnl::convolution_backward_data::primitive_desc pd(
        Engine(), dnnl::algorithm::convolution_direct, src_q, wei_q, dst_q, strides, pad_l,
        pad_r, forward, attr);
    plan->primitive = dnnl::convolution_backward_data(pd);
    plan->a = pd.diff_dst_desc(), plan->a_plain = dst_plain;
    plan->b = pd.weights_desc(), plan->b_plain = wei_plain;
    plan->out = pd.diff_src_desc(), plan->out_plain = src_plain;
    plan->scratch = pd.scratchpad_desc();
  } else {
    const dnnl::convolution_backward_weights::primitive_desc pd(
        Engine(), dnnl::algorithm::convolution_direct, src_q, wei_q, bias, dst_q, strides,
        pad_l, pad_r, forward, attr);
    plan->primitive = dnnl::convolution_backward_weights(pd);
    plan->a = pd.src_desc(), plan->a_plain = src_plain;
    plan->b = pd.diff_dst_desc(), plan->b_plain = dst_plain;
    plan->out = pd.diff_weights_desc(), plan->out_plain = wei_plain;
    plan->scratch = pd.scratchpad_desc();
  }
  plan->to_a = Reorder(plan->a_plain, plan->a);
  plan->to_b = Reorder(plan->b_plain, plan->b);
  plan->from_out = Reorder(plan->out, plan->out_plain);
  return plan;
}

// Runs one pass: a and b are its two plain inputs, out its plain output, and `bias`
// the forward's bias or the kernel gradient's bias gradient (unused by the input
// gradient).
void Run(const Geometry& g, Kind kind, const float* a, const float* b, float* out,
         float* bias) {
  const auto plan = plans.Get({g.n, g.h, g.w, g.c, g.kh, g.kw, g.o, g.oh, g.ow, g.sh, g.sw,
                               g.pt, g.pb, g.pl, g.pr, kind},
                              [&] { return MakePlan(g, kind); });
  auto& engine = Engine();
  auto& stream = Stream();
  const size_t na = plan->to_a ? Arena::Round(plan->a.get_size()) : 0;
  const size_t nb = plan->to_b ? Arena::Round(plan->b.get_size()) : 0;
  const size_t no = plan->from_out ? Arena::Round(plan->out.get_size()) : 0;
  char* base = SharedArena().Get(na + nb + no + Arena::Round(plan->scratch.get_size()));
  // Each operand in the primitive's layout: the plain buffer itself where no reorder is
  // needed, else a copy in the arena.
  void* const a_data = plan->to_a ? static_cast<void*>(base) : const_cast<float*>(a);
  void* const b_data = plan->to_b ? static_cast<void*>(base + na) : const_cast<float*>(b);
  void* const out_data = plan->from_out ? static_cast<void*>(base + na + nb) : out;
  memory a_mem(plan->a, engine, a_data), b_mem(plan->b, engine, b_data),
      out_mem(plan->out, engine, out_data);
  if (plan->to_a) {
    memory a_plain(plan->a_plain, engine, const_cast<float*>(a));
    plan->to_a->execute(stream, a_plain, a_mem);
  }
  if (plan->to_b) {
    memory b_plain(plan->b_plain, engine, const_cast<float*>(b));
    plan->to_b->execute(stream, b_plain, b_mem);
  }
  std::unordered_map<int, memory> args = {
      {DNNL_ARG_SCRATCHPAD, memory(plan->scratch, engine, base + na + nb + no)}};
  if (kind == kForward) {
    args.insert({{DNNL_ARG_SRC, a_mem}, {DNNL_ARG_WEIGHTS, b_mem}, {DNNL_ARG_DST, out_mem},
                 {DNNL_ARG_BIAS, memory(plan->bias, engine, bias)}});
  } else if (kind == kInputGrad) {
    args.insert({{DNNL_ARG_DIFF_DST, a_mem}, {DNNL_ARG_WEIGHTS, b_mem},
                 {DNNL_ARG_DIFF_SRC, out_mem}});
  } else {
    args.insert({{DNNL_ARG_SRC, a_mem}, {DNNL_ARG_DIFF_DST, b_mem},
                 {DNNL_ARG_DIFF_WEIGHTS, out_mem},
                 {DNNL_ARG_DIFF_BIAS, memory(plan->bias, engine, bias)}});
  }
  plan->primitive.execute(stream, args);
  if (plan->from_out) {
    memory out_plain(plan->out_plain, engine, out);
    plan->from_out->execute(stream, out_mem, out_plain);
  }
  stream.wait();
}

// The geometry from the shapes XLA passes: x (N, H, W, C), kernel (KH, KW, C, O), y (N,
// OH, OW, O) and the (O) bias, whichever of them are the pass's inputs and outputs.
ffi::Error Call(Kind kind, ffi::Span<const int64_t> x, ffi::Span<const int64_t> k,
                ffi::Span<const int64_t> y, ffi::Span<const int64_t> bias_dims,
                const float* a, const float* b, float* out, float* bias, int64_t sh,
                int64_t sw, int64_t pt, int64_t pb, int64_t pl, int64_t pr) {
  if (!Rank4(x) || !Rank4(k) || !Rank4(y) || x[3] != k[2] || y[3] != k[3] || x[0] != y[0] ||
      bias_dims.size() != 1 || bias_dims[0] != k[3]) {
    return ffi::Error(ffi::ErrorCode::kInvalidArgument,
                      "onednn_conv: expected NHWC input, HWIO kernel, NHWC output and a bias "
                      "of one value per output channel");
  }
  const Geometry g{x[0], x[1], x[2], x[3], k[0], k[1], k[3], y[1], y[2],
                   sh,   sw,   pt,   pb,   pl,   pr};
  return Guard("onednn_conv", [&] { Run(g, kind, a, b, out, bias); });
}

ffi::Error Forward(ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> k,
                   ffi::Buffer<ffi::F32> bias, ffi::ResultBuffer<ffi::F32> y, int64_t sh,
                   int64_t sw, int64_t pt, int64_t pb, int64_t pl, int64_t pr) {
  return Call(kForward, x.dimensions(), k.dimensions(), y->dimensions(), bias.dimensions(),
              x.typed_data(), k.typed_data(), y->typed_data(),
              const_cast<float*>(bias.typed_data()), sh, sw, pt, pb, pl, pr);
}

ffi::Error InputGrad(ffi::Buffer<ffi::F32> dy, ffi::Buffer<ffi::F32> k,
                     ffi::ResultBuffer<ffi::F32> dx, int64_t sh, int64_t sw, int64_t pt,
                     int64_t pb, int64_t pl, int64_t pr) {
  const int64_t channels[1] = {k.dimensions()[3]};  // No bias: its gradient is elsewhere.
  return Call(kInputGrad, dx->dimensions(), k.dimensions(), dy.dimensions(),
              ffi::Span<const int64_t>(channels, 1),
              dy.typed_data(), k.typed_data(), dx->typed_data(), nullptr, sh, sw, pt, pb, pl,
              pr);
}

ffi::Error KernelGrad(ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> dy,
                      ffi::ResultBuffer<ffi::F32> dk, ffi::ResultBuffer<ffi::F32> dbias,
                      int64_t sh, int64_t sw, int64_t pt, int64_t pb, int64_t pl, int64_t pr) {
  return Call(kKernelGrad, x.dimensions(), dk->dimensions(), dy.dimensions(),
              dbias->dimensions(), x.typed_data(), dy.typed_data(), dk->typed_data(),
              dbias->typed_data(), sh, sw, pt, pb, pl, pr);
}

// ---- batch normalization with batch statistics, x (N, H, W, C) ----------------------

// With `relu`, the forward applies a ReLU after the normalization and records where
// it passed (one bit an element, in a workspace), and the backward masks the
// gradient with it: in XLA the ReLU and its gradient would be two more passes.
struct NormPlan {
  dnnl::batch_normalization_forward forward;
  dnnl::batch_normalization_backward backward;
  memory::desc data, channels, workspace, forward_scratch, backward_scratch;
};

PlanCache<std::array<int64_t, 6>, NormPlan> norm_plans;

std::shared_ptr<NormPlan> MakeNormPlan(const std::array<int64_t, 4>& x, float epsilon,
                                       bool relu) {
  auto plan = std::make_shared<NormPlan>();
  plan->data = memory::desc({x[0], x[3], x[1], x[2]}, dt::f32, tag::nhwc);
  plan->channels = memory::desc({x[3]}, dt::f32, tag::a);
  dnnl::primitive_attr attr;
  attr.set_scratchpad_mode(dnnl::scratchpad_mode::user);
  auto flags = dnnl::normalization_flags::use_scale | dnnl::normalization_flags::use_shift;
  if (relu) flags = flags | dnnl::normalization_flags::fuse_norm_relu;
  const dnnl::batch_normalization_forward::primitive_desc forward(
      Engine(), dnnl::prop_kind::forward_training, plan->data, plan->data, epsilon, flags, attr);
  const dnnl::batch_normalization_backward::primitive_desc backward(
      Engine(), dnnl::prop_kind::backward, plan->data, plan->data, plan->data, epsilon, flags,
      forward, attr);
  plan->forward = dnnl::batch_normalization_forward(forward);
  plan->backward = dnnl::batch_normalization_backward(backward);
  plan->workspace = forward.workspace_desc();
  plan->forward_scratch = forward.scratchpad_desc();
  plan->backward_scratch = backward.scratchpad_desc();
  return plan;
}

std::shared_ptr<NormPlan> GetNormPlan(const std::array<int64_t, 4>& x, float epsilon,
                                      bool relu) {
  int32_t eps_bits;
  std::memcpy(&eps_bits, &epsilon, sizeof eps_bits);
  return norm_plans.Get({x[0], x[1], x[2], x[3], eps_bits, relu},
                        [&] { return MakeNormPlan(x, epsilon, relu); });
}

// Runs the forward or backward pass for x's shape, `epsilon` and `relu` on `args`
// (pointers by oneDNN argument) with a scratchpad and the `ws_bytes` workspace.
ffi::Error RunNorm(ffi::Span<const int64_t> x, float epsilon, bool relu, bool backward,
                   const std::unordered_map<int, const float*>& args, void* ws,
                   size_t ws_bytes) {
  if (!Rank4(x))
    return ffi::Error(ffi::ErrorCode::kInvalidArgument, "onednn batch_norm: x must be NHWC");
  return Guard("onednn batch_norm", [&] {
    const auto plan = GetNormPlan({x[0], x[1], x[2], x[3]}, epsilon, relu);
    if (plan->workspace.get_size() != ws_bytes) {
      throw std::runtime_error("the workspace buffer's size is not oneDNN's");
    }
    const memory::desc& scratch = backward ? plan->backward_scratch : plan->forward_scratch;
    std::unordered_map<int, memory> memories = {{DNNL_ARG_SCRATCHPAD, Scratchpad(scratch)}};
    if (relu) memories.insert({DNNL_ARG_WORKSPACE, memory(plan->workspace, Engine(), ws)});
    for (const auto& [arg, data] : args) {
      const bool per_channel = arg != DNNL_ARG_SRC && arg != DNNL_ARG_DST &&
                               arg != DNNL_ARG_DIFF_SRC && arg != DNNL_ARG_DIFF_DST;
      memories.insert({arg, memory(per_channel ? plan->channels : plan->data, Engine(),
                                   const_cast<float*>(data))});
    }
    if (backward) {
      plan->backward.execute(Stream(), memories);
    } else {
      plan->forward.execute(Stream(), memories);
    }
    Stream().wait();
  });
}

ffi::Error NormForward(ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> scale,
                       ffi::Buffer<ffi::F32> shift, ffi::ResultBuffer<ffi::F32> y,
                       ffi::ResultBuffer<ffi::F32> mean, ffi::ResultBuffer<ffi::F32> variance,
                       ffi::ResultBuffer<ffi::U8> ws, float epsilon, bool relu) {
  return RunNorm(x.dimensions(), epsilon, relu, /*backward=*/false,
                 {{DNNL_ARG_SRC, x.typed_data()}, {DNNL_ARG_SCALE, scale.typed_data()},
                  {DNNL_ARG_SHIFT, shift.typed_data()}, {DNNL_ARG_DST, y->typed_data()},
                  {DNNL_ARG_MEAN, mean->typed_data()},
                  {DNNL_ARG_VARIANCE, variance->typed_data()}},
                 ws->untyped_data(), ws->size_bytes());
}

ffi::Error NormBackward(ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> dy,
                        ffi::Buffer<ffi::F32> mean, ffi::Buffer<ffi::F32> variance,
                        ffi::Buffer<ffi::F32> scale, ffi::Buffer<ffi::U8> ws,
                        ffi::ResultBuffer<ffi::F32> dx, ffi::ResultBuffer<ffi::F32> dscale,
                        ffi::ResultBuffer<ffi::F32> dshift, float epsilon, bool relu) {
  return RunNorm(x.dimensions(), epsilon, relu, /*backward=*/true,
                 {{DNNL_ARG_SRC, x.typed_data()}, {DNNL_ARG_DIFF_DST, dy.typed_data()},
                  {DNNL_ARG_MEAN, mean.typed_data()}, {DNNL_ARG_VARIANCE, variance.typed_data()},
                  {DNNL_ARG_SCALE, scale.typed_data()}, {DNNL_ARG_DIFF_SRC, dx->typed_data()},
                  {DNNL_ARG_DIFF_SCALE, dscale->typed_data()},
                  {DNNL_ARG_DIFF_SHIFT, dshift->typed_data()}},
                 const_cast<void*>(ws.untyped_data()), ws.size_bytes());
}

// ---- max pooling, x (N, H, W, C) ------------------------------------------------------
// Padding is never the max (oneDNN ignores it), as with -inf padding. The forward
// records in a workspace (one byte an output) which input each output took; the
// backward routes each output's gradient there.

struct PoolPlan {
  dnnl::pooling_forward forward;
  dnnl::pooling_backward backward;
  memory::desc src, dst, workspace, forward_scratch, backward_scratch;
};

PlanCache<std::array<int64_t, 14>, PoolPlan> pool_plans;

std::shared_ptr<PoolPlan> MakePoolPlan(const std::array<int64_t, 14>& k) {
  const auto [n, h, w, c, oh, ow, kh, kw, sh, sw, pt, pb, pl, pr] = k;
  auto plan = std::make_shared<PoolPlan>();
  plan->src = memory::desc({n, c, h, w}, dt::f32, tag::nhwc);
  plan->dst = memory::desc({n, c, oh, ow}, dt::f32, tag::nhwc);
  dnnl::primitive_attr attr;
  attr.set_scratchpad_mode(dnnl::scratchpad_mode::user);
  const dnnl::pooling_forward::primitive_desc forward(
      Engine(), dnnl::prop_kind::forward_training, dnnl::algorithm::pooling_max, plan->src,
      plan->dst, {sh, sw}, {kh, kw}, {0, 0}, {pt, pl}, {pb, pr}, attr);
  const dnnl::pooling_backward::primitive_desc backward(
      Engine(), dnnl::algorithm::pooling_max, plan->src, plan->dst, {sh, sw}, {kh, kw}, {0, 0},
      {pt, pl}, {pb, pr}, forward, attr);
  plan->forward = dnnl::pooling_forward(forward);
  plan->backward = dnnl::pooling_backward(backward);
  plan->workspace = forward.workspace_desc();
  plan->forward_scratch = forward.scratchpad_desc();
  plan->backward_scratch = backward.scratchpad_desc();
  return plan;
}

// Runs the forward (x -> y, workspace) or the backward (dy, workspace -> dx) pass.
ffi::Error RunPool(ffi::Span<const int64_t> x, ffi::Span<const int64_t> y, size_t ws_bytes,
                   bool backward, void* x_data, void* y_data, void* ws_data, int64_t kh,
                   int64_t kw, int64_t sh, int64_t sw, int64_t pt, int64_t pb, int64_t pl,
                   int64_t pr) {
  if (!Rank4(x) || !Rank4(y) || x[0] != y[0] || x[3] != y[3]) {
    return ffi::Error(ffi::ErrorCode::kInvalidArgument,
                      "onednn max_pool: expected NHWC input and output");
  }
  return Guard("onednn max_pool", [&] {
    const std::array<int64_t, 14> key = {x[0], x[1], x[2], x[3], y[1], y[2], kh,
                                         kw,   sh,   sw,   pt,   pb,   pl,   pr};
    const auto plan = pool_plans.Get(key, [&] { return MakePoolPlan(key); });
    if (plan->workspace.get_size() > ws_bytes) {
      throw std::runtime_error("the workspace buffer is smaller than oneDNN's");
    }
    const memory::desc& scratch = backward ? plan->backward_scratch : plan->forward_scratch;
    std::unordered_map<int, memory> args = {
        {DNNL_ARG_SCRATCHPAD, Scratchpad(scratch)},
        {DNNL_ARG_WORKSPACE, memory(plan->workspace, Engine(), ws_data)}};
    if (backward) {
      args.insert({{DNNL_ARG_DIFF_DST, memory(plan->dst, Engine(), y_data)},
                   {DNNL_ARG_DIFF_SRC, memory(plan->src, Engine(), x_data)}});
      plan->backward.execute(Stream(), args);
    } else {
      args.insert({{DNNL_ARG_SRC, memory(plan->src, Engine(), x_data)},
                   {DNNL_ARG_DST, memory(plan->dst, Engine(), y_data)}});
      plan->forward.execute(Stream(), args);
    }
    Stream().wait();
  });
}

ffi::Error PoolForward(ffi::Buffer<ffi::F32> x, ffi::ResultBuffer<ffi::F32> y,
                       ffi::ResultBuffer<ffi::U8> ws, int64_t kh, int64_t kw, int64_t sh,
                       int64_t sw, int64_t pt, int64_t pb, int64_t pl, int64_t pr) {
  return RunPool(x.dimensions(), y->dimensions(), ws->size_bytes(), /*backward=*/false,
                 const_cast<float*>(x.typed_data()), y->typed_data(), ws->untyped_data(), kh,
                 kw, sh, sw, pt, pb, pl, pr);
}

ffi::Error PoolBackward(ffi::Buffer<ffi::F32> dy, ffi::Buffer<ffi::U8> ws,
                        ffi::ResultBuffer<ffi::F32> dx, int64_t kh, int64_t kw, int64_t sh,
                        int64_t sw, int64_t pt, int64_t pb, int64_t pl, int64_t pr) {
  return RunPool(dx->dimensions(), dy.dimensions(), ws.size_bytes(), /*backward=*/true,
                 dx->typed_data(), const_cast<float*>(dy.typed_data()),
                 const_cast<void*>(ws.untyped_data()), kh, kw, sh, sw, pt, pb, pl, pr);
}

}  // namespace

// The convolutions' attributes: strides and zero padding.
#define BNET_CONV_ATTRIBUTES                                                            \
  .Attr<int64_t>("stride_h")                                                            \
      .Attr<int64_t>("stride_w")                                                        \
      .Attr<int64_t>("pad_top")                                                         \
      .Attr<int64_t>("pad_bottom")                                                      \
      .Attr<int64_t>("pad_left")                                                        \
      .Attr<int64_t>("pad_right")

XLA_FFI_DEFINE_HANDLER_SYMBOL(BnetOnednnConvForward, Forward,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // x
                                  .Arg<ffi::Buffer<ffi::F32>>()  // kernel
                                  .Arg<ffi::Buffer<ffi::F32>>()  // bias
                                  .Ret<ffi::Buffer<ffi::F32>>()  // y
                                      BNET_CONV_ATTRIBUTES);
XLA_FFI_DEFINE_HANDLER_SYMBOL(BnetOnednnConvInputGrad, InputGrad,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // dy
                                  .Arg<ffi::Buffer<ffi::F32>>()  // kernel
                                  .Ret<ffi::Buffer<ffi::F32>>()  // dx
                                      BNET_CONV_ATTRIBUTES);
XLA_FFI_DEFINE_HANDLER_SYMBOL(BnetOnednnConvKernelGrad, KernelGrad,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // x
                                  .Arg<ffi::Buffer<ffi::F32>>()  // dy
                                  .Ret<ffi::Buffer<ffi::F32>>()  // dkernel
                                  .Ret<ffi::Buffer<ffi::F32>>()  // dbias
                                      BNET_CONV_ATTRIBUTES);

XLA_FFI_DEFINE_HANDLER_SYMBOL(BnetOnednnNormForward, NormForward,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // x
                                  .Arg<ffi::Buffer<ffi::F32>>()  // scale
                                  .Arg<ffi::Buffer<ffi::F32>>()  // shift
                                  .Ret<ffi::Buffer<ffi::F32>>()  // y
                                  .Ret<ffi::Buffer<ffi::F32>>()  // mean
                                  .Ret<ffi::Buffer<ffi::F32>>()  // variance (biased)
                                  .Ret<ffi::Buffer<ffi::U8>>()   // workspace (ReLU only)
                                  .Attr<float>("epsilon")
                                  .Attr<bool>("relu"));
XLA_FFI_DEFINE_HANDLER_SYMBOL(BnetOnednnNormBackward, NormBackward,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // x
                                  .Arg<ffi::Buffer<ffi::F32>>()  // dy
                                  .Arg<ffi::Buffer<ffi::F32>>()  // mean
                                  .Arg<ffi::Buffer<ffi::F32>>()  // variance
                                  .Arg<ffi::Buffer<ffi::F32>>()  // scale
                                  .Arg<ffi::Buffer<ffi::U8>>()   // workspace
                                  .Ret<ffi::Buffer<ffi::F32>>()  // dx
                                  .Ret<ffi::Buffer<ffi::F32>>()  // dscale
                                  .Ret<ffi::Buffer<ffi::F32>>()  // dshift
                                  .Attr<float>("epsilon")
                                  .Attr<bool>("relu"));

// The pooling's attributes: its window, then strides and padding as a convolution's.
#define BNET_POOL_ATTRIBUTES \
  .Attr<int64_t>("window_h").Attr<int64_t>("window_w") BNET_CONV_ATTRIBUTES

XLA_FFI_DEFINE_HANDLER_SYMBOL(BnetOnednnPoolForward, PoolForward,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // x
                                  .Ret<ffi::Buffer<ffi::F32>>()  // y
                                  .Ret<ffi::Buffer<ffi::U8>>()   // workspace
                                      BNET_POOL_ATTRIBUTES);
XLA_FFI_DEFINE_HANDLER_SYMBOL(BnetOnednnPoolBackward, PoolBackward,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // dy
                                  .Arg<ffi::Buffer<ffi::U8>>()   // workspace
                                  .Ret<ffi::Buffer<ffi::F32>>()  // dx
                                      BNET_POOL_ATTRIBUTES);

// oneDNN's version as major * 10000 + minor * 100 + patch.
extern "C" int bnet_onednn_version() {
  const auto* v = dnnl::version();
  return static_cast<int>(v->major * 10000 + v->minor * 100 + v->patch);
}

// The bytes of the workspace that batch normalization with a ReLU (N, H, W, C) needs,
// or -1 if oneDNN has no such primitive. Makes the plan the calls will use.
extern "C" int64_t bnet_onednn_norm_relu_workspace_bytes(int64_t n, int64_t h, int64_t w,
                                                         int64_t c, float epsilon) {
  try {
    return static_cast<int64_t>(
        GetNormPlan({n, h, w, c}, epsilon, true)->workspace.get_size());
  } catch (const std::exception&) {
    return -1;
  }
}
