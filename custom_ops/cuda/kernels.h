// C entry points of the CUDA kernels of PerforatedConv and NNInterpolate.
//
// Plain C ABI (device pointers in, a stream in, a cudaError_t out) so that the same kernels serve the
// ORT custom ops (cuda_ops.cc) and, through ctypes, the PyTorch test harness and benchmark
// (libonnx_perforate_cuda_kernels.so). Nothing here knows about ONNX Runtime.
//
// Rules every entry point follows:
//  * work is queued on `stream` only (never the legacy default stream unless stream == 0 is passed);
//  * no device-wide or stream synchronisation, no allocation: callers own every buffer;
//  * a launch error is returned (cudaGetLastError right after the launch); errors of the kernel's
//    execution surface, as usual, at the caller's next synchronisation.
#pragma once

#include <cuda_runtime_api.h>
#include <stddef.h>
#include <stdint.h>

#if defined(__GNUC__)
#define ONNX_PERFORATE_CUDA_API __attribute__((visibility("default")))
#else
#define ONNX_PERFORATE_CUDA_API
#endif

#ifdef __cplusplus
extern "C" {
#endif

// Same order as onnx_perforate::Activation (conv_geometry.h).
enum {
  ONNX_PERFORATE_ACTIVATION_NONE = 0,
  ONNX_PERFORATE_ACTIVATION_RELU = 1,
  ONNX_PERFORATE_ACTIVATION_LEAKY_RELU = 2,
  ONNX_PERFORATE_ACTIVATION_CLIP = 3,
};

// PerforatedConv: yc [N, M, K] = activation(conv(x, w) + b) at the K computed positions.
//   x [N, C, H, W], w [M, C/group, kh, kw], b [M] or NULL, all float32 on the device.
//   gather_offsets: device int32 [kh*kw, K], the GatherTable of conv_geometry.h: offsets[tap*K + k]
//   is iy*W + ix of the pixel read by tap (= i*kw + j) for position k, or -1 for padding. Strides,
//   pads, dilations and the mask are all encoded in this table.
// Plain FP32 FMA arithmetic (no TF32). Large problems with little parallelism split the reduction
// across blocks and add the partial sums with atomics (the output is then zeroed first on `stream`),
// which makes the last bits of the result depend on the order of those additions; set
// ONNX_PERFORATE_CUDA_DETERMINISTIC=1 in the environment (read once) to disable the split.
ONNX_PERFORATE_CUDA_API cudaError_t onnx_perforate_cuda_perforated_conv(
    const float* x, const float* w, const float* b, const int32_t* gather_offsets, int N, int C, int H, int W,
    int M, int group, int kh, int kw, int K, int activation, float alpha, float clip_min, float clip_max,
    float* yc, cudaStream_t stream);

// NNInterpolate: y [planes, positions] with y[p, i] = yc[p, index[i]].
//   yc [planes, K] float32, index int32 [positions] with values in [0, K) (not checked here: the
//   callers validate the index once when they build it), planes = N*M, positions = Ho*Wo.
ONNX_PERFORATE_CUDA_API cudaError_t onnx_perforate_cuda_nn_interpolate(const float* yc, const int32_t* index,
                                                                     int64_t planes, int K, int positions,
                                                                     float* y, cudaStream_t stream);

// Which kernel onnx_perforate_cuda_perforated_conv launches (host code only: no GPU needed), for a
// device with `sms` multiprocessors that holds `big_blocks_per_sm` big-tile blocks each at once.
// Returns one of ONNX_PERFORATE_CUDA_CONV_* (or -1 for arguments the launch would reject) and sets
// *splits (may be NULL) to the number of reduction splits (1: none).
enum {
  ONNX_PERFORATE_CUDA_CONV_NOTHING = 0,     // an empty output
  ONNX_PERFORATE_CUDA_CONV_BIAS_ONLY = 1,   // C == 0: activation(bias)
  ONNX_PERFORATE_CUDA_CONV_DIRECT = 2,      // one thread per computed position
  ONNX_PERFORATE_CUDA_CONV_SMALL_TILES = 3, // 32 x 64 GEMM tiles (maybe with split reduction)
  ONNX_PERFORATE_CUDA_CONV_BIG_TILES = 4,   // 64 x 128 GEMM tiles
};
ONNX_PERFORATE_CUDA_API int onnx_perforate_cuda_conv_launch(int N, int C, int M, int group, int kh, int kw, int K,
                                                           int sms, int big_blocks_per_sm, int deterministic,
                                                           int* splits);

// The current device's values for the launch choice above: multiprocessors and big-tile blocks per
// multiprocessor (occupancy). Returns the CUDA error when there is no usable device.
ONNX_PERFORATE_CUDA_API cudaError_t onnx_perforate_cuda_device_conv_config(int* sms, int* big_blocks_per_sm);

// The message of a cudaError_t, for harnesses that do not link cudart themselves (only in
// libonnx_perforate_cuda_kernels.so).
ONNX_PERFORATE_CUDA_API const char* onnx_perforate_cuda_error_string(int error);

// Builds the gather table on the host with the shared geometry code (BuildGatherTable), so that the
// harness does not re-implement it. in_h/in_w: input size; mask [mask_h, mask_w] 0/1 bytes, which must be
// the convolution's output size. offsets: room for kh*kw*mask_h*mask_w int32, or NULL to query K only.
// Returns 0 and sets *count = K, or nonzero with a message in error (error_size bytes, may be NULL).
ONNX_PERFORATE_CUDA_API int onnx_perforate_build_gather_table(
    int64_t in_h, int64_t in_w, int64_t kh, int64_t kw, int64_t stride_h, int64_t stride_w, int64_t pad_top,
    int64_t pad_left, int64_t pad_bottom, int64_t pad_right, int64_t dilation_h, int64_t dilation_w,
    const uint8_t* mask, int64_t mask_h, int64_t mask_w, int32_t* offsets, int64_t* count, char* error,
    size_t error_size);

#ifdef __cplusplus
}  // extern "C"
#endif
