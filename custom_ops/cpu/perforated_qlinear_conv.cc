#include "perforated_qlinear_conv.h"

#include "byte_transpose.h"
#include "nn_interpolate.h"

#include <immintrin.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <string>

#pragma GCC diagnostic ignored "-Wpsabi"
// GCC 12's false positive inside its own AVX-512 headers when not optimising (bug 105593), as in
// packed_gemm.cc.
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"

namespace onnx_perforate {

namespace {

#define PERFORATE_VNNI "avx512f,avx512bw,avx512vl,avx512dq,avx512vnni,avx2,fma"
#define PERFORATE_AVX2_INT "avx2,fma"

int32_t Broadcast32(const void* p) {
  int32_t v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

// c[j * ldc + r] = sum over taps t and channel steps s of the 4 (VNNI) / 2 (AVX2) channel products of
// panel row r and column j, whose pixel starts at x + columns[j] + tap_offsets[t] (byte offsets).
template <int kVectors, int kNr>
__attribute__((always_inline, target(PERFORATE_VNNI))) inline void VnniTile(int64_t taps, int64_t steps, const int8_t* __restrict a,
                                                    const uint8_t* __restrict x, const int64_t* __restrict columns,
                                                    const int64_t* __restrict tap_offsets, int32_t* __restrict c,
                                                    int64_t ldc) {
  constexpr int kMr = 16 * kVectors;
  __m512i acc[kNr][kVectors];
#pragma GCC unroll 16
  for (int j = 0; j < kNr; ++j)
#pragma GCC unroll 2
    for (int v = 0; v < kVectors; ++v) acc[j][v] = _mm512_setzero_si512();
  for (int64_t t = 0; t < taps; ++t) {
    const uint8_t* base = x + tap_offsets[t];
    const int8_t* at = a + t * steps * kMr * 4;
    for (int64_t s = 0; s < steps; ++s) {
      __m512i av[kVectors];
#pragma GCC unroll 2
      for (int v = 0; v < kVectors; ++v) av[v] = _mm512_loadu_si512(at + (s * kMr + v * 16) * 4);
#pragma GCC unroll 16
      for (int j = 0; j < kNr; ++j) {
        const __m512i bj = _mm512_set1_epi32(Broadcast32(base + columns[j] + 4 * s));
#pragma GCC unroll 2
        for (int v = 0; v < kVectors; ++v) acc[j][v] = _mm512_dpbusd_epi32(acc[j][v], bj, av[v]);
      }
    }
  }
#pragma GCC unroll 16
  for (int j = 0; j < kNr; ++j)
#pragma GCC unroll 2
    for (int v = 0; v < kVectors; ++v) _mm512_storeu_si512(c + j * ldc + v * 16, acc[j][v]);
}

template <int kVectors, int kNr>
__attribute__((always_inline, target(PERFORATE_AVX2_INT))) inline void Avx2Tile(int64_t taps, int64_t steps, const int16_t* __restrict a,
                                                    const int16_t* __restrict x, const int64_t* __restrict columns,
                                                    const int64_t* __restrict tap_offsets, int32_t* __restrict c,
                                                    int64_t ldc) {
  constexpr int kMr = 8 * kVectors;
  __m256i acc[kNr][kVectors];
#pragma GCC unroll 16
  for (int j = 0; j < kNr; ++j)
#pragma GCC unroll 2
    for (int v = 0; v < kVectors; ++v) acc[j][v] = _mm256_setzero_si256();
  for (int64_t t = 0; t < taps; ++t) {
    const int16_t* base = x + tap_offsets[t];
    const int16_t* at = a + t * steps * kMr * 2;
    for (int64_t s = 0; s < steps; ++s) {
      __m256i av[kVectors];
#pragma GCC unroll 2
      for (int v = 0; v < kVectors; ++v)
        av[v] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(at + (s * kMr + v * 8) * 2));
#pragma GCC unroll 16
      for (int j = 0; j < kNr; ++j) {
        const __m256i bj = _mm256_set1_epi32(Broadcast32(base + columns[j] + 2 * s));
#pragma GCC unroll 2
        for (int v = 0; v < kVectors; ++v) acc[j][v] = _mm256_add_epi32(acc[j][v], _mm256_madd_epi16(bj, av[v]));
      }
    }
  }
#pragma GCC unroll 16
  for (int j = 0; j < kNr; ++j)
#pragma GCC unroll 2
    for (int v = 0; v < kVectors; ++v)
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(c + j * ldc + v * 8), acc[j][v]);
}

// Plain C++ over the VNNI layout: one column at a time.
void PortableTile(int64_t taps, int64_t steps, int64_t mr, const int8_t* a, const uint8_t* x,
                  const int64_t* columns, const int64_t* tap_offsets, int32_t* c, int64_t ldc, int64_t nr) {
  for (int64_t j = 0; j < nr; ++j) {
    int32_t* out = c + j * ldc;
    std::fill(out, out + mr, 0);
    for (int64_t t = 0; t < taps; ++t) {
      const uint8_t* pixel = x + columns[j] + tap_offsets[t];
      const int8_t* at = a + t * steps * mr * 4;
      for (int64_t s = 0; s < steps; ++s)
        for (int64_t r = 0; r < mr; ++r)
          for (int l = 0; l < 4; ++l) out[r] += int32_t(at[(s * mr + r) * 4 + l]) * int32_t(pixel[4 * s + l]);
    }
  }
}

using VnniKernel = void (*)(int64_t, int64_t, const int8_t*, const uint8_t*, const int64_t*, const int64_t*,
                            int32_t*, int64_t);
using Avx2Kernel = void (*)(int64_t, int64_t, const int16_t*, const int16_t*, const int64_t*, const int64_t*,
                            int32_t*, int64_t);

#define PERFORATE_VNNI_KERNEL(name, vectors, nr)                                                              \
  __attribute__((target(PERFORATE_VNNI))) void name(int64_t taps, int64_t steps, const int8_t* a,             \
                                                    const uint8_t* x, const int64_t* columns,                 \
                                                    const int64_t* tap_offsets, int32_t* c, int64_t ldc) {    \
    VnniTile<vectors, nr>(taps, steps, a, x, columns, tap_offsets, c, ldc);                                   \
  }
#define PERFORATE_AVX2_INT_KERNEL(name, vectors, nr)                                                          \
  __attribute__((target(PERFORATE_AVX2_INT))) void name(int64_t taps, int64_t steps, const int16_t* a,        \
                                                        const int16_t* x, const int64_t* columns,             \
                                                        const int64_t* tap_offsets, int32_t* c, int64_t ldc) { \
    Avx2Tile<vectors, nr>(taps, steps, a, x, columns, tap_offsets, c, ldc);                                   \
  }

// One kernel per tile width up to NR: the last tile of a column block computes only the columns it has
// (42 positions are 3 full tiles and one of 6, not 4 of 12, on a 13x13 map at r = 0.75).
PERFORATE_VNNI_KERNEL(Vnni1x1, 1, 1)
PERFORATE_VNNI_KERNEL(Vnni1x2, 1, 2)
PERFORATE_VNNI_KERNEL(Vnni1x3, 1, 3)
PERFORATE_VNNI_KERNEL(Vnni1x4, 1, 4)
PERFORATE_VNNI_KERNEL(Vnni1x5, 1, 5)
PERFORATE_VNNI_KERNEL(Vnni1x6, 1, 6)
PERFORATE_VNNI_KERNEL(Vnni1x7, 1, 7)
PERFORATE_VNNI_KERNEL(Vnni1x8, 1, 8)
PERFORATE_VNNI_KERNEL(Vnni1x9, 1, 9)
PERFORATE_VNNI_KERNEL(Vnni1x10, 1, 10)
PERFORATE_VNNI_KERNEL(Vnni1x11, 1, 11)
PERFORATE_VNNI_KERNEL(Vnni1x12, 1, 12)
PERFORATE_VNNI_KERNEL(Vnni2x1, 2, 1)
PERFORATE_VNNI_KERNEL(Vnni2x2, 2, 2)
PERFORATE_VNNI_KERNEL(Vnni2x3, 2, 3)
PERFORATE_VNNI_KERNEL(Vnni2x4, 2, 4)
PERFORATE_VNNI_KERNEL(Vnni2x5, 2, 5)
PERFORATE_VNNI_KERNEL(Vnni2x6, 2, 6)
PERFORATE_VNNI_KERNEL(Vnni2x7, 2, 7)
PERFORATE_VNNI_KERNEL(Vnni2x8, 2, 8)
PERFORATE_VNNI_KERNEL(Vnni2x9, 2, 9)
PERFORATE_VNNI_KERNEL(Vnni2x10, 2, 10)
PERFORATE_VNNI_KERNEL(Vnni2x11, 2, 11)
PERFORATE_VNNI_KERNEL(Vnni2x12, 2, 12)
PERFORATE_AVX2_INT_KERNEL(Avx2x1x1, 1, 1)
PERFORATE_AVX2_INT_KERNEL(Avx2x1x2, 1, 2)
PERFORATE_AVX2_INT_KERNEL(Avx2x1x3, 1, 3)
PERFORATE_AVX2_INT_KERNEL(Avx2x1x4, 1, 4)
PERFORATE_AVX2_INT_KERNEL(Avx2x1x5, 1, 5)
PERFORATE_AVX2_INT_KERNEL(Avx2x1x6, 1, 6)
PERFORATE_AVX2_INT_KERNEL(Avx2x2x1, 2, 1)
PERFORATE_AVX2_INT_KERNEL(Avx2x2x2, 2, 2)
PERFORATE_AVX2_INT_KERNEL(Avx2x2x3, 2, 3)
PERFORATE_AVX2_INT_KERNEL(Avx2x2x4, 2, 4)
PERFORATE_AVX2_INT_KERNEL(Avx2x2x5, 2, 5)
PERFORATE_AVX2_INT_KERNEL(Avx2x2x6, 2, 6)

// [vectors - 1][columns - 1]
constexpr VnniKernel kVnniKernels[2][12] = {
    {Vnni1x1, Vnni1x2, Vnni1x3, Vnni1x4, Vnni1x5, Vnni1x6, Vnni1x7, Vnni1x8, Vnni1x9, Vnni1x10, Vnni1x11, Vnni1x12},
    {Vnni2x1, Vnni2x2, Vnni2x3, Vnni2x4, Vnni2x5, Vnni2x6, Vnni2x7, Vnni2x8, Vnni2x9, Vnni2x10, Vnni2x11, Vnni2x12}};
constexpr Avx2Kernel kAvx2Kernels[2][6] = {{Avx2x1x1, Avx2x1x2, Avx2x1x3, Avx2x1x4, Avx2x1x5, Avx2x1x6},
                                           {Avx2x2x1, Avx2x2x2, Avx2x2x3, Avx2x2x4, Avx2x2x5, Avx2x2x6}};

constexpr int64_t kPortableMr = 16, kPortableNr = 4;

struct IsaShape {
  int64_t width, nr, lanes;
};

IsaShape ShapeOf(QuantizedGemmIsa isa) {
  switch (isa) {
    case QuantizedGemmIsa::kAvx512Vnni:
      return {16, 12, 4};
    case QuantizedGemmIsa::kAvx2:
      return {8, 6, 2};
    case QuantizedGemmIsa::kPortable:
      break;
  }
  return {kPortableMr, kPortableNr, 4};
}

QuantizedGemmIsa Detect() {
  const char* env = std::getenv("ONNX_PERFORATE_GEMM");
  const std::string forced = env ? env : "";
  if (forced == "portable" || forced == "openblas") return QuantizedGemmIsa::kPortable;
  __builtin_cpu_init();
  if (forced != "avx2" && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
      __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") &&
      __builtin_cpu_supports("avx512vnni"))
    return QuantizedGemmIsa::kAvx512Vnni;
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return QuantizedGemmIsa::kAvx2;
  return QuantizedGemmIsa::kPortable;
}

// Requantizes rows of n int32 sums of consecutive output channels (row r at acc + r * lda) into uint8
// rows of n bytes, exactly as MLAS does on x86: float multiply, clamp to the output range minus the zero
// point, round to nearest even, add the zero point. The rounding adds and subtracts 1.5 * 2^23 (exact for
// |v| < 2^22, which the clamp ensures), so the loop vectorises without a call to nearbyintf. All rows in
// one call: with few output channels (a 1x1 squeeze has 16) a call per position cost more than its math.
__attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
void RequantizeRows(const int32_t* __restrict acc, int64_t lda, int64_t rows, const int32_t* __restrict offset,
                    const float* __restrict scale, int64_t n, float lo, float hi, int32_t zero_point,
                    uint8_t* __restrict out) {
  constexpr float kRound = 12582912.0f;  // 1.5 * 2^23
  for (int64_t r = 0; r < rows; ++r, acc += lda, out += n)
    for (int64_t i = 0; i < n; ++i) {
      float v = static_cast<float>(acc[i] + offset[i]) * scale[i];
      v = std::min(std::max(v, lo), hi);
      // Not folded to v: without -ffast-math the compiler keeps both roundings.
      out[i] = static_cast<uint8_t>(static_cast<int32_t>((v + kRound) - kRound) + zero_point);
    }
}

// S[g][column] = sum over the taps and group g's channels of (x - x_zero_point) at a computed position:
// the input side of the asymmetric-weight correction. Each padded pixel's channel sum is taken once
// (pixel_sums [pixel][group]), then S adds the taps' pixel sums: the channels are read once per pixel,
// not once per tap. T: the padded copy's element (uint8 or int16); offsets are in elements, multiples
// of `stride` (elements per pixel).
template <typename T>
void ReceptiveFieldSums(const T* buffer, int64_t pixels, int64_t stride, int64_t group, int64_t padded_channels,
                        int64_t cg, const int64_t* columns, int64_t count, const std::vector<int64_t>& taps,
                        int32_t x_zero_point, int32_t* pixel_sums, int32_t* sums, const ParallelRunner& parallel) {
  constexpr int64_t kPerTask = 1024;
  const int64_t pixel_blocks = (pixels + kPerTask - 1) / kPerTask;
  RunMaybeSerially(parallel, pixels * group * cg, static_cast<size_t>(pixel_blocks), [&](size_t task) {
    const int64_t first = static_cast<int64_t>(task) * kPerTask, last = std::min(pixels, first + kPerTask);
    for (int64_t p = first; p < last; ++p)
      for (int64_t g = 0; g < group; ++g) {
        const T* channels = buffer + p * stride + g * padded_channels;
        int32_t sum = 0;
        for (int64_t c = 0; c < cg; ++c) sum += channels[c];
        pixel_sums[p * group + g] = sum;
      }
  });
  const int64_t tap_count = static_cast<int64_t>(taps.size());
  const int32_t centre = static_cast<int32_t>(tap_count * cg) * x_zero_point;
  const int64_t blocks = (count + kPerTask - 1) / kPerTask;
  RunMaybeSerially(parallel, count * group * tap_count, static_cast<size_t>(blocks), [&](size_t task) {
    const int64_t first = static_cast<int64_t>(task) * kPerTask, last = std::min(count, first + kPerTask);
    for (int64_t k = first; k < last; ++k)
      for (int64_t g = 0; g < group; ++g) {
        int32_t sum = 0;
        for (int64_t t = 0; t < tap_count; ++t) sum += pixel_sums[(columns[k] + taps[t]) / stride * group + g];
        sums[g * count + k] = sum - centre;
      }
  });
}

thread_local std::vector<uint8_t> tls_input_bytes;
thread_local std::vector<int16_t> tls_input_words;
thread_local std::vector<int64_t> tls_columns;
thread_local std::vector<int32_t> tls_tile;
thread_local std::vector<uint8_t> tls_tile_bytes;
thread_local std::vector<uint8_t> tls_interpolated;
thread_local std::vector<int32_t> tls_input_sums;

// PackInput's per-image channels-last copy before padding (narrow maps), bytes or AVX2's int16.
template <typename T>
std::vector<T>& PlanarScratch() {
  thread_local std::vector<T> buffer;
  return buffer;
}

// Up to 4 channel rows (3 for RGB) interleaved into 4-byte pixels, the rest of each pixel zero: the first
// layer's channels are padded to the VNNI lane width, which the 16x16 transposes do not cover.
__attribute__((target(PERFORATE_AVX2_INT))) void InterleaveFourChannels(const uint8_t* const rows[4], int64_t width,
                                                                        uint8_t* __restrict out) {
  int64_t x = 0;
  for (; x + 16 <= width; x += 16) {
    __m128i r[4];
    for (int c = 0; c < 4; ++c)
      r[c] = rows[c] ? _mm_loadu_si128(reinterpret_cast<const __m128i*>(rows[c] + x)) : _mm_setzero_si128();
    const __m128i lo01 = _mm_unpacklo_epi8(r[0], r[1]), hi01 = _mm_unpackhi_epi8(r[0], r[1]);
    const __m128i lo23 = _mm_unpacklo_epi8(r[2], r[3]), hi23 = _mm_unpackhi_epi8(r[2], r[3]);
    uint8_t* o = out + x * 4;
    _mm_storeu_si128(reinterpret_cast<__m128i*>(o), _mm_unpacklo_epi16(lo01, lo23));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(o + 16), _mm_unpackhi_epi16(lo01, lo23));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(o + 32), _mm_unpacklo_epi16(hi01, hi23));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(o + 48), _mm_unpackhi_epi16(hi01, hi23));
  }
  for (; x < width; ++x)
    for (int c = 0; c < 4; ++c) out[x * 4 + c] = rows[c] ? rows[c][x] : 0;
}

