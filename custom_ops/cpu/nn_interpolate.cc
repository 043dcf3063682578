#include "nn_interpolate.h"

#include <immintrin.h>

#include <algorithm>
#include <climits>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

namespace onnx_perforate {

// Permute plans. The output positions are taken one 64-byte vector at a time (64 uint8 or 16 float
// lanes), and when a chunk's sources lie within two vectors of the compact plane (the rule for
// nearest-neighbour interpolation: consecutive positions read nearby computed ones), one two-source
// permute per plane (vpermi2b: AVX-512 VBMI; vpermi2ps: AVX-512F) replaces a vector's worth of scalar
// loads and stores. Chunks whose sources spread wider keep the scalar loop. Lane: uint8_t or int32_t,
// the permute's index type.
//
// A chunk whose sources fall into two such windows (random masks: a chunk's outputs read computed
// positions of two rows) takes two permutes and a masked blend. In the float gather, lanes whose index is
// negative come out zero (the padding of a convolution's input copied through its compact index); the
// byte gather takes validated indices only.
template <typename Lane>
struct PermutePlan {
  static constexpr int64_t kLanes = 64 / sizeof(Lane);
  std::vector<int32_t> base;      // per chunk: first source element, or -1 for a scalar chunk
  std::vector<int32_t> second;    // per chunk: first source element of the second window, or -1
  std::vector<uint64_t> from_second;  // per chunk: the lanes taken from the second window
  std::vector<uint64_t> kept;         // per chunk: the lanes with a source (the others are zero)
  std::vector<Lane> permutation;  // per chunk: kLanes source offsets from their window's base (bit log2(kLanes) picks the window's 2nd vector)
  // The chunks by kind, each kind in a loop of its own (mixed, their branches mispredicted often enough
  // to undo the permutes' gain): [0, singles) whole chunks in one window, [singles, singles + doubles)
  // whole chunks in two, then the rest (scalar chunks, the partial last one, windows that may overhang
  // the compact plane's end and need masked loads).
  std::vector<int32_t> order;
  int64_t singles = 0, doubles = 0;
};

namespace {

// A plain scalar loop: hardware gathers (AVX2/AVX-512) measured 5-15% slower on this Zen 4 class CPU.
template <typename T>
void GatherPlane(const T* __restrict src, const int32_t* __restrict index, int64_t n, T* __restrict dst) {
  for (int64_t p = 0; p < n; ++p) dst[p] = src[index[p]];
}

// gather_block(first, last) over blocks of planes of about 64 KiB of output per task: small enough to
// balance, large enough to amortise the dispatch.
template <typename T, typename GatherBlockFn>
void ForEachBlock(int64_t planes, int64_t positions, const ParallelRunner& parallel, GatherBlockFn gather_block) {
  if (planes == 0 || positions == 0) return;
  const int64_t per_task = std::max<int64_t>(1, int64_t{64 * 1024} / (positions * int64_t{sizeof(T)}));
  const int64_t tasks = (planes + per_task - 1) / per_task;
  RunMaybeSerially(parallel, planes * positions * int64_t{sizeof(T)} / 4, static_cast<size_t>(tasks), [&](size_t t) {
    const int64_t first = static_cast<int64_t>(t) * per_task, last = std::min(planes, first + per_task);
    gather_block(first, last);
  });
}

template <typename T>
void Interpolate(int64_t planes, int64_t count, const int32_t* index, int64_t positions, const T* yc, T* y,
                 const ParallelRunner& parallel) {
  ForEachBlock<T>(planes, positions, parallel, [&](int64_t first, int64_t last) {
    for (int64_t p = first; p < last; ++p) GatherPlane(yc + p * count, index, positions, y + p * positions);
  });
}

template <typename Lane>
PermutePlan<Lane> PlanChunks(const int32_t* index, int64_t positions) {
  constexpr int64_t kLanes = PermutePlan<Lane>::kLanes;
  const int64_t chunks = (positions + kLanes - 1) / kLanes;
  PermutePlan<Lane> plan;
  plan.base.assign(static_cast<size_t>(chunks), -1);
  plan.second.assign(static_cast<size_t>(chunks), -1);
  plan.from_second.assign(static_cast<size_t>(chunks), 0);
  plan.kept.assign(static_cast<size_t>(chunks), 0);
  plan.permutation.assign(static_cast<size_t>(chunks * kLanes), 0);
  for (int64_t c = 0; c < chunks; ++c) {
    const int32_t* first = index + c * kLanes;
    const int64_t n = std::min<int64_t>(kLanes, positions - c * kLanes);
    int32_t lo = INT32_MAX, hi = 0;
    for (int64_t j = 0; j < n; ++j) {
      if (first[j] < 0) continue;
      lo = std::min(lo, first[j]), hi = std::max(hi, first[j]);
      plan.kept[c] |= uint64_t{1} << j;
    }
    if (lo == INT32_MAX) lo = 0;  // all padding: any window, every lane zeroed
    // Window 1 starts at the lowest source; the sources beyond it must fit a second window.
    int32_t second = -1;
    for (int64_t j = 0; j < n; ++j)
      if (first[j] - lo >= 2 * kLanes && (second < 0 || first[j] < second)) second = first[j];
    if (second >= 0 && hi - second >= 2 * kLanes) continue;
    plan.base[c] = lo;
    plan.second[c] = second;
    for (int64_t j = 0; j < n; ++j) {
      if (first[j] < 0) continue;
      const bool far = first[j] - lo >= 2 * kLanes;
      if (far) plan.from_second[c] |= uint64_t{1} << j;
      plan.permutation[c * kLanes + j] = static_cast<Lane>(first[j] - (far ? second : lo));
    }
  }
  // Windows ending at or before the largest source + 1 (<= the compact plane's size) need no masks.
  const int64_t end = positions ? int64_t{std::max(0, *std::max_element(index, index + positions))} + 1 : 0;
  std::vector<int32_t> one, two, rest;
  for (int64_t c = 0; c < chunks; ++c) {
    const bool whole = (c + 1) * kLanes <= positions && plan.base[c] >= 0 && plan.base[c] + 2 * kLanes <= end &&
                       (plan.second[c] < 0 || plan.second[c] + 2 * kLanes <= end);
    (whole ? (plan.second[c] < 0 ? one : two) : rest).push_back(static_cast<int32_t>(c));
  }
  plan.singles = static_cast<int64_t>(one.size()), plan.doubles = static_cast<int64_t>(two.size());
  plan.order = one;
  plan.order.insert(plan.order.end(), two.begin(), two.end());
  plan.order.insert(plan.order.end(), rest.begin(), rest.end());
  return plan;
}

bool SlowerPathForced() {
  const char* env = std::getenv("ONNX_PERFORATE_GEMM");
  return env && (std::string(env) == "portable" || std::string(env) == "avx2" || std::string(env) == "openblas");
}

bool HaveVbmi() {
  static const bool have = [] {
    __builtin_cpu_init();
    return !SlowerPathForced() && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
           __builtin_cpu_supports("avx512vbmi");
  }();
  return have;
}

bool HaveAvx512() {
  static const bool have = [] {
    __builtin_cpu_init();
    return !SlowerPathForced() && __builtin_cpu_supports("avx512f");
  }();
  return have;
}

// The 32 floats from `from` (masked loads never touch floats past the plane's end, count, so the
// window may overhang it), permuted by `order`.
__attribute__((always_inline, target("avx512f"))) inline __m512 PermuteFloatWindow(const float* src, int64_t count,
                                                                                  int64_t from, __m512i order) {
  if (from + 32 <= count)
    return _mm512_permutex2var_ps(_mm512_loadu_ps(src + from), order, _mm512_loadu_ps(src + from + 16));
  auto valid = [&](int64_t at) {
    const int64_t k = std::max<int64_t>(0, std::min<int64_t>(16, count - at));
    return static_cast<__mmask16>((1u << k) - 1);
  };
  return _mm512_permutex2var_ps(_mm512_maskz_loadu_ps(valid(from), src + from), order,
                                _mm512_maskz_loadu_ps(valid(from + 16), src + from + 16));
}

// The same for 128 bytes.
__attribute__((always_inline, target("avx512f,avx512bw,avx512vbmi"))) inline __m512i PermuteByteWindow(
    const uint8_t* src, int64_t count, int64_t from, __m512i order) {
  auto valid = [&](int64_t at) {
    const int64_t k = std::max<int64_t>(0, std::min<int64_t>(64, count - at));
    return k == 64 ? ~__mmask64{0} : (__mmask64{1} << k) - 1;
  };
  return _mm512_permutex2var_epi8(_mm512_maskz_loadu_epi8(valid(from), src + from), order,
                                  _mm512_maskz_loadu_epi8(valid(from + 64), src + from + 64));
}

// The planes [0, planes) of a block (src planes `count` apart, dst planes `positions` apart), chunk by
// chunk: a chunk's permutation is loaded once for all the block's planes. Plane by plane, small maps
// (384 planes of 13x13 bytes: three chunks each) spent more on the loop and the plan's loads than on
// the permutes.
template <bool kOnePlane>
__attribute__((target("avx512f"))) void GatherFloatPlanes(const float* __restrict src, int64_t count,
                                                          const int32_t* __restrict index, int64_t positions,
                                                          const FloatPermutePlan& plan, int64_t block,
                                                          float* __restrict dst) {
  const int64_t planes = kOnePlane ? 1 : block;
  const int32_t* order = plan.order.data();
  const int64_t doubles_end = plan.singles + plan.doubles, chunks = static_cast<int64_t>(plan.order.size());
  for (int64_t i = 0; i < plan.singles; ++i) {
    const int64_t c = order[i], from = plan.base[c];
    const __m512i lanes = _mm512_loadu_si512(plan.permutation.data() + c * 16);
    const __mmask16 kept = static_cast<__mmask16>(plan.kept[c]);
    for (int64_t p = 0; p < planes; ++p) {
      const float* plane = src + p * count;
      _mm512_storeu_ps(dst + p * positions + c * 16,
                       _mm512_maskz_permutex2var_ps(kept, _mm512_loadu_ps(plane + from), lanes,
                                                    _mm512_loadu_ps(plane + from + 16)));
    }
  }
  for (int64_t i = plan.singles; i < doubles_end; ++i) {
    const int64_t c = order[i], from = plan.base[c], second = plan.second[c];
    const __m512i lanes = _mm512_loadu_si512(plan.permutation.data() + c * 16);
    const __mmask16 far_lanes = static_cast<__mmask16>(plan.from_second[c]);
    const __mmask16 kept = static_cast<__mmask16>(plan.kept[c]);
    for (int64_t p = 0; p < planes; ++p) {
      const float* plane = src + p * count;
      const __m512 near = _mm512_permutex2var_ps(_mm512_loadu_ps(plane + from), lanes, _mm512_loadu_ps(plane + from + 16));
      const __m512 far =
          _mm512_permutex2var_ps(_mm512_loadu_ps(plane + second), lanes, _mm512_loadu_ps(plane + second + 16));
      _mm512_storeu_ps(dst + p * positions + c * 16, _mm512_maskz_mov_ps(kept, _mm512_mask_blend_ps(far_lanes, near, far)));
    }
  }
  for (int64_t i = doubles_end; i < chunks; ++i) {
    const int64_t c = order[i], p0 = c * 16, n = std::min<int64_t>(16, positions - p0);
    const int64_t base = plan.base[c];
    const __m512i lanes = _mm512_loadu_si512(plan.permutation.data() + c * 16);
    for (int64_t p = 0; p < planes; ++p) {
      const float* plane = src + p * count;
      float* out = dst + p * positions;
      if (base < 0) {
        for (int64_t j = 0; j < n; ++j) out[p0 + j] = index[p0 + j] < 0 ? 0.0f : plane[index[p0 + j]];
        continue;
      }
      __m512 v = PermuteFloatWindow(plane, count, base, lanes);
      if (plan.second[c] >= 0)
        v = _mm512_mask_blend_ps(static_cast<__mmask16>(plan.from_second[c]), v,
                                 PermuteFloatWindow(plane, count, plan.second[c], lanes));
      _mm512_mask_storeu_ps(out + p0, static_cast<__mmask16>((1u << n) - 1),
                            _mm512_maskz_mov_ps(static_cast<__mmask16>(plan.kept[c]), v));
    }
  }
}

template <bool kOnePlane>
__attribute__((target("avx512f,avx512bw,avx512vbmi"))) void GatherBytePlanes(
    const uint8_t* __restrict src, int64_t count, const int32_t* __restrict index, int64_t positions,
    const BytePermutePlan& plan, int64_t block, uint8_t* __restrict dst) {
  const int64_t planes = kOnePlane ? 1 : block;
  const int32_t* order = plan.order.data();
  const int64_t doubles_end = plan.singles + plan.doubles, chunks = static_cast<int64_t>(plan.order.size());
  for (int64_t i = 0; i < plan.singles; ++i) {
    const int64_t c = order[i], from = plan.base[c];
    const __m512i lanes = _mm512_loadu_si512(plan.permutation.data() + c * 64);
    for (int64_t p = 0; p < planes; ++p) {
      const uint8_t* plane = src + p * count;
      _mm512_storeu_si512(dst + p * positions + c * 64,
                          _mm512_permutex2var_epi8(_mm512_loadu_si512(plane + from), lanes,
                                                   _mm512_loadu_si512(plane + from + 64)));
    }
  }
  for (int64_t i = plan.singles; i < doubles_end; ++i) {
    const int64_t c = order[i], from = plan.base[c], second = plan.second[c];
    const __m512i lanes = _mm512_loadu_si512(plan.permutation.data() + c * 64);
    for (int64_t p = 0; p < planes; ++p) {
      const uint8_t* plane = src + p * count;
      const __m512i near =
          _mm512_permutex2var_epi8(_mm512_loadu_si512(plane + from), lanes, _mm512_loadu_si512(plane + from + 64));
      const __m512i far =
          _mm512_permutex2var_epi8(_mm512_loadu_si512(plane + second), lanes, _mm512_loadu_si512(plane + second + 64));
      _mm512_storeu_si512(dst + p * positions + c * 64, _mm512_mask_blend_epi8(plan.from_second[c], near, far));
    }
  }
  for (int64_t i = doubles_end; i < chunks; ++i) {
    const int64_t c = order[i], p0 = c * 64, n = std::min<int64_t>(64, positions - p0);
    const int64_t base = plan.base[c];
    const __m512i lanes = _mm512_loadu_si512(plan.permutation.data() + c * 64);
    const __mmask64 stored = n == 64 ? ~__mmask64{0} : (__mmask64{1} << n) - 1;
    for (int64_t p = 0; p < planes; ++p) {
      const uint8_t* plane = src + p * count;
      uint8_t* out = dst + p * positions;
      if (base < 0) {
        for (int64_t j = 0; j < n; ++j) out[p0 + j] = plane[index[p0 + j]];
        continue;
      }
      __m512i v = PermuteByteWindow(plane, count, base, lanes);
      if (plan.second[c] >= 0)
        v = _mm512_mask_blend_epi8(plan.from_second[c], v, PermuteByteWindow(plane, count, plan.second[c], lanes));
      _mm512_mask_storeu_epi8(out + p0, stored, v);
    }
  }
}

}  // namespace

void NNInterpolateCpu::Compute(int64_t planes, int64_t count, const int32_t* index, int64_t positions,
                               const float* yc, float* y, const ParallelRunner& parallel,
                               const FloatPermutePlan* plan) {
  if (!plan) return Interpolate(planes, count, index, positions, yc, y, parallel);
  ForEachBlock<float>(planes, positions, parallel, [&](int64_t first, int64_t last) {
    // Large planes one by one (per_task is then 1): the loop over a block's planes cost them ~20%.
    if (last - first == 1)
      GatherFloatPlanes<true>(yc + first * count, count, index, positions, *plan, 1, y + first * positions);
    else
      GatherFloatPlanes<false>(yc + first * count, count, index, positions, *plan, last - first, y + first * positions);
  });
}

void NNInterpolateCpu::Compute(int64_t planes, int64_t count, const int32_t* index, int64_t positions,
                               const uint8_t* yc, uint8_t* y, const ParallelRunner& parallel,
                               const BytePermutePlan* given) {
  if (!HaveVbmi()) return Interpolate(planes, count, index, positions, yc, y, parallel);
  BytePermutePlan own;
  if (!given) own = PlanChunks<uint8_t>(index, positions);
  const BytePermutePlan& plan = given ? *given : own;
  ForEachBlock<uint8_t>(planes, positions, parallel, [&](int64_t first, int64_t last) {
    if (last - first == 1)
      GatherBytePlanes<true>(yc + first * count, count, index, positions, plan, 1, y + first * positions);
    else
      GatherBytePlanes<false>(yc + first * count, count, index, positions, plan, last - first, y + first * positions);
  });
}

std::shared_ptr<const BytePermutePlan> NNInterpolateCpu::PlanBytes(const int32_t* index, int64_t positions) {
  if (!HaveVbmi()) return nullptr;
  return std::make_shared<const BytePermutePlan>(PlanChunks<uint8_t>(index, positions));
}

std::shared_ptr<const FloatPermutePlan> NNInterpolateCpu::PlanFloats(const int32_t* index, int64_t positions) {
  if (!HaveAvx512()) return nullptr;
  return std::make_shared<const FloatPermutePlan>(PlanChunks<int32_t>(index, positions));
}

}  // namespace onnx_perforate
