// ORT custom-op descriptors of the CUDA kernels (CUDAExecutionProvider). Host compiler only: the ORT
// C++ headers are not nvcc-safe, so the kernels are reached through the C entry points of kernels.h.
#pragma once

#include "../shared/ort_glue.h"

namespace onnx_perforate {

// Adds PerforatedConv and NNInterpolate for CUDAExecutionProvider (same names, domain and version as
// the CPU ops; ORT picks the kernel by the execution provider a node is assigned to).
void AddCudaOps(Ort::CustomOpDomain& domain);

}  // namespace onnx_perforate