// X as a padded NHWC buffer: element (n, y, x, g, c) at ((n * Hp + y) * Wp + x) * C' + g * Cg' + c, with
// C' = group * Cg' (channels of a group padded to whole lanes). Padding pixels hold the zero point. X is
// planar here (a compact input was interpolated before). Sizes are copied to locals: the byte stores
// may alias anything, which would make the compiler reload them in every iteration.
template <typename T>
void PackInput(const ConvShape& s, const ConvAttributes& a, const PaddedGather& g, const uint8_t* x,
               int64_t padded_channels, uint8_t zero_point, T* out, bool simd, const ParallelRunner& parallel) {
  const int64_t hp = g.padded_h, wp = g.padded_w, cg = s.in_channels_per_group();
  const int64_t stride = s.group * padded_channels;
  const int64_t rows = s.batch * hp, in_h = s.in_h, in_w = s.in_w, channels = s.in_channels, plane = s.in_plane;
  const int64_t pad_top = a.pad_top, pad_left = a.pad_left, group = s.group;
  const T zero = static_cast<T>(zero_point);
  if (simd && padded_channels == cg && channels >= 16 && plane >= 16 && (in_w < 16 || (hp == in_h && wp == in_w))) {
    // Channels land contiguously and the 16x16 transposes would not cover a row (maps narrower than 16,
    // e.g. 13x13) or the rows have no padding between them (1x1 convolutions): one [C, H*W] -> [H*W, C]
    // transpose per image, straight into the buffer when unpadded, else into a copy placed row by row.
    const bool unpadded = hp == in_h && wp == in_w;
    T* planar = unpadded ? out : Scratch(PlanarScratch<T>(), static_cast<size_t>(plane * stride));
    for (int64_t n = 0; n < s.batch; ++n) {
      T* image = unpadded ? out + n * plane * stride : planar;
      TransposeBytes(x + n * channels * plane, plane, channels, plane, image, stride, simd);
      if (unpadded) continue;
      T* padded_image = out + n * hp * wp * stride;
      std::fill(padded_image, padded_image + hp * wp * stride, zero);
      for (int64_t y = 0; y < in_h; ++y)
        std::copy(image + y * in_w * stride, image + (y + 1) * in_w * stride,
                  padded_image + ((y + pad_top) * wp + pad_left) * stride);
    }
    return;
  }
  RunMaybeSerially(parallel, s.batch * hp * wp * stride / 4, static_cast<size_t>(rows), [=](size_t task) {
    const int64_t n = task / hp, py = task % hp, y = py - pad_top;
    T* row = out + (n * hp + py) * wp * stride;
    if (y < 0 || y >= in_h) {
      std::fill(row, row + wp * stride, zero);
      return;
    }
    std::fill(row, row + pad_left * stride, zero);
    std::fill(row + (pad_left + in_w) * stride, row + wp * stride, zero);
    T* body = row + pad_left * stride;
    const uint8_t* channel_rows = x + n * channels * plane + y * in_w;
    if (padded_channels == cg) {  // channels land contiguously: one [C, W] -> [W, C] transpose
      TransposeBytes(channel_rows, plane, channels, in_w, body, stride, simd);
      return;
    }
    if constexpr (sizeof(T) == 1) {
      if (simd && group == 1 && stride == 4) {  // e.g. RGB padded to 4 lanes
        const uint8_t* sources[4] = {};
        for (int64_t c = 0; c < channels; ++c) sources[c] = channel_rows + c * plane;
        InterleaveFourChannels(sources, in_w, body);
        return;
      }
    }
    for (int64_t xx = 0; xx < in_w; ++xx)
      for (int64_t gi = 0; gi < group; ++gi)
        std::fill(body + xx * stride + gi * padded_channels + cg, body + xx * stride + (gi + 1) * padded_channels, T(0));
    for (int64_t c = 0; c < channels; ++c) {
      const uint8_t* __restrict src = channel_rows + c * plane;
      T* __restrict dst = body + (c / cg) * padded_channels + c % cg;
      for (int64_t xx = 0; xx < in_w; ++xx) dst[xx * stride] = src[xx];
    }
  });
}

