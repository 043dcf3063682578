// Host helper of libonnx_perforate_cuda_kernels.so for CompactPool: the window table, built by the
// shared geometry code (not re-implemented by harnesses).
#include <algorithm>
#include <cstring>
#include <exception>
#include <vector>

#include "../shared/pool_geometry.h"
#include "host_errors.h"
#include "pool_kernels.h"

extern "C" {

ONNX_PERFORATE_CUDA_API int onnx_perforate_build_pool_table(
    int mode, int64_t kh, int64_t kw, int64_t stride_h, int64_t stride_w, const int64_t* pads, int64_t dilation_h,
    int64_t dilation_w, int ceil_mode, int count_include_pad, const int64_t* x_index, int64_t in_h, int64_t in_w,
    int64_t K_in, const int64_t* y_positions, int64_t y_count, int32_t* begin, int32_t* entries, float* weights,
    int64_t* count, int64_t* entry_count, int64_t* out_h, int64_t* out_w, char* error, size_t error_size) {
  using namespace onnx_perforate;
  try {
    if (!pads || !x_index) throw OpError("pads and x_index are required");
    PoolAttributes a;
    if (mode != ONNX_PERFORATE_POOL_MAX && mode != ONNX_PERFORATE_POOL_AVERAGE)
      throw OpError("mode " + std::to_string(mode) + " is neither max (0) nor average (1)");
    a.mode = mode == ONNX_PERFORATE_POOL_MAX ? PoolMode::kMax : PoolMode::kAverage;
    a.kernel_h = kh, a.kernel_w = kw, a.stride_h = stride_h, a.stride_w = stride_w;
    a.pad_top = pads[0], a.pad_left = pads[1], a.pad_bottom = pads[2], a.pad_right = pads[3];
    a.dilation_h = dilation_h, a.dilation_w = dilation_w;
    a.ceil_mode = ceil_mode != 0, a.count_include_pad = count_include_pad != 0;
    const InputIndex index = ReadInputIndex(x_index, {in_h, in_w}, {1, 1, K_in});
    const PoolTable t = BuildPoolTable(a, index, y_positions, y_count);
    if (count) *count = t.count;
    if (entry_count) *entry_count = static_cast<int64_t>(t.entries.size());
    if (out_h) *out_h = t.out_h;
    if (out_w) *out_w = t.out_w;
    if (begin) std::memcpy(begin, t.begin.data(), t.begin.size() * sizeof(int32_t));
    if (begin && entries) std::memcpy(entries, t.entries.data(), t.entries.size() * sizeof(int32_t));
    if (begin && weights && !t.weights.empty()) std::memcpy(weights, t.weights.data(), t.weights.size() * sizeof(float));
    return 0;
  } catch (const std::exception& e) {
    return ReportHostError(e, error, error_size);
  }
}

}  // extern "C"
