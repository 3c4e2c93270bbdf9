// 2-D convolutions on oneDNN for XLA:CPU, as XLA FFI custom calls (cnnjax/ops/conv.py builds and calls them).
//
// Activations are NHWC and kernels HWIO (XLA's layouts), float32. cnnjax_conv_forward computes y from x and w,
// cnnjax_conv_input_grad dx from dy and w, cnnjax_conv_weight_grad dw from x and dy: three calls, so that XLA
// drops the input gradient nobody reads (the first layer's). Dimensions before N, H, W, C are independent
// problems (vmap), run one after another. Each shape gets its primitives once (oneDNN compiles kernels for
// them) and keeps them; arguments whose layout oneDNN wants blocked are reordered into per-thread buffers.
// A call with `threads` = 0 runs on all cores (OpenMP), one such call at a time (XLA may start two at once on its
// own threads); one with `threads` = n > 0 runs on n OpenMP threads, beside any other such call (members of an
// ensemble trained on one thread each, cnnjax/train/steps.py).
#include <cstdlib>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <unordered_map>
#include <vector>

#include <omp.h>

#include "oneapi/dnnl/dnnl.hpp"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;
using dnnl::memory;
using tag = memory::format_tag;

namespace {

dnnl::engine& Engine() {
  static dnnl::engine engine(dnnl::engine::kind::cpu, 0);
  return engine;
}

// One convolution's sizes and geometry (oneDNN counts dilation from 0).
struct Shape {
  int64_t N, H, W, C, Ho, Wo, K, KH, KW;
  memory::dims strides, lo, hi, dilation;

  std::vector<int64_t> Key() const {
    return {N, H, W, C, Ho, Wo, K, KH, KW, strides[0], strides[1], lo[0], lo[1], hi[0], hi[1], dilation[0], dilation[1]};
  }
  memory::desc Src(tag t) const { return {{N, C, H, W}, memory::data_type::f32, t}; }
  memory::desc Dst(tag t) const { return {{N, K, Ho, Wo}, memory::data_type::f32, t}; }
  memory::desc Weights(tag t) const { return {{K, C, KH, KW}, memory::data_type::f32, t}; }
  // Activations in layout `t` (nhwc, or any: oneDNN's choice) and the kernel in hwio or oneDNN's choice.
  dnnl::convolution_forward::primitive_desc Forward(tag t, const dnnl::primitive_attr& attr) const {
    return {Engine(), dnnl::prop_kind::forward_training, dnnl::algorithm::convolution_direct, Src(t),
            Weights(t == tag::any ? tag::any : tag::hwio), Dst(t), strides, dilation, lo, hi, attr};
  }
};

// A primitive and its arguments (inputs, then the output), each in XLA's layout (`user`) and in oneDNN's
// (`inner`), with the reorder between them where they differ.
struct Plan {
  dnnl::primitive primitive;
  std::vector<int> args;
  std::vector<memory::desc> user, inner;
  std::vector<dnnl::reorder> reorders;
  memory::desc scratchpad;