// Pointwise convolutions (1x1, stride 1, no padding, one group) keep the channel-major layout instead:
// output positions lie along the vector and the weights are broadcast, so the input needs only its
// channels interleaved in fours (no transpose) and each output channel's row of positions is written
// straight into Yc. The NHWC path above spent more on its two transposes than on the GEMM for
// SqueezeNet's squeeze and expand 1x1 layers (e.g. 128 -> 16 channels on a compact 55x55 map).
//
// acc[r][v] (8 channels x kVectors * 16 positions) over all channel quads; `x` holds 4 interleaved
// channels per position ([quad][positions][4]), `a` is the VNNI weight panel ([quad][mr][4]) at row r0.
// Requantized as RequantizeRows does (the vector conversion rounds to nearest even, as nearbyintf).
template <int kVectors>
__attribute__((always_inline, target(PERFORATE_VNNI))) inline void PointwiseTile(
    int64_t quads, const int8_t* __restrict a, int64_t mr, const uint8_t* __restrict x, int64_t quad_stride,
    int64_t channels, const int32_t* __restrict offset, const float* __restrict scale, float lo, float hi,
    int32_t zero_point, uint8_t* __restrict y, int64_t ldy, int64_t positions) {
  constexpr int kRows = 8;
  __m512i acc[kRows][kVectors];
#pragma GCC unroll 8
  for (int r = 0; r < kRows; ++r)
#pragma GCC unroll 3
    for (int v = 0; v < kVectors; ++v) acc[r][v] = _mm512_setzero_si512();
  for (int64_t q = 0; q < quads; ++q) {
    __m512i xv[kVectors];
#pragma GCC unroll 3
    for (int v = 0; v < kVectors; ++v) xv[v] = _mm512_loadu_si512(x + q * quad_stride + v * 64);
    const int8_t* aq = a + q * mr * 4;
#pragma GCC unroll 8
    for (int r = 0; r < kRows; ++r) {
      const __m512i wr = _mm512_set1_epi32(Broadcast32(aq + r * 4));
#pragma GCC unroll 3
      for (int v = 0; v < kVectors; ++v) acc[r][v] = _mm512_dpbusd_epi32(acc[r][v], xv[v], wr);
    }
  }
  const __m512 low = _mm512_set1_ps(lo), high = _mm512_set1_ps(hi);
  const __m512i zero = _mm512_set1_epi32(zero_point);
#pragma GCC unroll 8
  for (int r = 0; r < kRows; ++r) {
    if (r >= channels) break;
    const __m512i off = _mm512_set1_epi32(offset[r]);
    const __m512 sc = _mm512_set1_ps(scale[r]);
#pragma GCC unroll 3
    for (int v = 0; v < kVectors; ++v) {
      __m512 value = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_add_epi32(acc[r][v], off)), sc);
      value = _mm512_min_ps(_mm512_max_ps(value, low), high);
      const __m512i q = _mm512_add_epi32(
          _mm512_cvt_roundps_epi32(value, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC), zero);
      const int64_t left = positions - v * 16;
      const __mmask16 keep = left >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << left) - 1);
      _mm_mask_storeu_epi8(y + r * ldy + v * 16, keep, _mm512_cvtepi32_epi8(q));
    }
  }
}

