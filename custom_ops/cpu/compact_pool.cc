#include "compact_pool.h"

#include <immintrin.h>

#include <algorithm>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

#include "byte_transpose.h"

namespace onnx_perforate {

namespace {

// T: float, or uint8_t / int8_t (max only: the maximum of quantized values is the quantized maximum).
template <typename T>
void MaxPlane(const PoolTable& t, const T* __restrict src, T* __restrict dst) {
  const int32_t* begin = t.begin.data();
  const int32_t* entries = t.entries.data();
  for (int64_t o = 0; o < t.count; ++o) {
    T m = src[entries[begin[o]]];
    for (int32_t j = begin[o] + 1; j < begin[o + 1]; ++j) m = std::max(m, src[entries[j]]);
    dst[o] = m;
  }
}

void AveragePlane(const PoolTable& t, const float* __restrict src, float* __restrict dst) {
  const int32_t* begin = t.begin.data();
  const int32_t* entries = t.entries.data();
  const float* weights = t.weights.data();
  for (int64_t o = 0; o < t.count; ++o) {
    float s = 0.0f;
    for (int32_t j = begin[o]; j < begin[o + 1]; ++j) s += weights[j] * src[entries[j]];
    dst[o] = s;
  }
}

// Fixed-width windows (PoolTable::padded_entries): no per-output bounds, the loop unrolls.
template <typename T, int W>
void MaxPlaneFixed(const PoolTable& t, const T* __restrict src, T* __restrict dst) {
  const int32_t* e = t.padded_entries.data();
  for (int64_t o = 0; o < t.count; ++o, e += W) {
    T m = src[e[0]];
    for (int j = 1; j < W; ++j) m = std::max(m, src[e[j]]);
    dst[o] = m;
  }
}

// kPlanesAtOnce planes at once: each window's entries are read once for all of them (the loads of the
// table were half of the loop's), and the maxima are independent chains.
constexpr int kPlanesAtOnce = 8;

template <typename T, int W>
void MaxPlanesFixed(const PoolTable& t, const T* __restrict src, T* __restrict dst) {
  const int32_t* e = t.padded_entries.data();
  const int64_t k = t.compact_size, n = t.count;
  for (int64_t o = 0; o < n; ++o, e += W) {
    T m[kPlanesAtOnce];
#pragma GCC unroll 8
    for (int p = 0; p < kPlanesAtOnce; ++p) m[p] = src[p * k + e[0]];
    for (int j = 1; j < W; ++j) {
      const int32_t x = e[j];
#pragma GCC unroll 8
      for (int p = 0; p < kPlanesAtOnce; ++p) m[p] = std::max(m[p], src[p * k + x]);
    }
#pragma GCC unroll 8
    for (int p = 0; p < kPlanesAtOnce; ++p) dst[p * n + o] = m[p];
  }
}

// The same for windows of any width (begin/entries).
template <typename T>
void MaxPlanes(const PoolTable& t, const T* __restrict src, T* __restrict dst) {
  const int32_t* begin = t.begin.data();
  const int32_t* entries = t.entries.data();
  const int64_t k = t.compact_size, n = t.count;
  for (int64_t o = 0; o < n; ++o) {
    T m[kPlanesAtOnce];
    const int32_t first = entries[begin[o]];
#pragma GCC unroll 8
    for (int p = 0; p < kPlanesAtOnce; ++p) m[p] = src[p * k + first];
    for (int32_t j = begin[o] + 1; j < begin[o + 1]; ++j) {
      const int32_t x = entries[j];
#pragma GCC unroll 8
      for (int p = 0; p < kPlanesAtOnce; ++p) m[p] = std::max(m[p], src[p * k + x]);
    }
#pragma GCC unroll 8
    for (int p = 0; p < kPlanesAtOnce; ++p) dst[p * n + o] = m[p];
  }
}

template <int W>
void AveragePlaneFixed(const PoolTable& t, const float* __restrict src, float* __restrict dst) {
  const int32_t* e = t.padded_entries.data();
  const float* w = t.padded_weights.data();
  for (int64_t o = 0; o < t.count; ++o, e += W, w += W) {
    float s = 0.0f;
    for (int j = 0; j < W; ++j) s += w[j] * src[e[j]];
    dst[o] = s;
  }
}

template <typename T>
using PlaneFn = void (*)(const PoolTable&, const T*, T*);

// The fixed-width loops for one plane and for kPlanesAtOnce planes (nullptr: none for this width/mode).
template <typename T, int W = 1>
std::pair<PlaneFn<T>, PlaneFn<T>> FixedFor(PoolMode mode, int width) {
  if constexpr (W > 9) {
    return {nullptr, nullptr};
  } else {
    if (width != W) return FixedFor<T, W + 1>(mode, width);
    if (mode == PoolMode::kMax) return {&MaxPlaneFixed<T, W>, &MaxPlanesFixed<T, W>};
    if constexpr (std::is_same_v<T, float>) return {&AveragePlaneFixed<W>, nullptr};
    return {nullptr, nullptr};
  }
}

template <typename T>
void Pool(PoolMode mode, const PoolTable& t, int64_t planes, const T* x, T* y, const ParallelRunner& parallel) {
  if (planes == 0 || t.count == 0) return;
  // Windows of up to 9 distinct entries (3x3 pooling) run a fixed-width loop, unless padding them to
  // the widest window would add more than a third to the reads.
  PlaneFn<T> plane = nullptr, many = nullptr;
  if (t.width <= 9 && 3 * t.count * t.width <= 4 * static_cast<int64_t>(t.entries.size()))
    std::tie(plane, many) = FixedFor<T>(mode, t.width);
  if (!plane) {
    if (mode == PoolMode::kMax) {
      plane = &MaxPlane<T>, many = &MaxPlanes<T>;
    } else if constexpr (std::is_same_v<T, float>) {
      plane = &AveragePlane;
    } else {
      throw OpError("attribute 'mode' is 'average' on an 8-bit input X, expected 'max' (8-bit average pooling "
                    "needs a requantization CompactPool does not do)");
    }
  }
  // About 16 K table entries per task, as NNInterpolate: balanced, yet worth a dispatch; whole groups
  // of planes where the many-plane loop runs.
  const int64_t per_plane = std::max<int64_t>(1, static_cast<int64_t>(t.entries.size()));
  const int64_t group = many ? kPlanesAtOnce : 1;
  const int64_t per_task = std::max<int64_t>(1, (16 * 1024) / per_plane / group) * group;
  const int64_t tasks = (planes + per_task - 1) / per_task;
  RunMaybeSerially(parallel, planes * per_plane, static_cast<size_t>(tasks), [&](size_t task) {
    const int64_t first = static_cast<int64_t>(task) * per_task, last = std::min(planes, first + per_task);
    int64_t p = first;
    if (many)
      for (; p + kPlanesAtOnce <= last; p += kPlanesAtOnce) many(t, x + p * t.compact_size, y + p * t.count);
    for (; p < last; ++p) plane(t, x + p * t.compact_size, y + p * t.count);
  });
}

bool HaveAvx512Bw() {
  static const bool have = [] {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
           __builtin_cpu_supports("avx2");
  }();
  return have;
}

thread_local std::vector<uint8_t> tls_pixel_rows;

// out[o][c] = max over the window entries e of rows[e][c], 64 channels per vector (masked tail).
template <bool kSigned>
__attribute__((target("avx512f,avx512bw"))) void MaxPixelRows(const PoolTable& t, const uint8_t* __restrict rows,
                                                              int64_t channels, uint8_t* __restrict out) {
  const int32_t* begin = t.begin.data();
  const int32_t* entries = t.entries.data();
  for (int64_t c = 0; c < channels; c += 64) {
    const int64_t n = std::min<int64_t>(64, channels - c);
    const __mmask64 lanes = n == 64 ? ~__mmask64{0} : (__mmask64{1} << n) - 1;
    for (int64_t o = 0; o < t.count; ++o) {
      __m512i m = _mm512_maskz_loadu_epi8(lanes, rows + entries[begin[o]] * channels + c);
      for (int32_t j = begin[o] + 1; j < begin[o + 1]; ++j) {
        const __m512i v = _mm512_maskz_loadu_epi8(lanes, rows + entries[j] * channels + c);
        m = kSigned ? _mm512_max_epi8(m, v) : _mm512_max_epu8(m, v);
      }
      _mm512_mask_storeu_epi8(out + o * channels + c, lanes, m);
    }
  }
}

// 8-bit max pooling channels-last: per image, the compact planes [C, K_in] are transposed to pixel rows
// [K_in, C], each output's window is a max of whole rows (64 channels per instruction), and the pooled
// rows [K_out, C] are transposed back. Plane by plane, the scalar loops above did one byte per load:
// SqueezeNet's INT8 pool1 took 0.124 ms that way (see benchmarks.md).
template <typename T>
void MaxPoolPixelRows(const PoolTable& t, int64_t batch, int64_t channels, const T* x, T* y,
                      const ParallelRunner& parallel) {
  const int64_t k_in = t.compact_size, k_out = t.count;
  RunMaybeSerially(parallel, batch * channels * (k_in + k_out) / 4, static_cast<size_t>(batch), [&](size_t n) {
    // One image's rows per thread (a few hundred KiB for SqueezeNet's pool1), kept for the next call.
    uint8_t* rows = Scratch(tls_pixel_rows, static_cast<size_t>((k_in + k_out) * channels));
    uint8_t* pooled = rows + k_in * channels;
    const uint8_t* image = reinterpret_cast<const uint8_t*>(x) + static_cast<int64_t>(n) * channels * k_in;
    TransposeBytes(image, k_in, channels, k_in, rows, channels, true);
    MaxPixelRows<std::is_signed_v<T>>(t, rows, channels, pooled);
    TransposeBytes(pooled, channels, k_out, channels,
                   reinterpret_cast<uint8_t*>(y) + static_cast<int64_t>(n) * channels * k_out, k_out, true);
  });
}

// 8-bit pooling: channels-last where AVX-512BW and at least 16 channels make it pay, else plane by plane.
template <typename T>
void PoolBytes(PoolMode mode, const PoolTable& t, int64_t batch, int64_t channels, const T* x, T* y,
               const ParallelRunner& parallel) {
  if (mode == PoolMode::kMax && HaveAvx512Bw() && channels >= 16 && batch * channels * t.count > 0)
    return MaxPoolPixelRows(t, batch, channels, x, y, parallel);
  Pool(mode, t, batch * channels, x, y, parallel);
}

}  // namespace

void CompactPoolCpu::Compute(PoolMode mode, const PoolTable& t, int64_t planes, const float* x, float* y,
                             const ParallelRunner& parallel) {
  Pool(mode, t, planes, x, y, parallel);
}

void CompactPoolCpu::Compute(PoolMode mode, const PoolTable& t, int64_t batch, int64_t channels, const uint8_t* x,
                             uint8_t* y, const ParallelRunner& parallel) {
  PoolBytes(mode, t, batch, channels, x, y, parallel);
}

void CompactPoolCpu::Compute(PoolMode mode, const PoolTable& t, int64_t batch, int64_t channels, const int8_t* x,
                             int8_t* y, const ParallelRunner& parallel) {
  PoolBytes(mode, t, batch, channels, x, y, parallel);
}

}  // namespace onnx_perforate
