// CPU math of CompactPool: pooling over a compact input through its window table (pool_geometry.h).
#pragma once

#include "../shared/pool_geometry.h"
#include "perforated_conv.h"

namespace onnx_perforate {

struct CompactPoolCpu {
  // x [planes, table.compact_size] -> y [planes, table.count].
  static void Compute(PoolMode mode, const PoolTable& table, int64_t planes, const float* x, float* y,
                      const ParallelRunner& parallel);
};

}  // namespace onnx_perforate
