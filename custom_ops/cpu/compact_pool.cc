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

}  // namespace

void CompactPoolCpu::Compute(PoolMode mode, const PoolTable& t, int64_t planes, const float* x, float* y,
                             const ParallelRunner& parallel) {
  if (planes == 0 || t.count == 0) return;
  // About 16 K table entries per task, as NNInterpolate: balanced, yet worth a dispatch.
  const int64_t per_plane = std::max<int64_t>(1, static_cast<int64_t>(t.entries.size()));
  const int64_t per_task = std::max<int64_t>(1, (16 * 1024) / per_plane);
  const int64_t tasks = (planes + per_task - 1) / per_task;
  RunMaybeSerially(parallel, planes * per_plane, static_cast<size_t>(tasks), [&](size_t task) {
    const int64_t first = static_cast<int64_t>(task) * per_task, last = std::min(planes, first + per_task);
    for (int64_t p = first; p < last; ++p) {
      if (mode == PoolMode::kMax)
        MaxPlane(t, x + p * t.compact_size, y + p * t.count);
      else
        AveragePlane(t, x + p * t.compact_size, y + p * t.count);
    }
  });
}

}  // namespace onnx_perforate