using PointwiseKernel = void (*)(int64_t, const int8_t*, int64_t, const uint8_t*, int64_t, int64_t, const int32_t*,
                                 const float*, float, float, int32_t, uint8_t*, int64_t, int64_t);

#define PERFORATE_POINTWISE_KERNEL(name, vectors)                                                          \
  __attribute__((target(PERFORATE_VNNI))) void name(                                                       \
      int64_t quads, const int8_t* a, int64_t mr, const uint8_t* x, int64_t quad_stride, int64_t channels, \
      const int32_t* offset, const float* scale, float lo, float hi, int32_t zero_point, uint8_t* y,       \
      int64_t ldy, int64_t positions) {                                                                    \
    PointwiseTile<vectors>(quads, a, mr, x, quad_stride, channels, offset, scale, lo, hi, zero_point, y,  \
                           ldy, positions);                                                                \
  }
PERFORATE_POINTWISE_KERNEL(Pointwise8x16, 1)
PERFORATE_POINTWISE_KERNEL(Pointwise8x32, 2)
PERFORATE_POINTWISE_KERNEL(Pointwise8x48, 3)
constexpr PointwiseKernel kPointwiseKernels[3] = {Pointwise8x16, Pointwise8x32, Pointwise8x48};

bool UsesPointwisePath(const ConvShape& s, const ConvAttributes& a, const InputIndex* input_index,
                       const PackedQuantizedWeights& w, const Requantization& q) {
  return w.isa == QuantizedGemmIsa::kAvx512Vnni && !input_index && s.group == 1 && s.taps() == 1 &&
         a.stride_h == 1 && a.stride_w == 1 && a.pad_top == 0 && a.pad_left == 0 && a.pad_bottom == 0 &&
         a.pad_right == 0 && q.w_zero_points.empty();
}

