// CPU math of CompactPool: pooling over a compact input through its window table (pool_geometry.h).
#pragma once

#include "../shared/pool_geometry.h"
#include "parallel.h"

namespace onnx_perforate {

struct CompactPoolCpu {
  // x [planes, table.compact_size] -> y [planes, table.count].
  static void Compute(PoolMode mode, const PoolTable& table, int64_t planes, const float* x, float* y,
                      const ParallelRunner& parallel);
  // 8-bit inputs (quantized models): x [batch, channels, table.compact_size] -> y [batch, channels,
  // table.count], max pooling only (OpError otherwise): the maximum of quantized values is the quantized
  // maximum. With AVX-512BW the channels are pooled channels-last, 64 per instruction.
  static void Compute(PoolMode mode, const PoolTable& table, int64_t batch, int64_t channels, const uint8_t* x,
                      uint8_t* y, const ParallelRunner& parallel);
  static void Compute(PoolMode mode, const PoolTable& table, int64_t batch, int64_t channels, const int8_t* x,
                      int8_t* y, const ParallelRunner& parallel);
};

}  // namespace onnx_perforate
