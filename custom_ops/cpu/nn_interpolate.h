// CPU math of NNInterpolate: Y[n, m, p] = Yc[n, m, index[p]].
#pragma once

#include <cstdint>
#include <memory>

#include "parallel.h"

namespace onnx_perforate {

// The permute plans of the uint8 and float paths (nn_interpolate.cc): they depend on the index only, so
// callers with a constant index build them once (PlanBytes, PlanFloats) and pass them to every Compute.
template <typename Lane>
struct PermutePlan;
using BytePermutePlan = PermutePlan<uint8_t>;
using FloatPermutePlan = PermutePlan<int32_t>;

struct NNInterpolateCpu {
  // yc [planes, count], index [positions] (validated: values in [0, count)) -> y [planes, positions].
  static void Compute(int64_t planes, int64_t count, const int32_t* index, int64_t positions,
                      const float* yc, float* y, const ParallelRunner& parallel,
                      const FloatPermutePlan* plan = nullptr);
  // float: `plan` = PlanFloats(index, positions), or nullptr for the scalar gather. With a plan, index
  // entries may also be negative: those positions come out 0 (a convolution's padding, BuildPaddedGather).
  // uint8: `plan` = PlanBytes(index, positions), or nullptr to plan within the call.
  static void Compute(int64_t planes, int64_t count, const int32_t* index, int64_t positions,
                      const uint8_t* yc, uint8_t* y, const ParallelRunner& parallel,
                      const BytePermutePlan* plan = nullptr);
  // nullptr where the CPU has no byte permutes (AVX-512 VBMI): the scalar gather needs no plan.
  static std::shared_ptr<const BytePermutePlan> PlanBytes(const int32_t* index, int64_t positions);
  // nullptr where the CPU has no AVX-512 (or a slower path is forced): the scalar gather is used.
  static std::shared_ptr<const FloatPermutePlan> PlanFloats(const int32_t* index, int64_t positions);
};

}  // namespace onnx_perforate