thread_local std::vector<uint8_t> tls_quads;
thread_local std::vector<uint32_t> tls_quad_row;

// x [N, C, P] -> quads [N][C / 4][stride][4] holding the `count` computed positions (all P when count ==
// P, else positions[k]), channels past C zero.
void InterleaveQuads(const uint8_t* x, int64_t batch, int64_t channels, int64_t plane, const int32_t* positions,
                     int64_t count, int64_t quads, int64_t stride, uint8_t* out, const ParallelRunner& parallel) {
  RunMaybeSerially(parallel, batch * quads * plane, static_cast<size_t>(batch * quads), [&](size_t task) {
    const int64_t n = static_cast<int64_t>(task) / quads, quad = static_cast<int64_t>(task) % quads;
    const uint8_t* rows[4] = {};
    for (int64_t l = 0; l < 4 && 4 * quad + l < channels; ++l) rows[l] = x + (n * channels + 4 * quad + l) * plane;
    uint8_t* dst = out + (n * quads + quad) * stride * 4;
    if (count == plane) {
      InterleaveFourChannels(rows, plane, dst);
    } else {
      uint32_t* full = Scratch(tls_quad_row, static_cast<size_t>(plane));
      InterleaveFourChannels(rows, plane, reinterpret_cast<uint8_t*>(full));
      uint32_t* compact = reinterpret_cast<uint32_t*>(dst);
      for (int64_t k = 0; k < count; ++k) compact[k] = full[positions[k]];
    }
    std::fill(dst + count * 4, dst + stride * 4, uint8_t{0});
  });
}

