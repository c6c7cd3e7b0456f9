// The weight gradient of a depthwise convolution (groups = C_in = C_out) for XLA:CPU, as an XLA
// FFI handler:
//   jcnn_depthwise_weight_grad (x, dy) -> dw
// x (*lead, N, *spatial, C) and dy (*lead, N, *out_spatial, C) are float32, channels-last, with
// 1-3 spatial dims; dw is (*lead, *window, 1, C); the leading axes (jax.vmap's) broadcast. The
// attributes are those of the oneDNN products (stride, pad_lo, pad_hi, dilation, groups).
//
//   dw[k, c] = sum over n and output pixels o of x[n, o * stride + k * dilation - pad_lo, c] *
//              dy[n, o, c]
//
// oneDNN's depthwise weight gradient runs at a few GFLOP/s on 7x7 windows. Here sixteen channels
// are one vector; along each output row the sums of one window row are held in registers (a 3x3
// window's nine for the whole task), so each product costs one load of x and one fused
// multiply-add; each output row meets every window row while the input rows are in cache. The
// work is split into tasks (a channel block and a slice of the batch) that depend on the shapes
// only, and their float32 partial sums are added in a fixed order: the result does not depend on
// the threads.

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <utility>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

typedef float Lanes __attribute__((vector_size(64)));  // 16 channels
constexpr int64_t kLanes = 16;
constexpr int64_t kTasksWanted = 8;

// The entry points are compiled for AVX-512, AVX2 and the baseline, chosen when loaded; everything
// they call is inlined into each copy.
#if defined(__x86_64__) && defined(__GNUC__)
#define JCNN_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define JCNN_CLONES
#endif
#define JCNN_INLINE inline __attribute__((always_inline))

template <typename V>
JCNN_INLINE V Load(const float* values) {
  V loaded;
  std::memcpy(&loaded, values, sizeof loaded);
  return loaded;
}

template <typename V>
JCNN_INLINE void Store(float* values, const V& stored) {
  std::memcpy(values, &stored, sizeof stored);
}

// f(std::integral_constant<int, k>) for k = 0 .. n - 1, written out, so that array indices are
// constants and the sums stay in registers.
template <typename F, int... k>
JCNN_INLINE void Unrolled(F&& f, std::integer_sequence<int, k...>) {
  (f(std::integral_constant<int, k>{}), ...);
}

// A convolution over three spatial dims (missing leading ones have size 1), one problem.
struct Geometry {
  int64_t batch = 1, channels = 1;
  int64_t in[3] = {1, 1, 1}, out[3] = {1, 1, 1}, window[3] = {1, 1, 1};
  int64_t stride[3] = {1, 1, 1}, dilation[3] = {1, 1, 1}, pad[3] = {0, 0, 0};

  int64_t Taps() const { return window[0] * window[1] * window[2]; }
};

// The output columns [first, last) whose taps all fall inside the input row.
JCNN_INLINE void InteriorColumns(const Geometry& g, int64_t* first, int64_t* last) {
  const int64_t stride = g.stride[2], reach = (g.window[2] - 1) * g.dilation[2];
  *first = std::min((g.pad[2] + stride - 1) / stride, g.out[2]);
  const int64_t room = g.in[2] - 1 + g.pad[2] - reach;
  *last = room < 0 ? *first : std::max(*first, std::min(room / stride + 1, g.out[2]));
}

// taps[kw] += x[column * stride + kw * dilation - pad] * dy[column] over one output row, for the
// channels at x_row[0..V) and dy_row[0..V). kWindow > 0 fixes the window width at compile time,
// and the row's taps are then summed in registers; 0 reads it from g.
template <typename V, int kWindow>
JCNN_INLINE void RowProducts(const float* x_row, const float* dy_row, const Geometry& g,
                             int64_t interior_first, int64_t interior_last, float* taps) {
  constexpr int64_t kWide = sizeof(V) / sizeof(float);
  const int64_t width = kWindow > 0 ? kWindow : g.window[2];
  const int64_t channels = g.channels, stride = g.stride[2], dilation = g.dilation[2];
  const int64_t pad = g.pad[2], in_width = g.in[2];
  // A fixed width sums in registers, any other in taps itself (as floats: a V array in memory
  // would need an alignment that std::vector does not give).
  V held[kWindow > 0 ? kWindow : 1];
  if constexpr (kWindow > 0) {
    Unrolled([&](auto k) { held[k] = Load<V>(taps + k * kWide); },
             std::make_integer_sequence<int, kWindow>{});
  }
  auto add = [&](int64_t k, const V& product) __attribute__((always_inline)) {
    if constexpr (kWindow > 0) {
      held[k] += product;
    } else {
      Store(taps + k * kWide, Load<V>(taps + k * kWide) + product);
    }
  };
  auto checked = [&](int64_t column) __attribute__((always_inline)) {
    const V d = Load<V>(dy_row + column * channels);
    const int64_t start = column * stride - pad;
    for (int64_t k = 0; k < width; ++k) {
      const int64_t at = start + k * dilation;
      if (at >= 0 && at < in_width) add(k, Load<V>(x_row + at * channels) * d);
    }
  };
  for (int64_t column = 0; column < interior_first; ++column) checked(column);
  for (int64_t column = interior_first; column < interior_last; ++column) {
    const V d = Load<V>(dy_row + column * channels);
    const float* x_at = x_row + (column * stride - pad) * channels;
    if constexpr (kWindow > 0) {
      Unrolled([&](auto k) { add(k, Load<V>(x_at + k * dilation * channels) * d); },
               std::make_integer_sequence<int, kWindow>{});
    } else {
      for (int64_t k = 0; k < width; ++k) add(k, Load<V>(x_at + k * dilation * channels) * d);
    }
  }
  for (int64_t column = interior_last; column < g.out[2]; ++column) checked(column);
  if constexpr (kWindow > 0) {
    Unrolled([&](auto k) { Store(taps + k * kWide, held[k]); },
             std::make_integer_sequence<int, kWindow>{});
  }
}

