// CPU math of NNInterpolate: Y[n, m, p] = Yc[n, m, index[p]].
#pragma once

#include <cstdint>
#include <memory>

#include "perforated_conv.h"

namespace onnx_perforate {

// The uint8 path's byte-permute plan: it depends on the index only, so callers with a constant index
// build it once (PlanBytes) and pass it to every Compute.
struct BytePermutePlan;

struct NNInterpolateCpu {
  // yc [planes, count], index [positions] (validated: values in [0, count)) -> y [planes, positions].
  static void Compute(int64_t planes, int64_t count, const int32_t* index, int64_t positions,
                      const float* yc, float* y, const ParallelRunner& parallel);
  // `plan`: PlanBytes(index, positions), or nullptr to plan within the call.
  static void Compute(int64_t planes, int64_t count, const int32_t* index, int64_t positions,
                      const uint8_t* yc, uint8_t* y, const ParallelRunner& parallel,
                      const BytePermutePlan* plan = nullptr);
  // nullptr where the CPU has no byte permutes (AVX-512 VBMI): the scalar gather needs no plan.
  static std::shared_ptr<const BytePermutePlan> PlanBytes(const int32_t* index, int64_t positions);
};

}  // namespace onnx_perforate
