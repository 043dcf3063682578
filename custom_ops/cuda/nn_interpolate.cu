// CUDA kernel of NNInterpolate (float32): y[plane, i] = yc[plane, index[i]].
//
// Threads run along the output positions (coalesced index reads and output writes; the yc reads are
// gathers within one plane, K floats that stay in L1/L2). Each thread keeps its index entry in a
// register and handles several planes, so the index is read once per thread, not once per plane.
#include <cuda_runtime.h>

#include <cstdint>

#include "kernels.h"

namespace {

constexpr int kThreads = 256;
constexpr int kPlanesPerThread = 4;

__global__ void __launch_bounds__(kThreads)
    NNInterpolateKernel(const float* __restrict__ yc, const int32_t* __restrict__ index, long long planes, int K,
                        int positions, float* __restrict__ y) {
  const int i = blockIdx.x * kThreads + threadIdx.x;
  if (i >= positions) return;
  const int src = __ldg(index + i);
  for (long long plane = blockIdx.y; plane < planes; plane += gridDim.y)
    y[plane * positions + i] = __ldg(yc + plane * K + src);
}

}  // namespace

extern "C" cudaError_t onnx_perforate_cuda_nn_interpolate(const float* yc, const int32_t* index, int64_t planes,
                                                        int K, int positions, float* y, cudaStream_t stream) {
  if (planes < 0 || K < 0 || positions < 0) return cudaErrorInvalidValue;
  if (planes == 0 || positions == 0) return cudaSuccess;
  if (K == 0 || !yc || !index || !y) return cudaErrorInvalidValue;
  long long grid_y = (planes + kPlanesPerThread - 1) / kPlanesPerThread;
  if (grid_y > 65535) grid_y = 65535;
  const dim3 grid(static_cast<unsigned>((positions + kThreads - 1) / kThreads), static_cast<unsigned>(grid_y));
  NNInterpolateKernel<<<grid, kThreads, 0, stream>>>(yc, index, planes, K, positions, y);
  return cudaGetLastError();
}
