#include "nn_interpolate.h"

#include <immintrin.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

namespace onnx_perforate {

// uint8 planes (after PerforatedQLinearConv) with AVX-512 VBMI byte permutes: the output positions are
// taken 64 at a time, and when a chunk's sources lie within 128 bytes of the compact plane (the rule for
// nearest-neighbour interpolation: 64 consecutive positions are about one output row), one vpermi2b per
// plane replaces 64 scalar loads and stores. Chunks whose sources spread wider keep the scalar loop.
struct BytePermutePlan {
  std::vector<int32_t> base;  // per chunk: first source byte, or -1 for a scalar chunk
  std::vector<uint8_t> permutation;  // per chunk: 64 source offsets from base (bit 6 selects the 2nd half)
};

namespace {

// A plain scalar loop: hardware gathers (AVX2/AVX-512) measured 5-15% slower on this Zen 4 class CPU.
template <typename T>
void GatherPlane(const T* __restrict src, const int32_t* __restrict index, int64_t n, T* __restrict dst) {
  for (int64_t p = 0; p < n; ++p) dst[p] = src[index[p]];
}

template <typename T>
void Interpolate(int64_t planes, int64_t count, const int32_t* index, int64_t positions, const T* yc, T* y,
                 const ParallelRunner& parallel) {
  if (planes == 0 || positions == 0) return;
  // About 64 KiB of output per task: small enough to balance, large enough to amortise the dispatch.
  const int64_t per_task = std::max<int64_t>(1, (16 * 1024) / positions);
  const int64_t tasks = (planes + per_task - 1) / per_task;
  RunMaybeSerially(parallel, planes * positions, static_cast<size_t>(tasks), [&](size_t t) {
    const int64_t first = static_cast<int64_t>(t) * per_task, last = std::min(planes, first + per_task);
    for (int64_t p = first; p < last; ++p) GatherPlane(yc + p * count, index, positions, y + p * positions);
  });
}

bool HaveVbmi() {
  static const bool have = [] {
    const char* env = std::getenv("ONNX_PERFORATE_GEMM");  // forcing a slower GEMM path turns this off too
    if (env && (std::string(env) == "portable" || std::string(env) == "avx2" || std::string(env) == "openblas"))
      return false;
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
           __builtin_cpu_supports("avx512vbmi");
  }();
  return have;
}

BytePermutePlan PlanByteChunks(const int32_t* index, int64_t positions) {
  const int64_t chunks = (positions + 63) / 64;
  BytePermutePlan plan;
  plan.base.assign(static_cast<size_t>(chunks), -1);
  plan.permutation.assign(static_cast<size_t>(chunks * 64), 0);
  for (int64_t c = 0; c < chunks; ++c) {
    const int32_t* first = index + c * 64;
    const int64_t n = std::min<int64_t>(64, positions - c * 64);
    const auto [lo, hi] = std::minmax_element(first, first + n);
    if (*hi - *lo >= 128) continue;
    plan.base[c] = *lo;
    for (int64_t j = 0; j < n; ++j) plan.permutation[c * 64 + j] = static_cast<uint8_t>(first[j] - *lo);
  }
  return plan;
}

__attribute__((target("avx512f,avx512bw,avx512vbmi"))) void GatherBytePlane(
    const uint8_t* __restrict src, int64_t count, const int32_t* __restrict index, int64_t positions,
    const BytePermutePlan& plan, uint8_t* __restrict dst) {
  const int64_t chunks = static_cast<int64_t>(plan.base.size());
  for (int64_t c = 0; c < chunks; ++c) {
    const int64_t p0 = c * 64, n = std::min<int64_t>(64, positions - p0);
    const int64_t base = plan.base[c];
    if (base < 0) {
      for (int64_t j = 0; j < n; ++j) dst[p0 + j] = src[index[p0 + j]];
      continue;
    }
    // Masked loads never touch bytes past the plane's end (count), so the window may overhang it.
    auto valid = [&](int64_t from) -> __mmask64 {
      const int64_t k = std::max<int64_t>(0, std::min<int64_t>(64, count - from));
      return k == 64 ? ~__mmask64{0} : (__mmask64{1} << k) - 1;
    };
    const __m512i low = _mm512_maskz_loadu_epi8(valid(base), src + base);
    const __m512i high = _mm512_maskz_loadu_epi8(valid(base + 64), src + base + 64);
    const __m512i order = _mm512_loadu_si512(plan.permutation.data() + c * 64);
    const __m512i v = _mm512_permutex2var_epi8(low, order, high);
    const __mmask64 out = n == 64 ? ~__mmask64{0} : (__mmask64{1} << n) - 1;
    _mm512_mask_storeu_epi8(dst + p0, out, v);
  }
}

}  // namespace

void NNInterpolateCpu::Compute(int64_t planes, int64_t count, const int32_t* index, int64_t positions,
                               const float* yc, float* y, const ParallelRunner& parallel) {
  Interpolate(planes, count, index, positions, yc, y, parallel);
}

void NNInterpolateCpu::Compute(int64_t planes, int64_t count, const int32_t* index, int64_t positions,
                               const uint8_t* yc, uint8_t* y, const ParallelRunner& parallel,
                               const BytePermutePlan* given) {
  if (planes == 0 || positions == 0) return;
  if (!HaveVbmi()) {
    Interpolate(planes, count, index, positions, yc, y, parallel);
    return;
  }
  BytePermutePlan own;
  if (!given) own = PlanByteChunks(index, positions);
  const BytePermutePlan& plan = given ? *given : own;
  const int64_t per_task = std::max<int64_t>(1, (64 * 1024) / positions);  // about 64 KiB of output per task
  const int64_t tasks = (planes + per_task - 1) / per_task;
  RunMaybeSerially(parallel, planes * positions / 4, static_cast<size_t>(tasks), [&](size_t t) {
    const int64_t first = static_cast<int64_t>(t) * per_task, last = std::min(planes, first + per_task);
    for (int64_t p = first; p < last; ++p) GatherBytePlane(yc + p * count, count, index, positions, plan, y + p * positions);
  });
}

std::shared_ptr<const BytePermutePlan> NNInterpolateCpu::PlanBytes(const int32_t* index, int64_t positions) {
  if (!HaveVbmi()) return nullptr;
  return std::make_shared<const BytePermutePlan>(PlanByteChunks(index, positions));
}

}  // namespace onnx_perforate
