#include "compact_pool.h"

#include <algorithm>

namespace onnx_perforate {

namespace {

void MaxPlane(const PoolTable& t, const float* __restrict src, float* __restrict dst) {
  const int32_t* begin = t.begin.data();
  const int32_t* entries = t.entries.data();
  for (int64_t o = 0; o < t.count; ++o) {
    float m = src[entries[begin[o]]];
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
template <int W>
void MaxPlaneFixed(const PoolTable& t, const float* __restrict src, float* __restrict dst) {
  const int32_t* e = t.padded_entries.data();
  for (int64_t o = 0; o < t.count; ++o, e += W) {
    float m = src[e[0]];
    for (int j = 1; j < W; ++j) m = std::max(m, src[e[j]]);
    dst[o] = m;
  }
}

// kPlanes planes at once: each window's entries are read once for all of them (the loads of the table
// were half of the loop's), and the maxima are independent chains.
constexpr int kPlanesAtOnce = 8;

template <int W>
void MaxPlanesFixed(const PoolTable& t, const float* __restrict src, float* __restrict dst) {
  const int32_t* e = t.padded_entries.data();
  const int64_t k = t.compact_size, n = t.count;
  for (int64_t o = 0; o < n; ++o, e += W) {
    float m[kPlanesAtOnce];
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

using PlaneFn = void (*)(const PoolTable&, const float*, float*);

template <int W>
PlaneFn FixedFor(PoolMode mode, int width) {
  if constexpr (W > 9) {
    return nullptr;
  } else {
    if (width == W) return mode == PoolMode::kMax ? &MaxPlaneFixed<W> : &AveragePlaneFixed<W>;
    return FixedFor<W + 1>(mode, width);
  }
}

// The same for windows of any width (begin/entries).
void MaxPlanes(const PoolTable& t, const float* __restrict src, float* __restrict dst) {
  const int32_t* begin = t.begin.data();
  const int32_t* entries = t.entries.data();
  const int64_t k = t.compact_size, n = t.count;
  for (int64_t o = 0; o < n; ++o) {
    float m[kPlanesAtOnce];
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
PlaneFn ManyPlanesFor(PoolMode mode, int width) {
  if constexpr (W > 9) {
    return nullptr;
  } else {
    if (width == W) return mode == PoolMode::kMax ? &MaxPlanesFixed<W> : nullptr;
    return ManyPlanesFor<W + 1>(mode, width);
  }
}

}  // namespace

void CompactPoolCpu::Compute(PoolMode mode, const PoolTable& t, int64_t planes, const float* x, float* y,
                             const ParallelRunner& parallel) {
  if (planes == 0 || t.count == 0) return;
  // Windows of up to 9 distinct entries (3x3 pooling) run a fixed-width loop, unless padding them to
  // the widest window would add more than a third to the reads.
  PlaneFn plane = nullptr, many = nullptr;
  if (t.width <= 9 && 3 * t.count * t.width <= 4 * static_cast<int64_t>(t.entries.size())) {
    plane = FixedFor<1>(mode, t.width);
    many = ManyPlanesFor<1>(mode, t.width);
  }
  if (!plane) {
    plane = mode == PoolMode::kMax ? &MaxPlane : &AveragePlane;
    many = mode == PoolMode::kMax ? &MaxPlanes : nullptr;
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

}  // namespace onnx_perforate
