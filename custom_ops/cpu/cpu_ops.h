// ORT custom-op descriptors of the CPU kernels.
#pragma once

#include "../shared/ort_glue.h"

namespace onnx_perforate {

void AddCpuOps(Ort::CustomOpDomain& domain);

}  // namespace onnx_perforate