// One task: every tap's sum for the channels at x[c], dy[c] (V wide) over examples
// [first, last), written to partial (Taps() x V floats). Each output row meets every window row
// while it and the input rows it reads are in cache.
template <typename V, int kWindow>
JCNN_INLINE void TaskSums(const float* x, const float* dy, const Geometry& g, int64_t first,
                          int64_t last, float* partial) {
  const int64_t channels = g.channels;
  const int64_t x_row = g.in[2] * channels, dy_row = g.out[2] * channels;
  int64_t interior_first, interior_last;
  InteriorColumns(g, &interior_first, &interior_last);
  constexpr int64_t kWide = sizeof(V) / sizeof(float);
  std::vector<float> taps(static_cast<size_t>(g.Taps() * kWide));
  for (int64_t n = first; n < last; ++n) {
    for (int64_t od = 0; od < g.out[0]; ++od) {
      for (int64_t oh = 0; oh < g.out[1]; ++oh) {
        const float* dy_at = dy + ((n * g.out[0] + od) * g.out[1] + oh) * dy_row;
        for (int64_t kd = 0; kd < g.window[0]; ++kd) {
          const int64_t id = od * g.stride[0] + kd * g.dilation[0] - g.pad[0];
          if (id < 0 || id >= g.in[0]) continue;
          for (int64_t kh = 0; kh < g.window[1]; ++kh) {
            const int64_t ih = oh * g.stride[1] + kh * g.dilation[1] - g.pad[1];
            if (ih < 0 || ih >= g.in[1]) continue;
            RowProducts<V, kWindow>(x + ((n * g.in[0] + id) * g.in[1] + ih) * x_row, dy_at, g,
                                    interior_first, interior_last,
                                    &taps[static_cast<size_t>(
                                        ((kd * g.window[1] + kh) * g.window[2]) * kWide)]);
          }
        }
      }
    }
  }
  std::copy(taps.begin(), taps.end(), partial);
}

// TaskSums for a 2-D window of kRows x kColumns taps held in registers for the whole task (a 3x3
// window: nine vectors), so that short rows (an 8x8 map) pay no loads and stores of the sums.
template <typename V, int kRows, int kColumns>
JCNN_INLINE void SmallWindowTaskSums(const float* x, const float* dy, const Geometry& g,
                                     int64_t first, int64_t last, float* partial) {
  constexpr int64_t kWide = sizeof(V) / sizeof(float);
  const int64_t channels = g.channels, stride = g.stride[2], dilation = g.dilation[2];
  const int64_t pad = g.pad[2], in_width = g.in[2];
  const int64_t x_row = in_width * channels, dy_row = g.out[2] * channels;
  int64_t interior_first, interior_last;
  InteriorColumns(g, &interior_first, &interior_last);
  V acc[kRows * kColumns];
  for (int k = 0; k < kRows * kColumns; ++k) acc[k] = V{};
  for (int64_t n = first; n < last; ++n) {
    for (int64_t oh = 0; oh < g.out[1]; ++oh) {
      const float* dy_at = dy + (n * g.out[1] + oh) * dy_row;
      const float* rows[kRows];
      bool inside[kRows];
      for (int kh = 0; kh < kRows; ++kh) {
        const int64_t ih = oh * g.stride[1] + kh * g.dilation[1] - g.pad[1];
        inside[kh] = ih >= 0 && ih < g.in[1];
        rows[kh] = x + (n * g.in[1] + (inside[kh] ? ih : 0)) * x_row;
      }
      auto column_products = [&](int64_t column, bool check) __attribute__((always_inline)) {
        const V d = Load<V>(dy_at + column * channels);
        const int64_t start = column * stride - pad;
        Unrolled(
            [&](auto tap) {
              constexpr int kh = decltype(tap)::value / kColumns;
              constexpr int kw = decltype(tap)::value % kColumns;
              const int64_t at = start + kw * dilation;
              if (inside[kh] && (!check || (at >= 0 && at < in_width))) {
                acc[tap] += Load<V>(rows[kh] + at * channels) * d;
              }
            },
            std::make_integer_sequence<int, kRows * kColumns>{});
      };
      for (int64_t column = 0; column < interior_first; ++column) column_products(column, true);
      for (int64_t column = interior_first; column < interior_last; ++column) {
        column_products(column, false);
      }
      for (int64_t column = interior_last; column < g.out[2]; ++column) {
        column_products(column, true);
      }
    }
  }
  for (int k = 0; k < kRows * kColumns; ++k) Store(partial + k * kWide, acc[k]);
}

