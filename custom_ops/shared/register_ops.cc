// Entry point ORT calls when a session registers this library
// (SessionOptions.register_custom_ops_library / RegisterCustomOpsLibrary).
#include <mutex>

#include "../cpu/cpu_ops.h"
#include "ort_glue.h"
#ifdef ONNX_PERFORATE_WITH_CUDA
#include "../cuda/cuda_ops.h"
#endif

extern "C" __attribute__((visibility("default"))) OrtStatus* ORT_API_CALL
RegisterCustomOps(OrtSessionOptions* options, const OrtApiBase* api_base) {
  using namespace onnx_perforate;
  const OrtApi* api = api_base->GetApi(kOrtApiVersion);
  if (!api) {  // ORT older than 1.21: report through the oldest API table, which every release serves
    return api_base->GetApi(1)->CreateStatus(ORT_FAIL, "onnx_perforate needs onnxruntime >= 1.21 (C API 21)");
  }
  Ort::InitApi(api);
  static std::once_flag once;
  static Ort::CustomOpDomain* domain = nullptr;
  try {
    std::call_once(once, [] {
      domain = new Ort::CustomOpDomain(kDomain);  // lives as long as the process: sessions keep pointers
      AddCpuOps(*domain);
#ifdef ONNX_PERFORATE_WITH_CUDA
      AddCudaOps(*domain);
#endif
    });
    Ort::UnownedSessionOptions(options).Add(*domain);
  } catch (const std::exception& e) {
    return api->CreateStatus(ORT_FAIL, (std::string("onnx_perforate: ") + e.what()).c_str());
  }
  return nullptr;
}
