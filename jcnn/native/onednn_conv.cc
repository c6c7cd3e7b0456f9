// Convolutions for XLA:CPU through oneDNN, exposed as XLA FFI handlers.
//
// Three handlers, one per product of a convolution y = conv(x, w):
//   jcnn_conv_forward          (x, w)  -> y
//   jcnn_conv_backward_data    (dy, w) -> dx
//   jcnn_conv_backward_weights (x, dy) -> dw
// in jcnn's layout: activations (N, *spatial, C) and kernels (*window, C / groups, C_out), row-major,
// float32 or bfloat16 (all three operands alike; oneDNN accumulates bfloat16 in float32). Every operand may carry extra leading axes from jax.vmap (vmap_method="expand_dims"): an
// operand that is not batched along an axis has size 1 there. When the kernel of a forward or
// input-gradient call is not batched, the leading axes fold into N (one oneDNN call); otherwise,
// and always for the weight gradient, the call loops over them (in parallel when there are many).
//
// Primitives are cached by problem and run with scratchpads owned by the calling thread, so
// concurrent calls from XLA's threads are safe.

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <mutex>
#include <sstream>
#include <string>
#include <unordered_map>
#include <vector>

#include <omp.h>

#include "oneapi/dnnl/dnnl.hpp"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;
using dnnl::memory;
using Dims = memory::dims;

namespace {

enum class Op { kForward, kBackwardData, kBackwardWeights };

// One convolution problem, with the vmap axes already folded or stripped.
struct Problem {
  Op op;
  memory::data_type dtype;
  int64_t batch, channels, out_channels, groups;
  Dims in_sizes, out_sizes, window, stride, dilation, pad_lo, pad_hi;
  bool one_thread = false;  // run by one thread of a parallel loop over problems