template <typename V>
JCNN_INLINE void RunTask(const float* x, const float* dy, const Geometry& g, int64_t first,
                         int64_t last, float* partial) {
  const bool planar = g.in[0] == 1 && g.out[0] == 1 && g.window[0] == 1 && g.pad[0] == 0;
  if (planar && g.window[1] == 3 && g.window[2] == 3) {
    return SmallWindowTaskSums<V, 3, 3>(x, dy, g, first, last, partial);
  }
  switch (g.window[2]) {
    case 1: return TaskSums<V, 1>(x, dy, g, first, last, partial);
    case 2: return TaskSums<V, 2>(x, dy, g, first, last, partial);
    case 3: return TaskSums<V, 3>(x, dy, g, first, last, partial);
    case 4: return TaskSums<V, 4>(x, dy, g, first, last, partial);
    case 5: return TaskSums<V, 5>(x, dy, g, first, last, partial);
    case 6: return TaskSums<V, 6>(x, dy, g, first, last, partial);
    case 7: return TaskSums<V, 7>(x, dy, g, first, last, partial);
    default: return TaskSums<V, 0>(x, dy, g, first, last, partial);
  }
}

JCNN_CLONES void RunBlockTask(const float* x, const float* dy, const Geometry& g, int64_t first,
                              int64_t last, float* partial) {
  RunTask<Lanes>(x, dy, g, first, last, partial);
}

JCNN_CLONES void RunChannelTask(const float* x, const float* dy, const Geometry& g,
                                int64_t first, int64_t last, float* partial) {
  RunTask<float>(x, dy, g, first, last, partial);
}

// One problem (no leading axes): dw (Taps() x C) from x and dy.
void WeightGrad(const float* x, const float* dy, const Geometry& g, float* dw) {
  const int64_t blocks = g.channels / kLanes, rest = g.channels % kLanes;
  const int64_t channel_tasks = blocks + rest;  // a block of 16, or one remaining channel
  const int64_t splits = std::clamp<int64_t>((kTasksWanted + channel_tasks - 1) / channel_tasks,
                                             1, std::max<int64_t>(g.batch, 1));
  const int64_t taps = g.Taps(), tasks = channel_tasks * splits;
  std::vector<float> partial(static_cast<size_t>(tasks * taps * kLanes));
#pragma omp parallel for schedule(static)
  for (int64_t task = 0; task < tasks; ++task) {
    const int64_t channel_task = task / splits, split = task % splits;
    const int64_t first = g.batch * split / splits, last = g.batch * (split + 1) / splits;
    float* out = &partial[static_cast<size_t>(task * taps * kLanes)];
    if (channel_task < blocks) {
      const int64_t c = channel_task * kLanes;
      RunBlockTask(x + c, dy + c, g, first, last, out);
    } else {
      const int64_t c = blocks * kLanes + (channel_task - blocks);
      RunChannelTask(x + c, dy + c, g, first, last, out);
    }
  }
  for (int64_t channel_task = 0; channel_task < channel_tasks; ++channel_task) {
    const bool block = channel_task < blocks;
    const int64_t c = block ? channel_task * kLanes : blocks * kLanes + (channel_task - blocks);
    const int64_t width = block ? kLanes : 1;
    for (int64_t k = 0; k < taps; ++k) {
      for (int64_t lane = 0; lane < width; ++lane) {
        float total = 0;
        for (int64_t split = 0; split < splits; ++split) {
          total += partial[static_cast<size_t>(
              (channel_task * splits + split) * taps * kLanes + k * width + lane)];
        }
        dw[k * g.channels + c + lane] = total;
      }
    }
  }
}