// Large copies (big batches) give their memory back rather than staying pinned to the calling thread.
void ReleaseLargeScratch() {
  constexpr size_t kKeptBytes = size_t{64} << 20;
  if (tls_input_bytes.size() > kKeptBytes) std::vector<uint8_t>().swap(tls_input_bytes);
  if (tls_input_words.size() > kKeptBytes / 2) std::vector<int16_t>().swap(tls_input_words);
  if (tls_interpolated.size() > kKeptBytes) std::vector<uint8_t>().swap(tls_interpolated);
  if (tls_quads.size() > kKeptBytes) std::vector<uint8_t>().swap(tls_quads);
}

void ComputePointwise(const ConvShape& s, const PaddedGather& padded, int64_t count, const uint8_t* x,
                      const PackedQuantizedWeights& w, const Requantization& q, const int32_t* offsets, float lo,
                      float hi, uint8_t* yc, const ParallelRunner& parallel) {
  constexpr int64_t kChunk = 48, kRows = 8;
  const int64_t quads = w.padded_channels / 4, plane = s.in_h * s.in_w;
  const int64_t stride = (count + 15) / 16 * 16;  // positions per quad row, whole vectors
  uint8_t* buffer = Scratch(tls_quads, static_cast<size_t>(s.batch * quads * stride * 4));
  InterleaveQuads(x, s.batch, s.in_channels, plane, padded.positions.data(), count, quads, stride, buffer, parallel);

  // Tasks: images x position chunks x channel ranges (whole 8-row blocks), about three per core.
  const int64_t chunks = (count + kChunk - 1) / kChunk, row_blocks = (s.out_channels + kRows - 1) / kRows;
  const int64_t splits =
      std::min(row_blocks, std::max<int64_t>(1, (3 * Cores() + s.batch * chunks - 1) / (s.batch * chunks)));
  const int64_t blocks_per_split = (row_blocks + splits - 1) / splits;
  parallel(static_cast<size_t>(s.batch * chunks * splits), [&](size_t task) {
    const int64_t split = task % splits, chunk = (task / splits) % chunks, n = task / splits / chunks;
    const int64_t p0 = chunk * kChunk, positions = std::min(kChunk, count - p0);
    const PointwiseKernel kernel = kPointwiseKernels[(positions + 15) / 16 - 1];
    const uint8_t* xq = buffer + (n * quads * stride + p0) * 4;
    const int64_t b1 = std::min(row_blocks, (split + 1) * blocks_per_split);
    for (int64_t b = split * blocks_per_split; b < b1; ++b) {
      const int64_t m0 = b * kRows, panel = m0 / w.mr;
      const int8_t* a = w.bytes.data() + panel * w.PanelSize() + (m0 % w.mr) * 4;
      kernel(quads, a, w.mr, xq, stride * 4, std::min(kRows, s.out_channels - m0), offsets + m0, q.scales.data() + m0,
             lo, hi, q.y_zero_point, yc + (n * s.out_channels + m0) * count + p0, count, positions);
    }
  });
}

}  // namespace

QuantizedGemmIsa BestQuantizedGemmIsa() {
  static const QuantizedGemmIsa isa = Detect();
  return isa;
}

const char* QuantizedGemmIsaName(QuantizedGemmIsa isa) {
  switch (isa) {
    case QuantizedGemmIsa::kAvx512Vnni:
      return "avx512vnni";
    case QuantizedGemmIsa::kAvx2:
      return "avx2";
    case QuantizedGemmIsa::kPortable:
      break;
  }
  return "portable";
}

