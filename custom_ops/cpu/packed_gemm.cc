#include "packed_gemm.h"

#include <cstdlib>
#include <cstring>
#include <string>

#pragma GCC diagnostic ignored "-Wpsabi"

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
template <typename V, int kVectors, int kNr>
__attribute__((always_inline)) inline void MicroKernel(int64_t kc, const float* __restrict a,
                                                       const float* const* __restrict rows,
                                                       const int32_t* __restrict positions, float* __restrict c,
                                                       int64_t ldc, bool first) {
  constexpr int kWidth = sizeof(V) / sizeof(float);
  constexpr int kMr = kVectors * kWidth;
  V acc[kNr][kVectors];
#pragma GCC unroll 16
  for (int j = 0; j < kNr; ++j)
#pragma GCC unroll 2
    for (int v = 0; v < kVectors; ++v)
      acc[j][v] = first ? V{} : Load<V>(c + j * ldc + v * kWidth);
  int64_t offset[kNr];
#pragma GCC unroll 16
  for (int j = 0; j < kNr; ++j) offset[j] = positions[j];
  for (int64_t p = 0; p < kc; ++p) {
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
  }
#pragma GCC unroll 16
  for (int j = 0; j < kNr; ++j)
#pragma GCC unroll 2
    for (int v = 0; v < kVectors; ++v) Store<V>(c + j * ldc + v * kWidth, acc[j][v]);
}

#define PERFORATE_AVX512 "avx512f,avx512vl,avx512dq,avx512bw,fma,avx2"
#define PERFORATE_AVX2 "avx2,fma"

// One instantiation of the micro-kernel per ISA, vector count and tile width, each compiled for its ISA.
#define PERFORATE_KERNEL(name, isa, V, vectors, nr)                                                         \
  __attribute__((target(isa))) void name(int64_t kc, const float* a, const float* const* rows,              \
                                         const int32_t* positions, float* c, int64_t ldc, bool first) {     \
    MicroKernel<V, vectors, nr>(kc, a, rows, positions, c, ldc, first);                                     \
  }

PERFORATE_KERNEL(KernelAvx512x1, PERFORATE_AVX512, Vec16, 1, 12)
PERFORATE_KERNEL(KernelAvx512x2, PERFORATE_AVX512, Vec16, 2, 12)
PERFORATE_KERNEL(HalfAvx512x1, PERFORATE_AVX512, Vec16, 1, 6)
PERFORATE_KERNEL(HalfAvx512x2, PERFORATE_AVX512, Vec16, 2, 6)
PERFORATE_KERNEL(KernelAvx2x1, PERFORATE_AVX2, Vec8, 1, 6)
PERFORATE_KERNEL(KernelAvx2x2, PERFORATE_AVX2, Vec8, 2, 6)
PERFORATE_KERNEL(HalfAvx2x1, PERFORATE_AVX2, Vec8, 1, 3)
PERFORATE_KERNEL(HalfAvx2x2, PERFORATE_AVX2, Vec8, 2, 3)

GemmIsa Detect() {
  const std::string forced = std::getenv("ONNX_PERFORATE_GEMM") ? std::getenv("ONNX_PERFORATE_GEMM") : "";
  if (forced == "openblas") return {};
  __builtin_cpu_init();
  if (forced != "avx2" && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl") &&
      __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512bw"))
    return {"avx512", 16, 12, KernelAvx512x1, KernelAvx512x2, HalfAvx512x1, HalfAvx512x2};
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma"))
    return {"avx2", 8, 6, KernelAvx2x1, KernelAvx2x2, HalfAvx2x1, HalfAvx2x2};
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

}  // namespace onnx_perforate