using Span = ffi::Span<const int64_t>;

ffi::Error DepthwiseWeightGrad(ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> dy,
                               ffi::ResultBuffer<ffi::F32> dw, Span stride, Span pad_lo,
                               Span pad_hi, Span dilation, int64_t groups) {
  const int64_t rank = static_cast<int64_t>(stride.size());
  const auto x_dims = x.dimensions(), dy_dims = dy.dimensions(), dw_dims = dw->dimensions();
  const int64_t lead = static_cast<int64_t>(x_dims.size()) - rank - 2;
  if (rank < 1 || rank > 3 || lead < 0 || static_cast<int64_t>(dy_dims.size()) != lead + rank + 2 ||
      static_cast<int64_t>(dw_dims.size()) != lead + rank + 2 || pad_lo.size() != stride.size() ||
      pad_hi.size() != stride.size() || dilation.size() != stride.size()) {
    return ffi::Error::InvalidArgument(
        "jcnn_depthwise_weight_grad: expected x (*lead, N, *spatial, C), dy (*lead, N, "
        "*out_spatial, C), dw (*lead, *window, 1, C) with 1-3 spatial dims");
  }
  Geometry g;
  g.batch = x_dims[lead];
  g.channels = x_dims.back();
  for (int64_t i = 0; i < rank; ++i) {
    const int64_t at = 3 - rank + i;
    g.in[at] = x_dims[lead + 1 + i];
    g.out[at] = dy_dims[lead + 1 + i];
    g.window[at] = dw_dims[lead + i];
    g.stride[at] = stride[i];
    g.dilation[at] = dilation[i];
    g.pad[at] = pad_lo[i];
    const int64_t reach = (g.window[at] - 1) * g.dilation[at] + 1;
    if (g.stride[at] < 1 || g.dilation[at] < 1 || g.pad[at] < 0 || pad_hi[i] < 0 ||
        (g.in[at] + g.pad[at] + pad_hi[i] - reach) / g.stride[at] + 1 != g.out[at]) {
      return ffi::Error::InvalidArgument(
          "jcnn_depthwise_weight_grad: the output size does not follow from the options");
    }
  }
  if (groups != g.channels || dy_dims[lead] != g.batch || dy_dims.back() != g.channels ||
      dw_dims[lead + rank] != 1 || dw_dims.back() != g.channels) {
    return ffi::Error::InvalidArgument(
        "jcnn_depthwise_weight_grad: expected one channel per group in x, dy and dw");
  }
  // The leading axes: each operand's of size 1 or the result's.
  std::vector<int64_t> x_step(lead), dy_step(lead);
  int64_t problems = 1, x_inner = 1, dy_inner = 1;
  for (int64_t axis = lead; axis < lead + rank + 2; ++axis) {
    x_inner *= x_dims[axis];
    dy_inner *= dy_dims[axis];
  }
  for (int64_t axis = lead - 1; axis >= 0; --axis) {
    if ((x_dims[axis] != 1 && x_dims[axis] != dw_dims[axis]) ||
        (dy_dims[axis] != 1 && dy_dims[axis] != dw_dims[axis])) {
      return ffi::Error::InvalidArgument(
          "jcnn_depthwise_weight_grad: leading axes that do not broadcast to the result's");
    }
    x_step[axis] = x_dims[axis] == 1 ? 0 : x_inner;
    dy_step[axis] = dy_dims[axis] == 1 ? 0 : dy_inner;
    x_inner *= x_dims[axis];
    dy_inner *= dy_dims[axis];
    problems *= dw_dims[axis];
  }
  if (g.channels == 0) return ffi::Error::Success();
  const int64_t dw_size = g.Taps() * g.channels;
  for (int64_t problem = 0; problem < problems; ++problem) {
    int64_t x_offset = 0, dy_offset = 0, rest = problem;
    for (int64_t axis = lead - 1; axis >= 0; --axis) {
      const int64_t index = rest % dw_dims[axis];
      rest /= dw_dims[axis];
      x_offset += index * x_step[axis];
      dy_offset += index * dy_step[axis];
    }
    if (g.batch == 0) {
      std::fill_n(dw->typed_data() + problem * dw_size, dw_size, 0.0f);
      continue;
    }
    WeightGrad(x.typed_data() + x_offset, dy.typed_data() + dy_offset, g,
               dw->typed_data() + problem * dw_size);
  }
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(jcnn_depthwise_weight_grad, DepthwiseWeightGrad,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<Span>("stride")
                                  .Attr<Span>("pad_lo")
                                  .Attr<Span>("pad_hi")
                                  .Attr<Span>("dilation")
                                  .Attr<int64_t>("groups"));
