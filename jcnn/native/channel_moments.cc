// Batch norm's per-channel reductions for XLA:CPU, each in one pass over its operands, as XLA FFI
// handlers:
//   jcnn_channel_moments (x) -> (mean, mean_residual, var)
//   jcnn_centered_sums   (t, x, mean, mean_residual) -> (sum of t * (x - mean), sum of t)
// x and t are float32 (*outer, *rows, C), channels-last; the per-channel arrays are float32
// (*outer, C): one value for each outer index and channel, over the row axes between. Batch norm
// has no outer axes; instance norm has one (the example); jax.vmap adds more in front.
//
// The moments: the mean, what the float32 mean misses of the exact one (mean + mean_residual holds
// it to about 2^-48, so x - mean - mean_residual does not leave the mean's rounding error in every
// normalized value when the data share a large offset), and the biased variance. XLA takes three
// or four passes for them (a mean, then the deviations from it and their squares). Here each
// block of rows is read once and summed in float64 after subtracting a shift, the block's first
// row, so that a common offset does not cancel: a block's variance is s2 / n - (s1 / n)^2 with s1,
// s2 the sums of the shifted values and of their squares, and as no element lies more than
// sqrt(n) standard deviations from the mean, the cancellation costs at most n float64 roundings.
// Blocks merge with the pairwise update of Chan, Golub and LeVeque. The results are the exact
// moments rounded once to float32.
//
// The centered sums are the two reductions of batch norm's derivative (t a tangent or a
// cotangent), also summed in float64, with x - mean - mean_residual formed in float64.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

constexpr int64_t kBlockElements = 1 << 15;  // 128 KiB of float32 per block: in L2, many blocks

// Eight channels at a time in float64 vector registers, two rows in flight (two sets of sums).
typedef float Floats __attribute__((vector_size(32)));
typedef double Doubles __attribute__((vector_size(64)));
constexpr int64_t kTile = 8;

Doubles LoadDoubles(const float* values) {
  Floats loaded;
  std::memcpy(&loaded, values, sizeof loaded);
  return __builtin_convertvector(loaded, Doubles);
}

void StoreSums(const Doubles& first, const Doubles& second, double* first_out,
               double* second_out) {
  std::memcpy(first_out, &first, sizeof first);
  std::memcpy(second_out, &second, sizeof second);
}

#if defined(__x86_64__) && defined(__GNUC__)
#define JCNN_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define JCNN_CLONES
#endif

// Sums of d and d^2, d = x - shift, over `rows` rows `stride` floats apart, for kTile channels.
JCNN_CLONES void TileShiftedSums(const float* x, int64_t rows, int64_t stride, const double* shift,
                                 double* sum, double* sum_squares) {
  Doubles offset, s0 = {}, s1 = {}, q0 = {}, q1 = {};
  std::memcpy(&offset, shift, sizeof offset);
  int64_t r = 0;
  for (; r + 2 <= rows; r += 2) {
    const Doubles d0 = LoadDoubles(x + r * stride) - offset;
    const Doubles d1 = LoadDoubles(x + (r + 1) * stride) - offset;
    s0 += d0;
    q0 += d0 * d0;
    s1 += d1;
    q1 += d1 * d1;
  }
  if (r < rows) {
    const Doubles d0 = LoadDoubles(x + r * stride) - offset;
    s0 += d0;
    q0 += d0 * d0;
  }
  StoreSums(s0 + s1, q0 + q1, sum, sum_squares);
}

// Sums of t * (x - center) and of t, as above.
JCNN_CLONES void TileCenteredSums(const float* t, const float* x, int64_t rows, int64_t stride,
                                  const double* center, double* sum_centered, double* sum) {
  Doubles offset, c0 = {}, c1 = {}, s0 = {}, s1 = {};
  std::memcpy(&offset, center, sizeof offset);
  int64_t r = 0;
  for (; r + 2 <= rows; r += 2) {
    const Doubles t0 = LoadDoubles(t + r * stride), t1 = LoadDoubles(t + (r + 1) * stride);
    c0 += t0 * (LoadDoubles(x + r * stride) - offset);
    c1 += t1 * (LoadDoubles(x + (r + 1) * stride) - offset);
    s0 += t0;
    s1 += t1;
  }
  if (r < rows) {
    const Doubles t0 = LoadDoubles(t + r * stride);
    c0 += t0 * (LoadDoubles(x + r * stride) - offset);
    s0 += t0;
  }
  StoreSums(c0 + c1, s0 + s1, sum_centered, sum);
}