std::shared_ptr<const PackedQuantizedWeights> PerforatedQLinearConvCpu::PackWeights(const ConvShape& s,
                                                                                    const int8_t* w,
                                                                                    QuantizedGemmIsa isa) {
  const IsaShape shape = ShapeOf(isa);
  auto p = std::make_shared<PackedQuantizedWeights>();
  p->isa = isa;
  p->group = s.group;
  p->rows = s.out_channels_per_group();
  p->channels = s.in_channels_per_group();
  p->lanes = shape.lanes;
  p->padded_channels = (p->channels + shape.lanes - 1) / shape.lanes * shape.lanes;
  p->taps = s.taps();
  const int64_t wide = 2 * shape.width;
  p->vectors = isa == QuantizedGemmIsa::kPortable ? 1 : (p->rows % wide == 0 || p->rows >= 3 * wide) ? 2 : 1;
  p->mr = p->vectors * shape.width;
  p->panels = (p->rows + p->mr - 1) / p->mr;
  const int64_t total = p->group * p->panels * p->PanelSize();
  if (isa == QuantizedGemmIsa::kAvx2)
    p->words.assign(static_cast<size_t>(total), 0);
  else
    p->bytes.assign(static_cast<size_t>(total), 0);
  p->row_sums.assign(static_cast<size_t>(s.out_channels), 0);
  const int64_t steps = p->padded_channels / p->lanes;
  for (int64_t g = 0; g < p->group; ++g)
    for (int64_t m = 0; m < p->rows; ++m) {
      const int64_t i = m / p->mr, r = m % p->mr;
      const int8_t* src = w + (g * p->rows + m) * p->channels * p->taps;
      const int64_t panel = (g * p->panels + i) * p->PanelSize();
      int32_t sum = 0;
      for (int64_t c = 0; c < p->channels; ++c)
        for (int64_t t = 0; t < p->taps; ++t) {
          const int8_t value = src[c * p->taps + t];
          sum += value;
          const int64_t at = panel + (((t * steps + c / p->lanes) * p->mr + r) * p->lanes + c % p->lanes);
          if (isa == QuantizedGemmIsa::kAvx2)
            p->words[at] = value;
          else
            p->bytes[at] = value;
        }
      p->row_sums[g * p->rows + m] = sum;
    }
  return p;
}