  Plan(dnnl::primitive p, std::vector<int> a, std::vector<memory::desc> u, std::vector<memory::desc> i,
       memory::desc s)
      : primitive(p), args(a), user(u), inner(i), scratchpad(s) {
    for (size_t k = 0; k < args.size(); ++k) {
      const bool output = k + 1 == args.size();
      if (user[k] == inner[k]) reorders.emplace_back();
      else if (output) reorders.emplace_back(dnnl::reorder::primitive_desc(Engine(), inner[k], Engine(), user[k]));
      else reorders.emplace_back(dnnl::reorder::primitive_desc(Engine(), user[k], Engine(), inner[k]));
    }
  }
};

dnnl::primitive_attr OwnScratchpad() {
  dnnl::primitive_attr attr;
  attr.set_scratchpad_mode(dnnl::scratchpad_mode::user);  // in our buffers: calls may run concurrently
  return attr;
}

// The layouts are those oneDNN runs fastest on 2-D CIFAR/ImageNet shapes: NHWC for the forward pass where
// oneDNN has direct kernels for it (brgemm, on AVX-512 CPUs), else its own blocked layouts, as always for
// the gradients (in NHWC oneDNN falls back to im2col + GEMM: ~4x slower on AVX2).
bool Im2colGemm(const dnnl::primitive_desc_base& pd) {
  return std::string(pd.impl_info_str()).find("gemm") != std::string::npos;
}

std::unique_ptr<Plan> ForwardPlan(const Shape& s) {  // x, w -> y
  auto pd = s.Forward(tag::nhwc, OwnScratchpad());
  if (Im2colGemm(pd)) pd = s.Forward(tag::any, OwnScratchpad());
  return std::make_unique<Plan>(dnnl::convolution_forward(pd), std::vector<int>{DNNL_ARG_SRC, DNNL_ARG_WEIGHTS, DNNL_ARG_DST},
      std::vector<memory::desc>{s.Src(tag::nhwc), s.Weights(tag::hwio), s.Dst(tag::nhwc)},
      std::vector<memory::desc>{pd.src_desc(), pd.weights_desc(), pd.dst_desc()}, pd.scratchpad_desc());
}

std::unique_ptr<Plan> BackwardDataPlan(const Shape& s) {  // dy, w -> dx
  auto pd = dnnl::convolution_backward_data::primitive_desc(Engine(), dnnl::algorithm::convolution_direct,
      s.Src(tag::any), s.Weights(tag::any), s.Dst(tag::any), s.strides, s.dilation, s.lo, s.hi,
      s.Forward(tag::any, {}), OwnScratchpad());
  return std::make_unique<Plan>(dnnl::convolution_backward_data(pd), std::vector<int>{DNNL_ARG_DIFF_DST, DNNL_ARG_WEIGHTS, DNNL_ARG_DIFF_SRC},
      std::vector<memory::desc>{s.Dst(tag::nhwc), s.Weights(tag::hwio), s.Src(tag::nhwc)},
      std::vector<memory::desc>{pd.diff_dst_desc(), pd.weights_desc(), pd.diff_src_desc()}, pd.scratchpad_desc());
}

std::unique_ptr<Plan> BackwardWeightsPlan(const Shape& s) {  // x, dy -> dw
  auto pd = dnnl::convolution_backward_weights::primitive_desc(Engine(), dnnl::algorithm::convolution_direct,
      s.Src(tag::any), s.Weights(tag::any), s.Dst(tag::any), s.strides, s.dilation, s.lo, s.hi,
      s.Forward(tag::any, {}), OwnScratchpad());
  return std::make_unique<Plan>(dnnl::convolution_backward_weights(pd), std::vector<int>{DNNL_ARG_SRC, DNNL_ARG_DIFF_DST, DNNL_ARG_DIFF_WEIGHTS},
      std::vector<memory::desc>{s.Src(tag::nhwc), s.Dst(tag::nhwc), s.Weights(tag::hwio)},
      std::vector<memory::desc>{pd.src_desc(), pd.diff_dst_desc(), pd.diff_weights_desc()}, pd.scratchpad_desc());
}

enum Kind { kForward, kBackwardData, kBackwardWeights };

// The plan for `kind` and `s` on as many threads as OpenMP gives the calling thread now.
const Plan& GetPlan(Kind kind, const Shape& s) {
  static std::mutex mu;
  static std::map<std::vector<int64_t>, std::unique_ptr<Plan>> plans;
  auto key = s.Key();
  key.push_back(kind);
  key.push_back(omp_get_max_threads());
  std::lock_guard<std::mutex> lock(mu);
  auto& plan = plans[key];
  if (!plan) plan = kind == kForward ? ForwardPlan(s) : kind == kBackwardData ? BackwardDataPlan(s) : BackwardWeightsPlan(s);
  return *plan;
}

// Buffer `slot` of the calling thread, at least `bytes` long (XLA may run two calls at once, on two threads).
void* Buffer(size_t slot, size_t bytes) {
  thread_local std::vector<std::unique_ptr<char, decltype(&std::free)>> buffers;
  thread_local std::vector<size_t> sizes;
  while (buffers.size() <= slot) {
    buffers.emplace_back(nullptr, &std::free);
    sizes.push_back(0);
  }
  if (sizes[slot] < bytes) {
    buffers[slot].reset(static_cast<char*>(std::aligned_alloc(64, (bytes + 63) / 64 * 64)));
    sizes[slot] = bytes;
  }
  return buffers[slot].get();
}

// Runs `plan` on XLA's buffers (inputs, then the output), `problems` times over consecutive slices.
void Run(const Plan& plan, const std::vector<void*>& data, int64_t problems) {
  auto& engine = Engine();
  dnnl::stream stream(engine);
  const size_t n = plan.args.size(), out = n - 1;
  size_t slot = 0;
  memory scratchpad(plan.scratchpad, engine, Buffer(slot++, plan.scratchpad.get_size() + 1));
  std::vector<memory> inner;
  for (size_t k = 0; k < n; ++k)
    inner.emplace_back(plan.inner[k], engine, plan.reorders[k] ? Buffer(slot++, plan.inner[k].get_size()) : nullptr);
  for (int64_t p = 0; p < problems; ++p) {
    std::unordered_map<int, memory> args{{DNNL_ARG_SCRATCHPAD, scratchpad}};
    std::vector<memory> user;
    for (size_t k = 0; k < n; ++k) {
      user.emplace_back(plan.user[k], engine, static_cast<char*>(data[k]) + p * plan.user[k].get_size());
      if (plan.reorders[k] && k != out) plan.reorders[k].execute(stream, user[k], inner[k]);
      args[plan.args[k]] = plan.reorders[k] ? inner[k] : user[k];
    }
    plan.primitive.execute(stream, args);
    if (plan.reorders[out]) plan.reorders[out].execute(stream, inner[out], user[out]);
  }
  stream.wait();
}

using Ints = ffi::Span<const int64_t>;

ffi::Error Describe(Ints x, Ints y, Ints w, Ints strides, Ints lo, Ints hi, Ints dilation, Shape* s, int64_t* problems) {
  const size_t r = x.size();
  if (r < 4 || y.size() != r || w.size() != r || strides.size() != 2 || lo.size() != 2 || hi.size() != 2 ||
      dilation.size() != 2)
    return ffi::Error::InvalidArgument("cnnjax oneDNN convolution: expected [..., N, H, W, C] activations, "
                                       "[..., KH, KW, C, K] kernels and two strides, paddings and dilations");
  *s = {x[r - 4], x[r - 3], x[r - 2], x[r - 1], y[r - 3], y[r - 2], y[r - 1], w[r - 4], w[r - 3],
        {strides[0], strides[1]}, {lo[0], lo[1]}, {hi[0], hi[1]}, {dilation[0] - 1, dilation[1] - 1}};
  *problems = 1;
  for (size_t k = 0; k + 4 < r; ++k) *problems *= x[k];
  return ffi::Error::Success();
}

template <class F>
ffi::Error Guarded(F run) {
  try {
    run();
  } catch (const dnnl::error& e) {
    return ffi::Error::Internal(std::string("oneDNN convolution failed: ") + e.what());
  }
  return ffi::Error::Success();
}

// x, y, w: the dimensions of the activations, the convolution's output and the kernel, wherever they come from.
ffi::Error RunKind(Kind kind, Ints x, Ints y, Ints w, std::vector<void*> data, Ints strides, Ints lo, Ints hi,
                   Ints dilation, int64_t threads) {
  Shape s;
  int64_t problems;
  if (auto e = Describe(x, y, w, strides, lo, hi, dilation, &s, &problems); e.failure()) return e;
  if (threads > 0) {  // this thread's OpenMP thread count for the call, then back to what it was
    const int before = omp_get_max_threads();
    omp_set_num_threads(static_cast<int>(threads));
    auto e = Guarded([&] { Run(GetPlan(kind, s), data, problems); });
    omp_set_num_threads(before);
    return e;
  }
  static std::mutex one_at_a_time;
  std::lock_guard<std::mutex> lock(one_at_a_time);
  return Guarded([&] { Run(GetPlan(kind, s), data, problems); });
}

ffi::Error ConvForwardImpl(ffi::AnyBuffer x, ffi::AnyBuffer w, ffi::Result<ffi::AnyBuffer> y, Ints strides,
                           Ints lo, Ints hi, Ints dilation, int64_t threads) {
  return RunKind(kForward, x.dimensions(), y->dimensions(), w.dimensions(),
                 {x.untyped_data(), w.untyped_data(), y->untyped_data()}, strides, lo, hi, dilation, threads);
}

ffi::Error ConvInputGradImpl(ffi::AnyBuffer dy, ffi::AnyBuffer w, ffi::Result<ffi::AnyBuffer> dx, Ints strides,
                             Ints lo, Ints hi, Ints dilation, int64_t threads) {
  return RunKind(kBackwardData, dx->dimensions(), dy.dimensions(), w.dimensions(),
                 {dy.untyped_data(), w.untyped_data(), dx->untyped_data()}, strides, lo, hi, dilation, threads);
}

ffi::Error ConvWeightGradImpl(ffi::AnyBuffer x, ffi::AnyBuffer dy, ffi::Result<ffi::AnyBuffer> dw, Ints strides,
                              Ints lo, Ints hi, Ints dilation, int64_t threads) {
  return RunKind(kBackwardWeights, x.dimensions(), dy.dimensions(), dw->dimensions(),
                 {x.untyped_data(), dy.untyped_data(), dw->untyped_data()}, strides, lo, hi, dilation, threads);
}

}  // namespace