  std::string Key() const {
    std::ostringstream key;
    key << static_cast<int>(op) << '|' << static_cast<int>(dtype) << '|' << batch << '|' << channels << '|' << out_channels << '|'
        << groups << '|' << one_thread;
    // The threads the primitive is made for (it splits its work for them when created): a plan
    // made where OpenMP allows this thread one (torch.set_num_threads(1) sets that for the thread
    // calling it; torch and oneDNN share one OpenMP library) is not reused where it allows more.
    key << '|' << (one_thread ? 1 : omp_get_max_threads());
    for (const Dims* dims :
         {&in_sizes, &out_sizes, &window, &stride, &dilation, &pad_lo, &pad_hi}) {
      key << '|';
      for (int64_t d : *dims) key << d << ',';
    }
    return key.str();
  }
};

dnnl::engine& Engine() {
  static dnnl::engine engine(dnnl::engine::kind::cpu, 0);
  return engine;
}

memory::format_tag ChannelsLast(size_t spatial_rank) {
  switch (spatial_rank) {
    case 1:
      return memory::format_tag::nwc;
    case 2:
      return memory::format_tag::nhwc;
    default:
      return memory::format_tag::ndhwc;
  }
}

memory::desc ActivationDesc(const Problem& p, int64_t channels, const Dims& sizes) {
  Dims dims{p.batch, channels};
  dims.insert(dims.end(), sizes.begin(), sizes.end());
  return memory::desc(dims, p.dtype, ChannelsLast(sizes.size()));
}

// The kernel (*window, C / G, O) as oneDNN's (O, C, *window) or (G, O / G, C / G, *window).
memory::desc KernelDims(const Problem& p, Dims* dims) {
  const int64_t per_group_in = p.channels / p.groups, per_group_out = p.out_channels / p.groups;
  int64_t window_stride = per_group_in * p.out_channels;
  Dims window_strides(p.window.size());
  for (size_t i = p.window.size(); i-- > 0;) {
    window_strides[i] = window_stride;
    window_stride *= p.window[i];
  }
  Dims strides;
  if (p.groups == 1) {
    *dims = {p.out_channels, p.channels};
    strides = {1, p.out_channels};
  } else {
    *dims = {p.groups, per_group_out, per_group_in};
    strides = {per_group_out, 1, p.out_channels};
  }
  dims->insert(dims->end(), p.window.begin(), p.window.end());
  strides.insert(strides.end(), window_strides.begin(), window_strides.end());
  return memory::desc(*dims, p.dtype, strides);
}

// Some products run in the activation layout oneDNN picks for them (channels in blocks of 8 or 16),
// the activations reordered in and out, where oneDNN's channels-last kernels measured slower than
// its blocked ones with the reorders (AVX2 EPYC, against PyTorch, which runs the blocked ones):
// grouped convolutions that are not depthwise (8 groups of 16 channels: 0.6x PyTorch -> 0.9-1.0x)
// and 1-D weight gradients (0.56-0.70x -> 1.0-1.1x). Dense 2-D and 3-D products lost speed or
// gained none in that layout, depthwise ones too. A layout whose kernel is a GEMM (few channels per
// group) is not taken: the channels-last kernel was faster. With AVX-512 only grouped weight
// gradients take it (AVX-512 EPYC, 32 groups of 8 channels: 0.54 against 0.79-0.83 ms; 8 and 2
// groups 1.02-1.17x faster): there the channels-last forward and input gradients were faster than
// blocked ones, and 1-D weight gradients gained nothing clear. One exception there (Xeon with
// AVX-512, run AD): dense forward products and input gradients of wide layers on small images,
// where the channels-last kernel computes a few output pixels per row: with 256 to 1024 channels,
// 3x3 (and 3x3x3) windows and outputs 2 to 5 pixels wide, 1.06-3.04x (forward) and 1.05-3.16x
// (input gradient) faster blocked; 128 channels, 1 or 6+ pixels wide, 1-D and 1x1 windows gained
// nothing or lost, and weight gradients gained nothing clear.
bool HasAvx512() {
  static const bool has = [] {
    const auto isa = static_cast<unsigned>(dnnl::get_effective_cpu_isa());
    const auto avx512 = static_cast<unsigned>(dnnl::cpu_isa::avx512_core);
    return (isa & avx512) == avx512;
  }();
  return has;
}

bool WideLayerOnSmallImage(const Problem& p) {
  const int64_t width = p.out_sizes.back();
  const bool one_by_one =
      std::all_of(p.window.begin(), p.window.end(), [](int64_t k) { return k == 1; });
  return p.groups == 1 && p.op != Op::kBackwardWeights && p.dtype == memory::data_type::f32 &&
         p.window.size() >= 2 && !one_by_one && std::min(p.channels, p.out_channels) >= 256 &&
         width >= 2 && width <= 5;
}

// The grouped rule above was measured on AMD EPYCs (AVX2 and AVX-512). On an Intel Xeon (AVX-512,
// and capped at AVX2) the channels-last kernels were the faster ones for every grouped product
// (weight gradients 1.2-1.65x, run AE), so there grouped products keep channels-last.
// JCNN_ONEDNN_GROUPED_LAYOUT=blocked or channels_last overrides the choice (checked in Python).
bool GroupedTakeOwnLayout() {
  static const bool blocked = [] {
    const char* choice = std::getenv("JCNN_ONEDNN_GROUPED_LAYOUT");
    if (choice != nullptr && std::strcmp(choice, "blocked") == 0) return true;
    if (choice != nullptr && std::strcmp(choice, "channels_last") == 0) return false;
    __builtin_cpu_init();
    return __builtin_cpu_is("amd") != 0;
  }();
  return blocked;
}

bool MayTakeOwnLayout(const Problem& p) {
  if (p.channels == p.groups) return false;
  const bool grouped = p.groups > 1 && GroupedTakeOwnLayout();
  if (HasAvx512()) {
    return (grouped && p.op == Op::kBackwardWeights) || WideLayerOnSmallImage(p);
  }
  return grouped || (p.op == Op::kBackwardWeights && p.window.size() == 1);
}

memory::desc AnyLayout(const memory::desc& desc) {
  return memory::desc(desc.get_dims(), desc.get_data_type(), memory::format_tag::any);
}

struct Plan {
  dnnl::primitive conv;
  memory::desc user_src, user_dst;  // x and y (or their gradients), channels-last
  memory::desc src, dst;            // as the primitive wants them
  bool reorder_src, reorder_dst;
  dnnl::primitive src_to_primitive, src_to_user, dst_to_primitive, dst_to_user;
  memory::desc kernel;       // the kernel as the primitive wants it
  memory::desc user_kernel;  // the kernel in jcnn's layout
  bool reorder_kernel;
  dnnl::primitive to_primitive_kernel, to_user_kernel;
  memory::desc scratchpad;
  std::string implementation;  // oneDNN's name for the kernel it chose, e.g. "jit:avx512_core"
};

std::unique_ptr<Plan> MakePlan(const Problem& p, bool own_layout) {
  auto& engine = Engine();
  Dims kernel_dims;
  auto plan = std::make_unique<Plan>();
  plan->user_kernel = KernelDims(p, &kernel_dims);
  auto any_kernel = memory::desc(kernel_dims, p.dtype, memory::format_tag::any);
  plan->user_src = ActivationDesc(p, p.channels, p.in_sizes);
  plan->user_dst = ActivationDesc(p, p.out_channels, p.out_sizes);
  const memory::desc src = own_layout ? AnyLayout(plan->user_src) : plan->user_src;
  const memory::desc dst = own_layout ? AnyLayout(plan->user_dst) : plan->user_dst;
  Dims dilation(p.dilation.size());
  for (size_t i = 0; i < dilation.size(); ++i) dilation[i] = p.dilation[i] - 1;
  dnnl::primitive_attr attr;
  attr.set_scratchpad_mode(dnnl::scratchpad_mode::user);
  auto forward = dnnl::convolution_forward::primitive_desc(
      engine, dnnl::prop_kind::forward_training, dnnl::algorithm::convolution_direct, src,
      any_kernel, dst, p.stride, dilation, p.pad_lo, p.pad_hi, attr);
  switch (p.op) {
    case Op::kForward:
      plan->conv = dnnl::convolution_forward(forward);
      plan->src = forward.src_desc();
      plan->dst = forward.dst_desc();
      plan->kernel = forward.weights_desc();
      plan->scratchpad = forward.scratchpad_desc();
      plan->implementation = forward.impl_info_str();
      break;
    case Op::kBackwardData: {
      auto backward = dnnl::convolution_backward_data::primitive_desc(
          engine, dnnl::algorithm::convolution_direct, src, any_kernel, dst, p.stride, dilation,
          p.pad_lo, p.pad_hi, forward, attr);
      plan->conv = dnnl::convolution_backward_data(backward);
      plan->src = backward.diff_src_desc();
      plan->dst = backward.diff_dst_desc();
      plan->kernel = backward.weights_desc();
      plan->scratchpad = backward.scratchpad_desc();
      plan->implementation = backward.impl_info_str();
      break;
    }
    case Op::kBackwardWeights: {
      auto backward = dnnl::convolution_backward_weights::primitive_desc(
          engine, dnnl::algorithm::convolution_direct, src, any_kernel, dst, p.stride, dilation,
          p.pad_lo, p.pad_hi, forward, attr);
      plan->conv = dnnl::convolution_backward_weights(backward);
      plan->src = backward.src_desc();
      plan->dst = backward.diff_dst_desc();
      plan->kernel = backward.diff_weights_desc();
      plan->scratchpad = backward.scratchpad_desc();
      plan->implementation = backward.impl_info_str();
      break;
    }
  }
  auto reorder = [&](const memory::desc& from, const memory::desc& to) {
    return dnnl::reorder(dnnl::reorder::primitive_desc(engine, from, engine, to));
  };
  // The result of the product leaves the primitive's layout, its inputs enter it.
  plan->reorder_src = plan->src != plan->user_src;
  if (plan->reorder_src) {
    if (p.op == Op::kBackwardData) {
      plan->src_to_user = reorder(plan->src, plan->user_src);
    } else {
      plan->src_to_primitive = reorder(plan->user_src, plan->src);
    }
  }
  plan->reorder_dst = plan->dst != plan->user_dst;
  if (plan->reorder_dst) {
    if (p.op == Op::kForward) {
      plan->dst_to_user = reorder(plan->dst, plan->user_dst);
    } else {
      plan->dst_to_primitive = reorder(plan->user_dst, plan->dst);
    }
  }
  if (plan->reorder_src || plan->reorder_dst) plan->implementation += " (activations reordered)";
  plan->reorder_kernel = plan->kernel != plan->user_kernel;
  if (plan->reorder_kernel) {
    if (p.op == Op::kBackwardWeights) {
      plan->to_user_kernel = reorder(plan->kernel, plan->user_kernel);
    } else {
      plan->to_primitive_kernel = reorder(plan->user_kernel, plan->kernel);
    }
  }
  return plan;
}

const Plan& GetPlan(const Problem& p) {
  static std::mutex mutex;
  static std::unordered_map<std::string, std::unique_ptr<Plan>> plans;
  const std::string key = p.Key();
  {
    std::lock_guard<std::mutex> lock(mutex);
    auto found = plans.find(key);
    if (found != plans.end()) return *found->second;
  }
  // Outside the lock: creating a primitive can take milliseconds. A oneDNN primitive splits its
  // work for the threads there are when it is created (a weight gradient run by one thread of a
  // parallel region with a primitive made for two computes one half), so a one-thread problem's
  // primitive is created with one thread.
  struct Threads {
    int saved = omp_get_max_threads();
    explicit Threads(bool one) {
      if (one) omp_set_num_threads(1);
    }
    ~Threads() { omp_set_num_threads(saved); }
  };
  std::unique_ptr<Plan> plan;
  {
    Threads threads(p.one_thread);
    if (MayTakeOwnLayout(p)) {
      plan = MakePlan(p, true);
      if (plan->implementation.find("gemm") != std::string::npos) plan.reset();
    }
    if (!plan) plan = MakePlan(p, false);
  }
  std::lock_guard<std::mutex> lock(mutex);
  auto inserted = plans.emplace(key, std::move(plan));
  return *inserted.first->second;
}

// Grow-only 64-byte aligned memory owned by the calling thread: scratchpads and reordered kernels
// are reused across calls instead of being mapped (and page-faulted) afresh each time.
class ThreadBuffer {
 public:
  void* Get(size_t bytes) {
    if (bytes > capacity_) {
      capacity_ = (bytes + 63) / 64 * 64;
      data_.reset(static_cast<char*>(std::aligned_alloc(64, capacity_)));
    }
    return data_.get();
  }

