// Shape arithmetic and the window table of CompactPool (MaxPool / AveragePool reading a compact input
// through its producer's interpolation index), shared by the CPU and CUDA kernels. Nothing here knows
// about ONNX Runtime.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "conv_geometry.h"

namespace onnx_perforate {

enum class PoolMode { kMax, kAverage };

PoolMode ParsePoolMode(const std::string& name);

// CompactPool's attributes (ONNX MaxPool / AveragePool, 2-D, explicit pads), validated.
struct PoolAttributes {
  PoolMode mode = PoolMode::kMax;
  int64_t kernel_h = 0, kernel_w = 0;
  int64_t stride_h = 1, stride_w = 1;
  int64_t pad_top = 0, pad_left = 0, pad_bottom = 0, pad_right = 0;
  int64_t dilation_h = 1, dilation_w = 1;
  bool ceil_mode = false;
  bool count_include_pad = false;
  // Throws OpError naming the attribute that is wrong.
  void Validate() const;
};

// ONNX pooling output size along one axis (ceil_mode: a last window must start inside the input or
// its leading padding, as in ONNX Runtime).
int64_t PoolOutputSize(int64_t in, int64_t kernel, int64_t stride, int64_t pad_begin, int64_t pad_end,
                       int64_t dilation, bool ceil_mode);

// For every computed output o (all Ho*Wo positions in row-major order, or the given Y_positions):
// the distinct compact input entries read by its window, entries[begin[o] .. begin[o + 1]).
// Max pooling takes their maximum; average pooling sums weights[j] * X[entries[j]], where weights[j]
// is (how many window pixels show that entry) / (the window's divisor, see count_include_pad).
struct PoolTable {
  int64_t in_h = 0, in_w = 0, compact_size = 0;
  int64_t out_h = 0, out_w = 0;
  int64_t count = 0;             // computed outputs per plane
  std::vector<int32_t> begin;    // [count + 1]
  std::vector<int32_t> entries;  // compact indices in [0, compact_size)
  std::vector<float> weights;    // average only, parallel to entries
  // The same windows padded to one width (the widest window), output-major [count * width], for
  // branch-free CPU loops: a max window repeats its first entry, an average window adds weight 0.
  int32_t width = 0;
  std::vector<int32_t> padded_entries;
  std::vector<float> padded_weights;  // average only
};

// `index`: the validated X_index (ReadInputIndex). `y_positions` (nullable): the row-major output
// positions to compute, `y_count` of them, each in [0, Ho*Wo). Throws OpError for an empty output, a
// window that covers only padding, or a Y_positions value out of range.
PoolTable BuildPoolTable(const PoolAttributes& attrs, const InputIndex& index, const int64_t* y_positions,
                         int64_t y_count);

}  // namespace onnx_perforate
