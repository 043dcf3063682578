// CUDA kernel of CompactPool (float32): pooling of a compact input through its window table.
//
// Threads run along the outputs of a plane (coalesced table reads and output writes; the x reads are
// gathers within one plane of K_in floats, which stays in L1/L2). Each thread keeps its window bounds
// in registers and handles several planes, so the table is read once per thread, not once per plane.
#include <cuda_runtime.h>

#include <cstdint>

#include "pool_kernels.h"

namespace {

constexpr int kThreads = 256;
constexpr int kPlanesPerThread = 4;

template <bool kAverage>
__global__ void __launch_bounds__(kThreads)
    CompactPoolKernel(const float* __restrict__ x, const int32_t* __restrict__ begin,
                      const int32_t* __restrict__ entries, const float* __restrict__ weights, long long planes,
                      int K_in, int count, float* __restrict__ y) {
  const int o = blockIdx.x * kThreads + threadIdx.x;
  if (o >= count) return;
  const int first = __ldg(begin + o), last = __ldg(begin + o + 1);
  for (long long plane = blockIdx.y; plane < planes; plane += gridDim.y) {
    const float* src = x + plane * K_in;
    float acc;
    if (kAverage) {
      acc = 0.0f;
      for (int j = first; j < last; ++j) acc = fmaf(__ldg(weights + j), __ldg(src + __ldg(entries + j)), acc);
    } else {
      acc = __ldg(src + __ldg(entries + first));
      for (int j = first + 1; j < last; ++j) acc = fmaxf(acc, __ldg(src + __ldg(entries + j)));
    }
    y[plane * count + o] = acc;
  }
}

}  // namespace

extern "C" cudaError_t onnx_perforate_cuda_compact_pool(const float* x, const int32_t* begin, const int32_t* entries,
                                                      const float* weights, int mode, int64_t planes, int K_in,
                                                      int count, float* y, cudaStream_t stream) {
  if (planes < 0 || K_in < 0 || count < 0) return cudaErrorInvalidValue;
  if (mode != ONNX_PERFORATE_POOL_MAX && mode != ONNX_PERFORATE_POOL_AVERAGE) return cudaErrorInvalidValue;
  if (planes == 0 || count == 0) return cudaSuccess;
  if (K_in == 0 || !x || !begin || !entries || !y) return cudaErrorInvalidValue;
  if (mode == ONNX_PERFORATE_POOL_AVERAGE && !weights) return cudaErrorInvalidValue;
  long long grid_y = (planes + kPlanesPerThread - 1) / kPlanesPerThread;
  if (grid_y > 65535) grid_y = 65535;
  const dim3 grid(static_cast<unsigned>((count + kThreads - 1) / kThreads), static_cast<unsigned>(grid_y));
  if (mode == ONNX_PERFORATE_POOL_AVERAGE)
    CompactPoolKernel<true><<<grid, kThreads, 0, stream>>>(x, begin, entries, weights, planes, K_in, count, y);
  else
    CompactPoolKernel<false><<<grid, kThreads, 0, stream>>>(x, begin, entries, weights, planes, K_in, count, y);
  return cudaGetLastError();
}