 private:
  struct Free {
    void operator()(char* p) const { std::free(p); }
  };
  std::unique_ptr<char, Free> data_;
  size_t capacity_ = 0;
};

// Runs the problem once: `activation` is x (forward, weight gradient) or dy (input gradient),
// `other` is w (forward, input gradient) or dy (weight gradient), `out` the result.
void Run(Op op, const Plan& plan, dnnl::stream& stream, void* activation, void* other, void* out) {
  auto& engine = Engine();
  thread_local ThreadBuffer scratchpad, kernel, src_buffer, dst_buffer;
  memory scratchpad_memory(plan.scratchpad, engine, scratchpad.Get(plan.scratchpad.get_size()));
  // An activation in the primitive's layout: the caller's memory, or a thread buffer that an
  // input is reordered into (a result is reordered out of it after the product).
  auto in_layout = [&](const memory::desc& user, const memory::desc& own, bool reorder,
                       const dnnl::primitive& to_own, ThreadBuffer& buffer, void* data) {
    memory user_memory(user, engine, data);
    if (!reorder) return user_memory;
    memory own_memory(own, engine, buffer.Get(own.get_size()));
    if (to_own) to_own.execute(stream, {{DNNL_ARG_FROM, user_memory}, {DNNL_ARG_TO, own_memory}});
    return own_memory;
  };
  auto to_user = [&](const memory& own, const dnnl::primitive& reorder, const memory::desc& user,
                     void* data) {
    reorder.execute(stream, {{DNNL_ARG_FROM, own}, {DNNL_ARG_TO, memory(user, engine, data)}});
  };
  if (op == Op::kBackwardWeights) {
    memory user_kernel(plan.user_kernel, engine, out);
    memory diff_kernel = plan.reorder_kernel
                             ? memory(plan.kernel, engine, kernel.Get(plan.kernel.get_size()))
                             : user_kernel;
    memory src = in_layout(plan.user_src, plan.src, plan.reorder_src, plan.src_to_primitive,
                           src_buffer, activation);
    memory diff_dst = in_layout(plan.user_dst, plan.dst, plan.reorder_dst, plan.dst_to_primitive,
                                dst_buffer, other);
    plan.conv.execute(stream, {{DNNL_ARG_SRC, src},
                               {DNNL_ARG_DIFF_DST, diff_dst},
                               {DNNL_ARG_DIFF_WEIGHTS, diff_kernel},
                               {DNNL_ARG_SCRATCHPAD, scratchpad_memory}});
    if (plan.reorder_kernel) {
      plan.to_user_kernel.execute(stream, {{DNNL_ARG_FROM, diff_kernel}, {DNNL_ARG_TO, user_kernel}});
    }
  } else {
    memory user_kernel(plan.user_kernel, engine, other);
    memory weights = user_kernel;
    if (plan.reorder_kernel) {
      weights = memory(plan.kernel, engine, kernel.Get(plan.kernel.get_size()));
      plan.to_primitive_kernel.execute(stream, {{DNNL_ARG_FROM, user_kernel}, {DNNL_ARG_TO, weights}});
    }
    if (op == Op::kForward) {
      memory src = in_layout(plan.user_src, plan.src, plan.reorder_src, plan.src_to_primitive,
                             src_buffer, activation);
      memory dst = in_layout(plan.user_dst, plan.dst, plan.reorder_dst, {}, dst_buffer, out);
      plan.conv.execute(stream, {{DNNL_ARG_SRC, src},
                                 {DNNL_ARG_WEIGHTS, weights},
                                 {DNNL_ARG_DST, dst},
                                 {DNNL_ARG_SCRATCHPAD, scratchpad_memory}});
      if (plan.reorder_dst) to_user(dst, plan.dst_to_user, plan.user_dst, out);
    } else {
      memory diff_dst = in_layout(plan.user_dst, plan.dst, plan.reorder_dst, plan.dst_to_primitive,
                                  dst_buffer, activation);
      memory diff_src = in_layout(plan.user_src, plan.src, plan.reorder_src, {}, src_buffer, out);
      plan.conv.execute(stream, {{DNNL_ARG_DIFF_DST, diff_dst},
                                 {DNNL_ARG_WEIGHTS, weights},
                                 {DNNL_ARG_DIFF_SRC, diff_src},
                                 {DNNL_ARG_SCRATCHPAD, scratchpad_memory}});
      if (plan.reorder_src) to_user(diff_src, plan.src_to_user, plan.user_src, out);
    }
  }
  stream.wait();
}

using Span = ffi::Span<const int64_t>;

template <typename Sequence>
Dims ToDims(const Sequence& values) {
  return Dims(values.begin(), values.end());
}

int64_t Product(const Dims& dims, size_t begin, size_t end) {
  int64_t product = 1;
  for (size_t i = begin; i < end; ++i) product *= dims[i];
  return product;
}

// Shapes of the three operands in the order (activation-like first input, second input, result).
ffi::Error Convolve(Op op, ffi::AnyBuffer first, ffi::AnyBuffer second, ffi::Result<ffi::AnyBuffer> result,
                    Span stride, Span pad_lo, Span pad_hi, Span dilation, int64_t groups) {
  const size_t spatial = stride.size();
  const ffi::DataType element_type = first.element_type();
  if (element_type != ffi::DataType::F32 && element_type != ffi::DataType::BF16) {
    return ffi::Error::InvalidArgument("jcnn oneDNN convolution: expected float32 or bfloat16");
  }
  if (second.element_type() != element_type || result->element_type() != element_type) {
    return ffi::Error::InvalidArgument("jcnn oneDNN convolution: operand dtypes differ");
  }
  const int64_t item_bytes = element_type == ffi::DataType::F32 ? 4 : 2;
  const size_t rank = spatial + 2;
  const Dims shapes[3] = {ToDims(first.dimensions()), ToDims(second.dimensions()),
                          ToDims(result->dimensions())};
  for (const Dims& shape : shapes) {
    if (shape.size() < rank || shape.size() != shapes[2].size()) {
      return ffi::Error::InvalidArgument("jcnn oneDNN convolution: operand ranks do not match");
    }
  }
  const size_t lead = shapes[2].size() - rank;
  // Operands by role: x (N, *in, C), y (N, *out, O), w (*window, C / G, O).
  const Dims& x = shapes[op == Op::kBackwardData ? 2 : 0];
  const Dims& y = shapes[op == Op::kForward ? 2 : (op == Op::kBackwardData ? 0 : 1)];
  const Dims& w = shapes[op == Op::kBackwardWeights ? 2 : 1];

  Problem p;
  p.op = op;
  p.dtype = element_type == ffi::DataType::F32 ? memory::data_type::f32 : memory::data_type::bf16;
  p.batch = x[lead];
  p.channels = x.back();
  p.out_channels = y.back();
  p.groups = groups;
  p.in_sizes = Dims(x.begin() + lead + 1, x.end() - 1);
  p.out_sizes = Dims(y.begin() + lead + 1, y.end() - 1);
  p.window = Dims(w.begin() + lead, w.end() - 2);
  p.stride = ToDims(stride);
  p.dilation = ToDims(dilation);
  p.pad_lo = ToDims(pad_lo);
  p.pad_hi = ToDims(pad_hi);

  char* data[3] = {static_cast<char*>(first.untyped_data()),
                   static_cast<char*>(second.untyped_data()),
                   static_cast<char*>(result->untyped_data())};
  int64_t bytes[3];  // of one problem (one index of the leading axes)
  for (int i = 0; i < 3; ++i) bytes[i] = item_bytes * Product(shapes[i], lead, shapes[i].size());
  const Dims lead_shape(shapes[2].begin(), shapes[2].begin() + lead);
  const int64_t count = Product(lead_shape, 0, lead);

  if (p.batch == 0 || p.channels == 0 || p.out_channels == 0 ||
      std::any_of(p.out_sizes.begin(), p.out_sizes.end(), [](int64_t s) { return s == 0; })) {
    std::memset(data[2], 0, bytes[2] * count);
    return ffi::Error::Success();
  }

  bool kernel_unbatched = op != Op::kBackwardWeights;
  for (size_t i = 0; i < lead && kernel_unbatched; ++i) {
    kernel_unbatched = shapes[1][i] == 1 && shapes[0][i] == lead_shape[i];
  }
  try {
    dnnl::stream stream(Engine());
    if (kernel_unbatched && count > 1) {
      p.batch *= count;
      Run(op, GetPlan(p), stream, data[0], data[1], data[2]);
      return ffi::Error::Success();
    }
    // Many problems (per-example weight gradients): one thread per problem, each running oneDNN
    // on its own (oneDNN opens no parallel region inside one); threading inside each of many
    // small problems spent more time synchronizing than computing. Few problems keep oneDNN's
    // threads.
    p.one_thread = count >= 2 * static_cast<int64_t>(omp_get_max_threads());
    const Plan& plan = GetPlan(p);
    auto run_index = [&](int64_t index, dnnl::stream& on) {
      // Offset of each operand for this leading index; size-1 axes broadcast.
      int64_t offsets[2] = {0, 0};
      int64_t rest = index;
      int64_t scale[2] = {1, 1};
      for (size_t axis = lead; axis-- > 0;) {
        const int64_t coordinate = rest % lead_shape[axis];
        rest /= lead_shape[axis];
        for (int operand = 0; operand < 2; ++operand) {
          const int64_t extent = shapes[operand][axis];
          if (extent != 1) offsets[operand] += coordinate * scale[operand];
          scale[operand] *= extent;
        }
      }
      Run(op, plan, on, data[0] + offsets[0] * bytes[0], data[1] + offsets[1] * bytes[1],
          data[2] + index * bytes[2]);
    };
    if (!p.one_thread) {
      for (int64_t index = 0; index < count; ++index) run_index(index, stream);
      return ffi::Error::Success();
    }
    std::string failure;  // an exception must not leave the parallel loop
#pragma omp parallel for schedule(static)
    for (int64_t index = 0; index < count; ++index) {
      try {
        dnnl::stream own(Engine());
        run_index(index, own);
      } catch (const std::exception& e) {
#pragma omp critical
        failure = e.what();
      }
    }
    if (!failure.empty()) {
      return ffi::Error::Internal("jcnn oneDNN convolution: " + failure);
    }
  } catch (const dnnl::error& e) {
    return ffi::Error::Internal(std::string("jcnn oneDNN convolution: ") + e.what());
  }
  return ffi::Error::Success();
}

#define JCNN_BIND                                                                  \
  ffi::Ffi::Bind()                                                                 \
      .Arg<ffi::AnyBuffer>()                                                       \
      .Arg<ffi::AnyBuffer>()                                                       \
      .Ret<ffi::AnyBuffer>()                                                       \
      .Attr<Span>("stride")                                                        \
      .Attr<Span>("pad_lo")                                                        \
      .Attr<Span>("pad_hi")                                                        \
      .Attr<Span>("dilation")                                                      \
      .Attr<int64_t>("groups")

ffi::Error Forward(ffi::AnyBuffer x, ffi::AnyBuffer w, ffi::Result<ffi::AnyBuffer> y, Span stride,
                   Span pad_lo, Span pad_hi, Span dilation, int64_t groups) {
  return Convolve(Op::kForward, x, w, y, stride, pad_lo, pad_hi, dilation, groups);
}

ffi::Error BackwardData(ffi::AnyBuffer dy, ffi::AnyBuffer w, ffi::Result<ffi::AnyBuffer> dx,
                        Span stride, Span pad_lo, Span pad_hi, Span dilation, int64_t groups) {
  return Convolve(Op::kBackwardData, dy, w, dx, stride, pad_lo, pad_hi, dilation, groups);
}

ffi::Error BackwardWeights(ffi::AnyBuffer x, ffi::AnyBuffer dy, ffi::Result<ffi::AnyBuffer> dw,
                           Span stride, Span pad_lo, Span pad_hi, Span dilation, int64_t groups) {
  return Convolve(Op::kBackwardWeights, x, dy, dw, stride, pad_lo, pad_hi, dilation, groups);
}

}  // namespace