// The same sums one channel at a time, for the channels that do not fill a tile.
void ChannelShiftedSums(const float* x, int64_t rows, int64_t stride, double shift, double* sum,
                        double* sum_squares) {
  double s = 0, q = 0;
  for (int64_t r = 0; r < rows; ++r) {
    const double d = static_cast<double>(x[r * stride]) - shift;
    s += d;
    q += d * d;
  }
  *sum = s;
  *sum_squares = q;
}

void ChannelCenteredSums(const float* t, const float* x, int64_t rows, int64_t stride,
                         double center, double* sum_centered, double* sum) {
  double c = 0, s = 0;
  for (int64_t r = 0; r < rows; ++r) {
    const double weight = static_cast<double>(t[r * stride]);
    c += weight * (static_cast<double>(x[r * stride]) - center);
    s += weight;
  }
  *sum_centered = c;
  *sum = s;
}

// The split of (*outer, *rows, C) into blocks of rows, run in parallel, each writing `channels`
// partial results of type T at its index (outer index * blocks + block).
struct Blocks {
  int64_t outer = 0, rows = 0, channels = 0, block_rows = 1, count = 0;

  Blocks(int64_t elements, int64_t outer_size, int64_t channel_count)
      : outer(outer_size), channels(channel_count) {
    if (outer == 0 || channels == 0) return;
    rows = elements / (outer * channels);
    block_rows = std::max<int64_t>(1, kBlockElements / channels);
    count = std::max<int64_t>(1, (rows + block_rows - 1) / block_rows);
  }

  template <typename T, typename Body>
  std::vector<T> Run(Body body) const {
    std::vector<T> partial(static_cast<size_t>(outer * count * channels));
#pragma omp parallel for schedule(static)
    for (int64_t unit = 0; unit < outer * count; ++unit) {
      const int64_t o = unit / count, first = (unit % count) * block_rows;
      const int64_t block = std::min(block_rows, rows - first);
      if (block > 0) body((o * rows + first) * channels, block, &partial[unit * channels]);
    }
    return partial;
  }
};

struct Moments {
  double count = 0;
  double mean = 0;
  double m2 = 0;  // sum of squared deviations from mean
};

void Merge(Moments& into, const Moments& other) {
  const double count = into.count + other.count;
  if (count == 0) return;
  const double delta = other.mean - into.mean;
  into.m2 += other.m2 + delta * delta * (into.count * other.count / count);
  into.mean += delta * (other.count / count);
  into.count = count;
}

// The moments of `rows` rows of `channels` values starting at x, one per channel, into out.
void BlockMoments(const float* x, int64_t rows, int64_t channels, Moments* out) {
  std::vector<double> shift(channels), sum(channels), sum_squares(channels);
  for (int64_t c = 0; c < channels; ++c) {
    shift[c] = std::isfinite(x[c]) ? x[c] : 0.0;  // an infinity stays in the sums, as in XLA's
  }
  int64_t c = 0;
  for (; c + kTile <= channels; c += kTile) {
    TileShiftedSums(x + c, rows, channels, &shift[c], &sum[c], &sum_squares[c]);
  }
  for (; c < channels; ++c) {
    ChannelShiftedSums(x + c, rows, channels, shift[c], &sum[c], &sum_squares[c]);
  }
  const double n = static_cast<double>(rows);
  for (c = 0; c < channels; ++c) {
    const double offset = sum[c] / n;
    out[c] = {n, shift[c] + offset, sum_squares[c] - sum[c] * offset};
  }
}

// Whether `full` is (*outer, *rows, C) for the (*outer, C) shape of every per-channel buffer.
template <typename Dimensions, typename... PerChannel>
bool Consistent(const Dimensions& full, const Dimensions& kept, const PerChannel&... others) {
  const size_t rank = kept.size();
  if (rank < 1 || full.size() < rank || full.back() != kept.back()) return false;
  for (size_t i = 0; i + 1 < rank; ++i) {
    if (full[i] != kept[i]) return false;
  }
  return ((others.size() == rank && std::equal(kept.begin(), kept.end(), others.begin())) && ...);
}

