#include "packed_gemm.h"

#include <immintrin.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <string>

#pragma GCC diagnostic ignored "-Wpsabi"
// GCC 12 warns inside its own AVX-512 headers (their _mm512_undefined_ps) when not optimising, as in
// the sanitizer build: a known false positive (GCC bug 105593).
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"

namespace onnx_perforate {

namespace {

typedef float Vec16 __attribute__((vector_size(64)));
typedef float Vec8 __attribute__((vector_size(32)));

// Unaligned vector access (memcpy compiles to a single vmovups).
template <typename V>
__attribute__((always_inline)) inline V Load(const float* p) {
  V v;
  __builtin_memcpy(&v, p, sizeof(V));
  return v;
}
template <typename V>
__attribute__((always_inline)) inline void Store(float* p, V v) {
  __builtin_memcpy(p, &v, sizeof(V));
}

// One template for every ISA: instantiated only inside functions compiled for that ISA, where the
// vector types map onto zmm / ymm registers.
// kPrefetch: also prefetch the weight panel 8 KiB ahead of the loads, for passes whose weights come
// from L3 or memory rather than L2 (see GemmIsa::Get).
template <typename V, int kVectors, int kNr, bool kPrefetch>
__attribute__((always_inline)) inline void MicroKernel(int64_t kc, const float* __restrict a,
                                                       const float* const* __restrict rows,
                                                       const int32_t* __restrict positions, float* __restrict c,
                                                       int64_t ldc, bool first) {
  constexpr int kWidth = sizeof(V) / sizeof(float);
  constexpr int kMr = kVectors * kWidth;
  constexpr int kPrefetchDistance = 8192 / (kMr * static_cast<int>(sizeof(float)));  // in steps of p
  V acc[kNr][kVectors];
#pragma GCC unroll 16
  for (int j = 0; j < kNr; ++j)
#pragma GCC unroll 2
    for (int v = 0; v < kVectors; ++v)
      acc[j][v] = first ? V{} : Load<V>(c + j * ldc + v * kWidth);
  int64_t offset[kNr];
#pragma GCC unroll 16
  for (int j = 0; j < kNr; ++j) offset[j] = positions[j];
  auto step = [&](int64_t p) __attribute__((always_inline)) {
    const float* row = rows[p];
    V av[kVectors];
#pragma GCC unroll 2
    for (int v = 0; v < kVectors; ++v) av[v] = Load<V>(a + p * kMr + v * kWidth);
#pragma GCC unroll 16
    for (int j = 0; j < kNr; ++j) {
      const V bj = row[offset[j]] - V{};  // a broadcast; x - 0 == x exactly, unlike 0 + x for x = -0
#pragma GCC unroll 2
      for (int v = 0; v < kVectors; ++v) acc[j][v] += av[v] * bj;
    }
  };
  if constexpr (kPrefetch) {
    // The prefetches go out in bursts, one per cache line of the next kBurst steps' weights, ahead of
    // a loop of plain steps: issued inside every step they cost ~12% (more registers in the loop).
    constexpr int64_t kBurst = 16, kLinesPerBurst = kBurst * kMr * sizeof(float) / 64;
    for (int64_t p0 = 0; p0 < kc; p0 += kBurst) {
      const float* ahead = a + (p0 + kPrefetchDistance) * kMr;
#pragma GCC unroll 32
      for (int64_t l = 0; l < kLinesPerBurst; ++l) __builtin_prefetch(ahead + l * 16, 0, 3);
      const int64_t end = std::min(kc, p0 + kBurst);
      for (int64_t p = p0; p < end; ++p) step(p);
    }
  } else {
    for (int64_t p = 0; p < kc; ++p) step(p);
  }
#pragma GCC unroll 16
  for (int j = 0; j < kNr; ++j)
#pragma GCC unroll 2
    for (int v = 0; v < kVectors; ++v) Store<V>(c + j * ldc + v * kWidth, acc[j][v]);
}

#define PERFORATE_AVX512 "avx512f,avx512vl,avx512dq,avx512bw,fma,avx2"
#define PERFORATE_AVX2 "avx2,fma"

// One instantiation of the micro-kernel per ISA, vector count, tile width and prefetching, each
// compiled for its ISA.
#define PERFORATE_KERNEL(name, isa, V, vectors, nr, prefetch)                                               \
  __attribute__((target(isa))) void name(int64_t kc, const float* a, const float* const* rows,              \
                                         const int32_t* positions, float* c, int64_t ldc, bool first) {     \
    MicroKernel<V, vectors, nr, prefetch>(kc, a, rows, positions, c, ldc, first);                           \
  }
#define PERFORATE_KERNELS(prefix, isa, V, nr)                                     \
  PERFORATE_KERNEL(prefix##x1, isa, V, 1, nr, false)                              \
  PERFORATE_KERNEL(prefix##x2, isa, V, 2, nr, false)                              \
  PERFORATE_KERNEL(prefix##Halfx1, isa, V, 1, nr / 2, false)                      \
  PERFORATE_KERNEL(prefix##Halfx2, isa, V, 2, nr / 2, false)                      \
  PERFORATE_KERNEL(prefix##Prefetchx1, isa, V, 1, nr, true)                       \
  PERFORATE_KERNEL(prefix##Prefetchx2, isa, V, 2, nr, true)                       \
  PERFORATE_KERNEL(prefix##PrefetchHalfx1, isa, V, 1, nr / 2, true)               \
  PERFORATE_KERNEL(prefix##PrefetchHalfx2, isa, V, 2, nr / 2, true)               \
  constexpr GemmIsa::KernelTable prefix##Table = {{                                                         \
      {{{{prefix##x1, prefix##Prefetchx1}}, {{prefix##Halfx1, prefix##PrefetchHalfx1}}}},                    \
      {{{{prefix##x2, prefix##Prefetchx2}}, {{prefix##Halfx2, prefix##PrefetchHalfx2}}}}}};

PERFORATE_KERNELS(Avx512, PERFORATE_AVX512, Vec16, 12)
PERFORATE_KERNELS(Avx2, PERFORATE_AVX2, Vec8, 6)

template <Activation kAct>
__attribute__((always_inline)) inline float ActivateScalar(float v, const Epilogue& e) {
  if (kAct == Activation::kRelu) return std::max(v, 0.0f);
  if (kAct == Activation::kLeakyRelu) return v < 0.0f ? e.alpha * v : v;
  if (kAct == Activation::kClip) return std::min(std::max(v, e.clip_min), e.clip_max);
  return v;
}

// The columns [k0, columns) that do not fill a whole register block.
template <Activation kAct>
__attribute__((always_inline)) inline void StoreTail(const float* __restrict tile, int64_t ldt, int64_t rows,
                                                     int64_t k0, int64_t columns, const Epilogue& e,
                                                     float* __restrict out, int64_t ldo) {
  for (int64_t m = 0; m < rows; ++m) {
    const float b = e.bias ? e.bias[m] : 0.0f;
    for (int64_t k = k0; k < columns; ++k) out[m * ldo + k] = ActivateScalar<kAct>(tile[k * ldt + m] + b, e);
  }
}

template <Activation kAct>
__attribute__((target(PERFORATE_AVX512), always_inline)) inline __m512 Activate512(__m512 v, const Epilogue& e) {
  if (kAct == Activation::kRelu) return _mm512_max_ps(v, _mm512_setzero_ps());
  if (kAct == Activation::kLeakyRelu)
    return _mm512_mask_mul_ps(v, _mm512_cmp_ps_mask(v, _mm512_setzero_ps(), _CMP_LT_OQ), v, _mm512_set1_ps(e.alpha));
  if (kAct == Activation::kClip)
    return _mm512_min_ps(_mm512_max_ps(v, _mm512_set1_ps(e.clip_min)), _mm512_set1_ps(e.clip_max));
  return v;
}

// r[k] = row k of a 16 x 16 block -> r[m] = column m.
__attribute__((target(PERFORATE_AVX512), always_inline)) inline void Transpose16(__m512 r[16]) {
  __m512 t[16], u[16];
  for (int i = 0; i < 8; ++i) {
    t[2 * i] = _mm512_unpacklo_ps(r[2 * i], r[2 * i + 1]);
    t[2 * i + 1] = _mm512_unpackhi_ps(r[2 * i], r[2 * i + 1]);
  }
  // u[4i + c], 128-bit lane l: rows 4i..4i+3 of column 4l + c.
  for (int i = 0; i < 4; ++i) {
    const __m512d a = _mm512_castps_pd(t[4 * i]), b = _mm512_castps_pd(t[4 * i + 1]);
    const __m512d c = _mm512_castps_pd(t[4 * i + 2]), d = _mm512_castps_pd(t[4 * i + 3]);
    u[4 * i] = _mm512_castpd_ps(_mm512_unpacklo_pd(a, c));
    u[4 * i + 1] = _mm512_castpd_ps(_mm512_unpackhi_pd(a, c));
    u[4 * i + 2] = _mm512_castpd_ps(_mm512_unpacklo_pd(b, d));
    u[4 * i + 3] = _mm512_castpd_ps(_mm512_unpackhi_pd(b, d));
  }
  for (int c = 0; c < 4; ++c) {
    const __m512 v0 = _mm512_shuffle_f32x4(u[c], u[4 + c], 0x88), v1 = _mm512_shuffle_f32x4(u[c], u[4 + c], 0xDD);
    const __m512 v2 = _mm512_shuffle_f32x4(u[8 + c], u[12 + c], 0x88);
    const __m512 v3 = _mm512_shuffle_f32x4(u[8 + c], u[12 + c], 0xDD);
    r[c] = _mm512_shuffle_f32x4(v0, v2, 0x88);
    r[8 + c] = _mm512_shuffle_f32x4(v0, v2, 0xDD);
    r[4 + c] = _mm512_shuffle_f32x4(v1, v3, 0x88);
    r[12 + c] = _mm512_shuffle_f32x4(v1, v3, 0xDD);
  }
}

template <Activation kAct>
__attribute__((target(PERFORATE_AVX512))) void StoreAvx512(const float* __restrict tile, int64_t ldt, int64_t rows,
                                                           int64_t columns, const Epilogue& e, float* __restrict out,
                                                           int64_t ldo) {
  int64_t k0 = 0;
  for (; k0 + 16 <= columns; k0 += 16)
    for (int64_t m0 = 0; m0 < rows; m0 += 16) {
      __m512 r[16];
      for (int k = 0; k < 16; ++k) r[k] = _mm512_loadu_ps(tile + (k0 + k) * ldt + m0);
      Transpose16(r);
      const int mn = static_cast<int>(std::min<int64_t>(16, rows - m0));
      for (int m = 0; m < mn; ++m) {
        const __m512 b = _mm512_set1_ps(e.bias ? e.bias[m0 + m] : 0.0f);
        _mm512_storeu_ps(out + (m0 + m) * ldo + k0, Activate512<kAct>(_mm512_add_ps(r[m], b), e));
      }
    }
  // The last columns (fewer than 16): the same transposes, stored under a mask (small perforated layers
  // have few columns, and a scalar tail cost them up to 2%).
  const int64_t tail = columns - k0;
  if (tail == 0) return;
  const __mmask16 valid = static_cast<__mmask16>((1u << tail) - 1);
  for (int64_t m0 = 0; m0 < rows; m0 += 16) {
    __m512 r[16];
    for (int k = 0; k < 16; ++k) r[k] = k < tail ? _mm512_loadu_ps(tile + (k0 + k) * ldt + m0) : _mm512_setzero_ps();
    Transpose16(r);
    const int mn = static_cast<int>(std::min<int64_t>(16, rows - m0));
    for (int m = 0; m < mn; ++m) {
      const __m512 b = _mm512_set1_ps(e.bias ? e.bias[m0 + m] : 0.0f);
      _mm512_mask_storeu_ps(out + (m0 + m) * ldo + k0, valid, Activate512<kAct>(_mm512_add_ps(r[m], b), e));
    }
  }
}

template <Activation kAct>
__attribute__((target(PERFORATE_AVX2), always_inline)) inline __m256 Activate256(__m256 v, const Epilogue& e) {
  if (kAct == Activation::kRelu) return _mm256_max_ps(v, _mm256_setzero_ps());
  if (kAct == Activation::kLeakyRelu)
    return _mm256_blendv_ps(v, _mm256_mul_ps(v, _mm256_set1_ps(e.alpha)), _mm256_cmp_ps(v, _mm256_setzero_ps(), _CMP_LT_OQ));
  if (kAct == Activation::kClip)
    return _mm256_min_ps(_mm256_max_ps(v, _mm256_set1_ps(e.clip_min)), _mm256_set1_ps(e.clip_max));
  return v;
}

__attribute__((target(PERFORATE_AVX2), always_inline)) inline void Transpose8(__m256 r[8]) {
  __m256 t[8], u[8];
  for (int i = 0; i < 4; ++i) {
    t[2 * i] = _mm256_unpacklo_ps(r[2 * i], r[2 * i + 1]);
    t[2 * i + 1] = _mm256_unpackhi_ps(r[2 * i], r[2 * i + 1]);
  }
  for (int i = 0; i < 2; ++i) {
    u[4 * i] = _mm256_shuffle_ps(t[4 * i], t[4 * i + 2], _MM_SHUFFLE(1, 0, 1, 0));
    u[4 * i + 1] = _mm256_shuffle_ps(t[4 * i], t[4 * i + 2], _MM_SHUFFLE(3, 2, 3, 2));
    u[4 * i + 2] = _mm256_shuffle_ps(t[4 * i + 1], t[4 * i + 3], _MM_SHUFFLE(1, 0, 1, 0));
    u[4 * i + 3] = _mm256_shuffle_ps(t[4 * i + 1], t[4 * i + 3], _MM_SHUFFLE(3, 2, 3, 2));
  }
  for (int c = 0; c < 4; ++c) {
    r[c] = _mm256_permute2f128_ps(u[c], u[4 + c], 0x20);
    r[4 + c] = _mm256_permute2f128_ps(u[c], u[4 + c], 0x31);
  }
}

template <Activation kAct>
__attribute__((target(PERFORATE_AVX2))) void StoreAvx2(const float* __restrict tile, int64_t ldt, int64_t rows,
                                                       int64_t columns, const Epilogue& e, float* __restrict out,
                                                       int64_t ldo) {
  int64_t k0 = 0;
  for (; k0 + 8 <= columns; k0 += 8)
    for (int64_t m0 = 0; m0 < rows; m0 += 8) {
      __m256 r[8];
      for (int k = 0; k < 8; ++k) r[k] = _mm256_loadu_ps(tile + (k0 + k) * ldt + m0);
      Transpose8(r);
      const int mn = static_cast<int>(std::min<int64_t>(8, rows - m0));
      for (int m = 0; m < mn; ++m) {
        const __m256 b = _mm256_set1_ps(e.bias ? e.bias[m0 + m] : 0.0f);
        _mm256_storeu_ps(out + (m0 + m) * ldo + k0, Activate256<kAct>(_mm256_add_ps(r[m], b), e));
      }
    }
  StoreTail<kAct>(tile, ldt, rows, k0, columns, e, out, ldo);
}

// One entry point per ISA, dispatching on the activation so each loop is specialised for it.
template <template <Activation> class Impl>
void DispatchStore(const float* tile, int64_t ldt, int64_t rows, int64_t columns, const Epilogue& e, float* out,
                   int64_t ldo) {
  switch (e.activation) {
    case Activation::kNone:
      return Impl<Activation::kNone>::Run(tile, ldt, rows, columns, e, out, ldo);
    case Activation::kRelu:
      return Impl<Activation::kRelu>::Run(tile, ldt, rows, columns, e, out, ldo);
    case Activation::kLeakyRelu:
      return Impl<Activation::kLeakyRelu>::Run(tile, ldt, rows, columns, e, out, ldo);
    case Activation::kClip:
      return Impl<Activation::kClip>::Run(tile, ldt, rows, columns, e, out, ldo);
  }
}
template <Activation kAct>
struct Avx512Store {
  static void Run(const float* t, int64_t ldt, int64_t r, int64_t c, const Epilogue& e, float* o, int64_t ldo) {
    StoreAvx512<kAct>(t, ldt, r, c, e, o, ldo);
  }
};
template <Activation kAct>
struct Avx2Store {
  static void Run(const float* t, int64_t ldt, int64_t r, int64_t c, const Epilogue& e, float* o, int64_t ldo) {
    StoreAvx2<kAct>(t, ldt, r, c, e, o, ldo);
  }
};

// The same false positive, as -Wuninitialized, where the activations' intrinsics inline into these tiles.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wuninitialized"

// Positions along the vector (ChannelMajorGemm): kRows output channels x kVectors vectors of 16
// positions, accumulated over the whole patch in registers, then stored straight into Yc's rows. The
// last vector holds `last` lanes.
template <Activation kAct, int kRows, int kVectors>
__attribute__((target(PERFORATE_AVX512))) void ChannelMajorTile(const float* __restrict w, int64_t patch,
                                                                const float* const* __restrict xrows, int64_t k0,
                                                                __mmask16 last, const Epilogue& e,
                                                                float* __restrict out, int64_t ldo) {
  __m512 acc[kRows][kVectors];
#pragma GCC unroll 4
  for (int r = 0; r < kRows; ++r)
#pragma GCC unroll 6
    for (int v = 0; v < kVectors; ++v) acc[r][v] = _mm512_setzero_ps();
  for (int64_t p = 0; p < patch; ++p) {
    const float* x = xrows[p] + k0;
    __m512 xv[kVectors];
#pragma GCC unroll 6
    for (int v = 0; v < kVectors; ++v)
      xv[v] = v + 1 < kVectors ? _mm512_loadu_ps(x + 16 * v) : _mm512_maskz_loadu_ps(last, x + 16 * v);
#pragma GCC unroll 4
    for (int r = 0; r < kRows; ++r) {
      const __m512 wv = _mm512_set1_ps(w[r * patch + p]);
#pragma GCC unroll 6
      for (int v = 0; v < kVectors; ++v) acc[r][v] = _mm512_fmadd_ps(wv, xv[v], acc[r][v]);
    }
  }
#pragma GCC unroll 4
  for (int r = 0; r < kRows; ++r) {
    const __m512 b = _mm512_set1_ps(e.bias ? e.bias[r] : 0.0f);
#pragma GCC unroll 6
    for (int v = 0; v < kVectors; ++v) {
      const __m512 y = Activate512<kAct>(_mm512_add_ps(acc[r][v], b), e);
      if (v + 1 < kVectors)
        _mm512_storeu_ps(out + r * ldo + k0 + 16 * v, y);
      else
        _mm512_mask_storeu_ps(out + r * ldo + k0 + 16 * v, last, y);
    }
  }
}

constexpr int kChannelMajorRows = 4, kChannelMajorVectors = 6;

template <Activation kAct, int kRows>
void ChannelMajorRows(const float* w, int64_t patch, const float* const* xrows, int64_t columns, const Epilogue& e,
                      float* out, int64_t ldo) {
  constexpr int64_t kBlock = 16 * kChannelMajorVectors;
  int64_t k0 = 0;
  for (; k0 + kBlock <= columns; k0 += kBlock)
    ChannelMajorTile<kAct, kRows, kChannelMajorVectors>(w, patch, xrows, k0, 0xFFFF, e, out, ldo);
  const int64_t rest = columns - k0;
  if (rest == 0) return;
  const int vectors = static_cast<int>((rest + 15) / 16);  // at most kChannelMajorVectors
  const __mmask16 last = static_cast<__mmask16>(rest % 16 ? (1u << (rest % 16)) - 1 : 0xFFFF);
  switch (vectors) {
    case 1: return ChannelMajorTile<kAct, kRows, 1>(w, patch, xrows, k0, last, e, out, ldo);
    case 2: return ChannelMajorTile<kAct, kRows, 2>(w, patch, xrows, k0, last, e, out, ldo);
    case 3: return ChannelMajorTile<kAct, kRows, 3>(w, patch, xrows, k0, last, e, out, ldo);
    case 4: return ChannelMajorTile<kAct, kRows, 4>(w, patch, xrows, k0, last, e, out, ldo);
    case 5: return ChannelMajorTile<kAct, kRows, 5>(w, patch, xrows, k0, last, e, out, ldo);
    default: return ChannelMajorTile<kAct, kRows, kChannelMajorVectors>(w, patch, xrows, k0, last, e, out, ldo);
  }
}

template <Activation kAct>
void ChannelMajor(const float* w, int64_t patch, int64_t rows, const float* const* xrows, int64_t columns,
                  const Epilogue& e, float* out, int64_t ldo) {
  for (int64_t m0 = 0; m0 < rows; m0 += kChannelMajorRows) {
    Epilogue at = e;
    if (e.bias) at.bias = e.bias + m0;
    const float* wm = w + m0 * patch;
    float* om = out + m0 * ldo;
    switch (std::min<int64_t>(kChannelMajorRows, rows - m0)) {
      case 1: ChannelMajorRows<kAct, 1>(wm, patch, xrows, columns, at, om, ldo); break;
      case 2: ChannelMajorRows<kAct, 2>(wm, patch, xrows, columns, at, om, ldo); break;
      case 3: ChannelMajorRows<kAct, 3>(wm, patch, xrows, columns, at, om, ldo); break;
      default: ChannelMajorRows<kAct, kChannelMajorRows>(wm, patch, xrows, columns, at, om, ldo); break;
    }
  }
}

#pragma GCC diagnostic pop

GemmIsa Detect() {
  const std::string forced = std::getenv("ONNX_PERFORATE_GEMM") ? std::getenv("ONNX_PERFORATE_GEMM") : "";
  if (forced == "openblas") return {};
  __builtin_cpu_init();
  if (forced != "avx2" && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl") &&
      __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512bw"))
    return {"avx512", 16, 12, Avx512Table, DispatchStore<Avx512Store>};
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma"))
    return {"avx2", 8, 6, Avx2Table, DispatchStore<Avx2Store>};
  return {};
}

}  // namespace

const GemmIsa& BestGemmIsa() {
  static const GemmIsa isa = Detect();
  return isa;
}

std::shared_ptr<const PackedWeights> PackWeights(const float* w, int64_t group, int64_t rows, int64_t patch,
                                                 const GemmIsa& isa) {
  auto packed = std::make_shared<PackedWeights>();
  packed->group = group;
  packed->rows = rows;
  packed->patch = patch;
  // Two vectors per tile unless that would leave most of the last tile empty (e.g. 16 or 48 channels).
  const int64_t wide = 2 * isa.width;
  packed->vectors = (rows % wide == 0 || rows >= 3 * wide) ? 2 : 1;
  packed->mr = packed->vectors * isa.width;
  packed->panels = (rows + packed->mr - 1) / packed->mr;
  packed->data.assign(static_cast<size_t>(group * packed->panels * patch * packed->mr), 0.0f);
  for (int64_t g = 0; g < group; ++g)
    for (int64_t m = 0; m < rows; ++m) {
      const int64_t i = m / packed->mr, r = m % packed->mr;
      float* panel = packed->data.data() + ((g * packed->panels + i) * patch) * packed->mr;
      const float* src = w + (g * rows + m) * patch;
      for (int64_t p = 0; p < patch; ++p) panel[p * packed->mr + r] = src[p];
    }
  return packed;
}

void ChannelMajorGemm(const float* w, int64_t patch, int64_t rows, const float* const* xrows, int64_t columns,
                      const Epilogue& e, float* out, int64_t ldo) {
  switch (e.activation) {
    case Activation::kNone:
      return ChannelMajor<Activation::kNone>(w, patch, rows, xrows, columns, e, out, ldo);
    case Activation::kRelu:
      return ChannelMajor<Activation::kRelu>(w, patch, rows, xrows, columns, e, out, ldo);
    case Activation::kLeakyRelu:
      return ChannelMajor<Activation::kLeakyRelu>(w, patch, rows, xrows, columns, e, out, ldo);
    case Activation::kClip:
      return ChannelMajor<Activation::kClip>(w, patch, rows, xrows, columns, e, out, ldo);
  }
}

}  // namespace onnx_perforate
