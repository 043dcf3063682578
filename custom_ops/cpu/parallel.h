// How the CPU kernels run their tasks: on the caller's thread pool, or serially when the work is too
// small to pay for waking it; and the per-thread scratch buffers the tasks write into.
#pragma once

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <functional>
#include <thread>
#include <vector>

namespace onnx_perforate {

// Runs fn(i) for every i in [0, total) on the caller's thread pool (ORT's intra-op pool in the glue).
using ParallelRunner = std::function<void(size_t total, const std::function<void(size_t)>& fn)>;

// Memory-bound passes touching fewer floats than this run on the calling thread: waking the pool
// (tens of microseconds when its threads do not spin) would cost more than the copy.
constexpr int64_t kSerialFloats = 1 << 17;

// Runs fn(i) for every i in [0, total) on the calling thread (a ParallelRunner for work already inside
// one of the pool's tasks).
inline void RunSerially(size_t total, const std::function<void(size_t)>& fn) {
  for (size_t i = 0; i < total; ++i) fn(i);
}

inline void RunMaybeSerially(const ParallelRunner& parallel, int64_t floats, size_t total,
                             const std::function<void(size_t)>& fn) {
  if (floats < kSerialFloats) {
    RunSerially(total, fn);
  } else {
    parallel(total, fn);
  }
}

// The cores of this machine (what the kernels size their task counts by; ORT's pool may use fewer).
inline int64_t Cores() {
  static const int64_t cores = std::max(1u, std::thread::hardware_concurrency());
  return cores;
}

// A per-thread scratch buffer (a thread_local vector) grown to at least `size` elements.
template <typename T>
T* Scratch(std::vector<T>& buffer, size_t size) {
  if (buffer.size() < size) buffer.resize(size);
  return buffer.data();
}

}  // namespace onnx_perforate