ffi::Error ChannelMoments(ffi::Buffer<ffi::F32> x, ffi::ResultBuffer<ffi::F32> mean,
                          ffi::ResultBuffer<ffi::F32> mean_residual,
                          ffi::ResultBuffer<ffi::F32> var) {
  if (!Consistent(x.dimensions(), mean->dimensions(), mean_residual->dimensions(),
                  var->dimensions())) {
    return ffi::Error::InvalidArgument(
        "jcnn_channel_moments: expected x (*outer, *rows, C) and three results (*outer, C)");
  }
  const int64_t channels = mean->dimensions().back();
  const Blocks blocks(static_cast<int64_t>(x.element_count()),
                      static_cast<int64_t>(mean->element_count()) / std::max<int64_t>(channels, 1),
                      channels);
  const float* data = x.typed_data();
  const std::vector<Moments> partial = blocks.Run<Moments>(
      [&](int64_t start, int64_t rows, Moments* out) {
        BlockMoments(data + start, rows, channels, out);
      });
  for (int64_t o = 0; o < blocks.outer; ++o) {
    for (int64_t c = 0; c < channels; ++c) {
      Moments total;
      for (int64_t b = 0; b < blocks.count; ++b) Merge(total, partial[(o * blocks.count + b) * channels + c]);
      const int64_t i = o * channels + c;
      const double exact_mean = total.count > 0 ? total.mean : NAN;
      const float rounded = static_cast<float>(exact_mean);
      mean->typed_data()[i] = rounded;
      mean_residual->typed_data()[i] =
          std::isfinite(rounded) ? static_cast<float>(exact_mean - rounded) : 0.0f;
      var->typed_data()[i] =
          static_cast<float>(total.count > 0 ? std::max(total.m2, 0.0) / total.count : NAN);
    }
  }
  return ffi::Error::Success();
}

ffi::Error CenteredSums(ffi::Buffer<ffi::F32> t, ffi::Buffer<ffi::F32> x,
                        ffi::Buffer<ffi::F32> mean, ffi::Buffer<ffi::F32> mean_residual,
                        ffi::ResultBuffer<ffi::F32> sum_centered,
                        ffi::ResultBuffer<ffi::F32> sum) {
  const auto dims = t.dimensions();
  if (!std::equal(dims.begin(), dims.end(), x.dimensions().begin(), x.dimensions().end()) ||
      !Consistent(dims, mean.dimensions(), mean_residual.dimensions(),
                  sum_centered->dimensions(), sum->dimensions())) {
    return ffi::Error::InvalidArgument(
        "jcnn_centered_sums: expected t and x (*outer, *rows, C), the rest (*outer, C)");
  }
  const int64_t channels = mean.dimensions().back();
  const int64_t outer = static_cast<int64_t>(mean.element_count()) / std::max<int64_t>(channels, 1);
  const Blocks blocks(static_cast<int64_t>(t.element_count()), outer, channels);
  std::vector<double> center(static_cast<size_t>(outer * channels));
  for (size_t i = 0; i < center.size(); ++i) {
    center[i] = static_cast<double>(mean.typed_data()[i]) + mean_residual.typed_data()[i];
  }
  struct Sums {
    double centered = 0, plain = 0;
  };
  const float* t_data = t.typed_data();
  const float* x_data = x.typed_data();
  const std::vector<Sums> partial = blocks.Run<Sums>([&](int64_t start, int64_t rows, Sums* out) {
    const double* block_center = &center[(start / (blocks.rows * channels)) * channels];
    double centered[kTile], plain[kTile];
    int64_t c = 0;
    for (; c + kTile <= channels; c += kTile) {
      TileCenteredSums(t_data + start + c, x_data + start + c, rows, channels, block_center + c,
                       centered, plain);
      for (int64_t k = 0; k < kTile; ++k) out[c + k] = {centered[k], plain[k]};
    }
    for (; c < channels; ++c) {
      ChannelCenteredSums(t_data + start + c, x_data + start + c, rows, channels,
                          block_center[c], &out[c].centered, &out[c].plain);
    }
  });
  for (int64_t o = 0; o < outer; ++o) {
    for (int64_t c = 0; c < channels; ++c) {
      Sums total;
      for (int64_t b = 0; b < blocks.count; ++b) {
        total.centered += partial[(o * blocks.count + b) * channels + c].centered;
        total.plain += partial[(o * blocks.count + b) * channels + c].plain;
      }
      sum_centered->typed_data()[o * channels + c] = static_cast<float>(total.centered);
      sum->typed_data()[o * channels + c] = static_cast<float>(total.plain);
    }
  }
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(jcnn_channel_moments, ChannelMoments,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(jcnn_centered_sums, CenteredSums,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());