// Whether oneDNN has direct kernels for NHWC forward convolutions on this CPU (brgemm: AVX-512 in oneDNN
// 2023.2), where its convolutions beat XLA's; on AVX2, in blocked layouts, they lose on the small models and
// are about even on ResNet-20 (results/benchmark/NOTES.md).
extern "C" int cnnjax_onednn_direct_nhwc() {
  const Shape s{32, 16, 16, 32, 16, 16, 32, 3, 3, {1, 1}, {1, 1}, {1, 1}, {0, 0}};
  return !Im2colGemm(s.Forward(tag::nhwc, {}));
}

#define CNNJAX_CONV_HANDLER(name, impl)                                                                \
  XLA_FFI_DEFINE_HANDLER_SYMBOL(name, impl,                                                           \
      ffi::Ffi::Bind().Arg<ffi::AnyBuffer>().Arg<ffi::AnyBuffer>().Ret<ffi::AnyBuffer>()                 \
          .Attr<Ints>("strides").Attr<Ints>("pad_lo").Attr<Ints>("pad_hi").Attr<Ints>("dilation")      \
          .Attr<int64_t>("threads"));

CNNJAX_CONV_HANDLER(ConvForward, ConvForwardImpl)
CNNJAX_CONV_HANDLER(ConvInputGrad, ConvInputGradImpl)
CNNJAX_CONV_HANDLER(ConvWeightGrad, ConvWeightGradImpl)
