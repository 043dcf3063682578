// Host helpers of libonnx_perforate_cuda_kernels.so for harnesses that load it with ctypes: CUDA error
// messages and the gather table, built by the shared geometry code (not re-implemented).
#include <cuda_runtime_api.h>

#include <algorithm>
#include <cstring>
#include <exception>
#include <string>

#include "../shared/conv_geometry.h"
#include "host_errors.h"
#include "kernels.h"
#include "launch_plan.h"

extern "C" {

ONNX_PERFORATE_CUDA_API const char* onnx_perforate_cuda_error_string(int error) {
  return cudaGetErrorString(static_cast<cudaError_t>(error));
}

ONNX_PERFORATE_CUDA_API int onnx_perforate_cuda_conv_launch(int N, int C, int M, int group, int kh, int kw, int K,
                                                           int sms, int big_blocks_per_sm, int deterministic,
                                                           int* splits) {
  if (N < 0 || C < 0 || M < 0 || K < 0 || kh < 1 || kw < 1 || group < 1 || C % group || M % group || sms < 1)
    return -1;
  const onnx_perforate::ConvLaunch launch = onnx_perforate::ChooseConvLaunch(
      N, C, M, group, static_cast<long long>(kh) * kw, K, sms, big_blocks_per_sm, deterministic != 0);
  if (splits) *splits = launch.splits;
  return static_cast<int>(launch.kernel);
}

ONNX_PERFORATE_CUDA_API int onnx_perforate_build_gather_table(
    int64_t in_h, int64_t in_w, int64_t kh, int64_t kw, int64_t stride_h, int64_t stride_w, int64_t pad_top,
    int64_t pad_left, int64_t pad_bottom, int64_t pad_right, int64_t dilation_h, int64_t dilation_w,
    const uint8_t* mask, int64_t mask_h, int64_t mask_w, int32_t* offsets, int64_t* count, char* error,
    size_t error_size) {
  using namespace onnx_perforate;
  try {
    ConvAttributes a;
    a.kernel_h = kh;
    a.kernel_w = kw;
    a.stride_h = stride_h;
    a.stride_w = stride_w;
    a.pad_top = pad_top;
    a.pad_left = pad_left;
    a.pad_bottom = pad_bottom;
    a.pad_right = pad_right;
    a.dilation_h = dilation_h;
    a.dilation_w = dilation_w;
    // Channels and batch do not enter the table: one image of one channel stands for all.
    const ConvShape shape = ComputeConvShape({1, 1, in_h, in_w}, {1, 1, kh, kw}, nullptr, a);
    if (!mask) throw OpError("mask is NULL");
    const MaskPositions positions = ComputeMaskPositions(mask, {mask_h, mask_w}, shape.out_h, shape.out_w);
    if (count) *count = positions.count();
    if (offsets) {
      const GatherTable table = BuildGatherTable(shape, a, positions);
      std::memcpy(offsets, table.offsets.data(), table.offsets.size() * sizeof(int32_t));
    }
    return 0;
  } catch (const std::exception& e) {
    return ReportHostError(e, error, error_size);
  }
}

}  // extern "C"
