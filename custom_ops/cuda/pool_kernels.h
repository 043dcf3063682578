// C entry points of the CUDA kernel of CompactPool (docs/ops.md), same rules as kernels.h: device
// pointers and a stream in, a cudaError_t out, work queued on `stream` only, no allocation, no
// synchronisation. Nothing here knows about ONNX Runtime.
#pragma once

#include <cuda_runtime_api.h>
#include <stddef.h>
#include <stdint.h>

#include "kernels.h"

#ifdef __cplusplus
extern "C" {
#endif

enum {
  ONNX_PERFORATE_POOL_MAX = 0,
  ONNX_PERFORATE_POOL_AVERAGE = 1,
};

// CompactPool: y [planes, count] from x [planes, K_in] (float32) through the window table of
// pool_geometry.h (device copies): output o reads entries[begin[o] .. begin[o + 1]) (int32, values in
// [0, K_in), at least one per output); max pooling takes their maximum, average pooling sums
// weights[j] * x[entries[j]] (weights NULL for max). The table is validated when it is built
// (onnx_perforate_build_pool_table), not here. planes = N*C.
ONNX_PERFORATE_CUDA_API cudaError_t onnx_perforate_cuda_compact_pool(const float* x, const int32_t* begin,
                                                                   const int32_t* entries, const float* weights,
                                                                   int mode, int64_t planes, int K_in, int count,
                                                                   float* y, cudaStream_t stream);

// Builds the window table on the host with the shared geometry code (BuildPoolTable), for harnesses
// (only in libonnx_perforate_cuda_kernels.so). x_index [in_h, in_w] int64 with values in [0, K_in);
// y_positions: `y_count` row-major output positions, or NULL for all. Call once with begin = NULL to
// get *count (outputs) and *entry_count, then with room for count + 1 begins, entry_count entries and
// (average) entry_count weights. pads = [top, left, bottom, right]. Returns 0, or nonzero with a
// message in error (error_size bytes, may be NULL).
ONNX_PERFORATE_CUDA_API int onnx_perforate_build_pool_table(
    int mode, int64_t kh, int64_t kw, int64_t stride_h, int64_t stride_w, const int64_t* pads, int64_t dilation_h,
    int64_t dilation_w, int ceil_mode, int count_include_pad, const int64_t* x_index, int64_t in_h, int64_t in_w,
    int64_t K_in, const int64_t* y_positions, int64_t y_count, int32_t* begin, int32_t* entries, float* weights,
    int64_t* count, int64_t* entry_count, int64_t* out_h, int64_t* out_w, char* error, size_t error_size);

#ifdef __cplusplus
}  // extern "C"
#endif