// Whether oneDNN implements this problem on this CPU (bfloat16 needs AVX-512 or AVX2-VNNI-2, for
// example), asked before tracing so that unsupported problems stay on XLA. `dims` holds batch,
// channels, out_channels, groups, then `spatial` values each of in_sizes, out_sizes, window, stride,
// dilation, pad_lo, pad_hi. Returns 1 (the plan is now cached) with the name of the kernel oneDNN
// chose in `reason`, or 0 with oneDNN's reason there.
extern "C" int jcnn_conv_supported(int op, int bfloat16, int64_t spatial, const int64_t* dims,
                                   char* reason, int64_t reason_size) {
  Problem p;
  p.op = static_cast<Op>(op);
  p.dtype = bfloat16 ? memory::data_type::bf16 : memory::data_type::f32;
  p.batch = dims[0];
  p.channels = dims[1];
  p.out_channels = dims[2];
  p.groups = dims[3];
  Dims* fields[] = {&p.in_sizes, &p.out_sizes, &p.window, &p.stride,
                    &p.dilation, &p.pad_lo, &p.pad_hi};
  const int64_t* next = dims + 4;
  for (Dims* field : fields) {
    field->assign(next, next + spatial);
    next += spatial;
  }
  try {
    std::snprintf(reason, static_cast<size_t>(reason_size), "%s", GetPlan(p).implementation.c_str());
    return 1;
  } catch (const dnnl::error& e) {
    std::snprintf(reason, static_cast<size_t>(reason_size), "%s", e.what());
    return 0;
  }
}

XLA_FFI_DEFINE_HANDLER_SYMBOL(jcnn_conv_forward, Forward, JCNN_BIND);
XLA_FFI_DEFINE_HANDLER_SYMBOL(jcnn_conv_backward_data, BackwardData, JCNN_BIND);
XLA_FFI_DEFINE_HANDLER_SYMBOL(jcnn_conv_backward_weights, BackwardWeights, JCNN_BIND);
