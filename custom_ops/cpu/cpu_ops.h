// ORT custom-op descriptors of the CPU kernels.
#pragma once

#include "../shared/ort_glue.h"
#include "perforated_conv.h"

namespace onnx_perforate {

void AddCpuOps(Ort::CustomOpDomain& domain);

// The quantized ops (perforated_qlinear_conv_op.cc), added by AddCpuOps.
void AddQuantizedCpuOps(Ort::CustomOpDomain& domain);

// ORT's intra-op thread pool as the kernels' ParallelRunner.
ParallelRunner MakeParallelRunner(const Ort::KernelContext& ctx);

}  // namespace onnx_perforate
