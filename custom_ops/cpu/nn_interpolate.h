// CPU math of NNInterpolate: Y[n, m, p] = Yc[n, m, index[p]].
#pragma once

#include <cstdint>

#include "perforated_conv.h"

namespace onnx_perforate {

struct NNInterpolateCpu {
  // yc [planes, count], index [positions] (validated: values in [0, count)) -> y [planes, positions].
  static void Compute(int64_t planes, int64_t count, const int32_t* index, int64_t positions,
                      const float* yc, float* y, const ParallelRunner& parallel);
  static void Compute(int64_t planes, int64_t count, const int32_t* index, int64_t positions,
                      const uint8_t* yc, uint8_t* y, const ParallelRunner& parallel);
};

}  // namespace onnx_perforate