void PerforatedQLinearConvCpu::Compute(const ConvShape& s, const ConvAttributes& a, const PaddedGather& padded,
                                       int64_t count, const InputIndex* input_index,
                                       const BytePermutePlan* input_bytes, const uint8_t* x,
                                       const PackedQuantizedWeights& w, const Requantization& q, uint8_t* yc,
                                       const ParallelRunner& parallel) {
  if (s.batch == 0 || s.out_channels == 0) return;
  const QuantizedGemmIsa isa = w.isa;
  const IsaShape shape = ShapeOf(isa);
  const int64_t nr = shape.nr, mr = w.mr, mg = w.rows;
  const int64_t stride = s.group * w.padded_channels;  // elements per padded pixel
  const int64_t pixels = padded.padded_h * padded.padded_w;
  const int64_t steps = w.padded_channels / w.lanes;

  // The int32 offset of every output channel: bias minus the input zero point times the weights' sum.
  std::vector<int32_t> offsets(static_cast<size_t>(s.out_channels));
  for (int64_t m = 0; m < s.out_channels; ++m) offsets[m] = q.bias[m] - q.x_zero_point * w.row_sums[m];
  const float lo = static_cast<float>(q.out_min - q.y_zero_point);
  const float hi = static_cast<float>(q.out_max - q.y_zero_point);
  if (UsesPointwisePath(s, a, input_index, w, q)) {
    ComputePointwise(s, padded, count, x, w, q, offsets.data(), lo, hi, yc, parallel);
    return ReleaseLargeScratch();
  }

  // A compact input is interpolated first (uint8 NNInterpolate: vector byte permutes where the CPU has
  // them), then packed like a planar one.
  ConvShape planar = s;
  if (input_index) {
    planar.in_plane = s.in_h * s.in_w;
    uint8_t* full = Scratch(tls_interpolated, static_cast<size_t>(s.batch * s.in_channels * planar.in_plane));
    NNInterpolateCpu::Compute(s.batch * s.in_channels, s.in_plane, input_index->values.data(), planar.in_plane, x,
                              full, parallel, input_bytes);
    x = full;
  }

  // The input, padded and channels-last (int16 for AVX2's vpmaddwd, bytes otherwise).
  const size_t buffer_size = static_cast<size_t>(s.batch * pixels * stride);
  const uint8_t* bytes = nullptr;
  const int16_t* words = nullptr;
  const uint8_t x_zero = static_cast<uint8_t>(q.x_zero_point);
  const bool simd = isa != QuantizedGemmIsa::kPortable;  // AVX2 at least: the SSE byte transposes apply
  if (isa == QuantizedGemmIsa::kAvx2) {
    int16_t* buffer = Scratch(tls_input_words, buffer_size);
    PackInput(planar, a, padded, x, w.padded_channels, x_zero, buffer, simd, parallel);
    words = buffer;
  } else {
    uint8_t* buffer = Scratch(tls_input_bytes, buffer_size);
    PackInput(planar, a, padded, x, w.padded_channels, x_zero, buffer, simd, parallel);
    bytes = buffer;
  }

  // Every image's computed positions in one column space: column n * count + k starts at pixel
  // n * pixels + positions[k]. Offsets are in elements; the tail of NR columns reads pixel 0.
  const int64_t columns = s.batch * count;
  int64_t* column_offsets = Scratch(tls_columns, static_cast<size_t>(columns + nr));
  for (int64_t n = 0; n < s.batch; ++n)
    for (int64_t k = 0; k < count; ++k) column_offsets[n * count + k] = (n * pixels + padded.positions[k]) * stride;
  std::fill(column_offsets + columns, column_offsets + columns + nr, 0);
  std::vector<int64_t> tap_offsets(padded.tap_offsets.size());
  for (size_t t = 0; t < tap_offsets.size(); ++t) tap_offsets[t] = int64_t{padded.tap_offsets[t]} * stride;

  // Asymmetric weights: the receptive-field sums of every group and column.
  const bool asymmetric = !q.w_zero_points.empty();
  int32_t* input_sums = nullptr;
  if (asymmetric) {
    input_sums = Scratch(tls_input_sums, static_cast<size_t>(s.group * (columns + s.batch * pixels)));
    int32_t* pixel_sums = input_sums + s.group * columns;
    const int64_t cg = s.in_channels_per_group(), all_pixels = s.batch * pixels;
    if (words)
      ReceptiveFieldSums(words, all_pixels, stride, s.group, w.padded_channels, cg, column_offsets, columns,
                         tap_offsets, q.x_zero_point, pixel_sums, input_sums, parallel);
    else
      ReceptiveFieldSums(bytes, all_pixels, stride, s.group, w.padded_channels, cg, column_offsets, columns,
                         tap_offsets, q.x_zero_point, pixel_sums, input_sums, parallel);
  }


  // Tasks: groups x column blocks x panel ranges, blocks small enough for L2. About three tasks per core,
  // claimed dynamically, and a whole number of them per core when there are few: 3 equal blocks on 2
  // threads ran at 1.3x of one thread. Column blocks keep at least 4 tiles; below that, panel ranges.
  // Blocks are whole tiles, spread evenly (block b: tiles [b * tiles / blocks, (b + 1) * tiles / blocks)).
  constexpr int64_t kMaxBlockTiles = 32, kTasksPerCore = 3, kMinTiles = 4;
  const int64_t cores = Cores(), wanted = kTasksPerCore * cores;
  const int64_t all_tiles = (columns + nr - 1) / nr;
  int64_t blocks = std::max<int64_t>(1, (all_tiles + kMaxBlockTiles - 1) / kMaxBlockTiles);
  while (s.group * blocks < wanted && all_tiles / (blocks + 1) >= kMinTiles) ++blocks;
  if (s.group == 1 && blocks > 1 && blocks < 4 * wanted) {
    const int64_t whole = (blocks + cores - 1) / cores * cores;  // a multiple of the cores, if tiles allow
    if (all_tiles / whole >= kMinTiles) blocks = whole;
  }
  const int64_t splits =
      std::min<int64_t>(w.panels, std::max<int64_t>(1, (wanted + s.group * blocks - 1) / (s.group * blocks)));
  const int64_t panels_per_split = (w.panels + splits - 1) / splits;

  const VnniKernel* vnni_kernels = kVnniKernels[w.vectors == 2 ? 1 : 0];
  const Avx2Kernel* avx2_kernels = kAvx2Kernels[w.vectors == 2 ? 1 : 0];
  parallel(static_cast<size_t>(s.group * blocks * splits), [&](size_t task) {
    const int64_t split = task % splits, b = (task / splits) % blocks, g = task / splits / blocks;
    const int64_t i0 = split * panels_per_split, i1 = std::min(w.panels, i0 + panels_per_split);
    const int64_t m0 = i0 * mr, m1 = std::min(mg, i1 * mr), width = (i1 - i0) * mr;
    if (m0 >= m1) return;
    const int64_t k0 = b * all_tiles / blocks * nr, k1 = std::min(columns, (b + 1) * all_tiles / blocks * nr);
    const int64_t kn = k1 - k0, tiles = (kn + nr - 1) / nr;
    int32_t* tile = Scratch(tls_tile, static_cast<size_t>(tiles * nr * width));
    for (int64_t j = 0; j < tiles; ++j) {
      const int64_t* cols = column_offsets + k0 + j * nr;
      const int64_t tile_columns = std::min(nr, kn - j * nr);
      const VnniKernel vnni = vnni_kernels[std::min<int64_t>(tile_columns, 12) - 1];
      const Avx2Kernel avx2 = avx2_kernels[std::min<int64_t>(tile_columns, 6) - 1];
      for (int64_t i = i0; i < i1; ++i) {
        int32_t* c = tile + j * nr * width + (i - i0) * mr;
        const int64_t panel = (g * w.panels + i) * w.PanelSize();
        if (isa == QuantizedGemmIsa::kAvx512Vnni)
          vnni(w.taps, steps, w.bytes.data() + panel, bytes + g * w.padded_channels, cols, tap_offsets.data(), c, width);
        else if (isa == QuantizedGemmIsa::kAvx2)
          avx2(w.taps, steps, w.words.data() + panel, words + g * w.padded_channels, cols, tap_offsets.data(), c, width);
        else
          PortableTile(w.taps, steps, mr, w.bytes.data() + panel, bytes + g * w.padded_channels, cols,
                       tap_offsets.data(), c, width, tile_columns);
      }
    }
    // Requantize position by position (channels contiguous in the tile), then transpose into Yc's rows.
    const int64_t channels = m1 - m0, first = g * mg + m0;
    uint8_t* quantized = Scratch(tls_tile_bytes, static_cast<size_t>(kn * channels));
    if (asymmetric) {
      for (int64_t k = 0; k < kn; ++k) {
        const int32_t sum = input_sums[g * columns + k0 + k];
        int32_t* row = tile + k * width;
        for (int64_t c = 0; c < channels; ++c) row[c] -= q.w_zero_points[first + c] * sum;
      }
    }
    RequantizeRows(tile, width, kn, offsets.data() + first, q.scales.data() + first, channels, lo, hi, q.y_zero_point,
                   quantized);
    for (int64_t k = 0; k < kn;) {  // runs of positions within one image
      const int64_t column = k0 + k, n = column / count, kk = column % count;
      const int64_t run = std::min(kn - k, count - kk);
      TransposeBytes(quantized + k * channels, channels, run, channels, yc + (n * s.out_channels + first) * count + kk,
                     count, simd);
      k += run;
    }
  });
  ReleaseLargeScratch();
}

}  // namespace onnx_perforate
