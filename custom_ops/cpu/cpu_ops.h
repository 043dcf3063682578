// ORT custom-op descriptors of the CPU kernels.
#pragma once

#include <memory>
#include <mutex>

#include "../shared/ort_glue.h"
#include "perforated_conv.h"

namespace onnx_perforate {

void AddCpuOps(Ort::CustomOpDomain& domain);

// The quantized ops (perforated_qlinear_conv_op.cc), added by AddCpuOps.
void AddQuantizedCpuOps(Ort::CustomOpDomain& domain);

// PerforatedQLinearConv on CUDAExecutionProvider: a registration whose kernel creation fails naming the
// node (there is no CUDA kernel), added by AddCudaOps.
void AddQuantizedCudaRefusal(Ort::CustomOpDomain& domain);

// Packed weights of a convolution kernel: packed once when the weights are an initializer, on every
// call otherwise. The first packing is kept even when it is null (a strategy that reads W unpacked).
template <typename Packed>
class PackedWeightsCache {
 public:
  void SetConstant(bool constant) { constant_ = constant; }

  template <typename Pack>
  std::shared_ptr<const Packed> Get(Pack&& pack) {
    if (!constant_) return pack();
    std::lock_guard<std::mutex> lock(mutex_);
    if (!ready_) {
      packed_ = pack();
      ready_ = true;
    }
    return packed_;
  }

 private:
  bool constant_ = false;
  bool ready_ = false;
  std::mutex mutex_;
  std::shared_ptr<const Packed> packed_;
};

// ORT's intra-op thread pool as the kernels' ParallelRunner.
ParallelRunner MakeParallelRunner(const Ort::KernelContext& ctx);

}  // namespace onnx_perforate
