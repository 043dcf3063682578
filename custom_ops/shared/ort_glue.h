// ONNX Runtime glue shared by the CPU and CUDA kernels: attribute reading, tensor helpers and the
// conversion of OpError into an ORT status. Host-compiler only (the ORT C++ headers are not nvcc-safe).
//
// The library never links libonnxruntime: the API table comes from the OrtApiBase* that ORT hands to
// RegisterCustomOps (ORT_API_MANUAL_INIT), at version kOrtApiVersion, so that one build loads in every
// ORT release from 1.21 on.
#pragma once

#define ORT_API_MANUAL_INIT
#include <onnxruntime_cxx_api.h>
#undef ORT_API_MANUAL_INIT

#include <cstdint>
#include <string>
#include <vector>

#include "conv_geometry.h"

namespace onnx_perforate {

constexpr const char* kDomain = "onnx_perforate";
constexpr int kOrtApiVersion = 21;  // the headers' version; newer runtimes serve older API tables

// Attribute access with defaults (ORT's C++ wrappers throw on a missing attribute).
class KernelAttributes {
 public:
  KernelAttributes(const OrtApi& api, const OrtKernelInfo* info) : api_(api), info_(info) {}
  int64_t Int(const char* name, int64_t fallback) const;
  float Float(const char* name, float fallback) const;
  std::string String(const char* name, const std::string& fallback) const;
  std::vector<int64_t> Ints(const char* name) const;  // empty when absent
  std::string NodeName() const;

 private:
  const OrtApi& api_;
  const OrtKernelInfo* info_;
};

// Reads and validates PerforatedConv's Conv-style attributes.
ConvAttributes ReadConvAttributes(const KernelAttributes& attrs);

std::vector<int64_t> ShapeOf(const Ort::ConstValue& value);

// The mask input (bool or uint8) as 0/1 bytes.
std::vector<uint8_t> ReadMask(const Ort::ConstValue& mask);

// Builds the status ORT reports for a failed kernel: "<Op> node '<name>': <message>".
OrtStatusPtr MakeError(const OrtApi& api, const char* op, const std::string& node, const std::string& message);

// Runs body, turning exceptions into an error status that names the op and the node.
template <typename Body>
OrtStatusPtr Guarded(const OrtApi& api, const char* op, const std::string& node, Body&& body) {
  try {
    body();
    return nullptr;
  } catch (const std::exception& e) {
    return MakeError(api, op, node, e.what());
  } catch (...) {
    return MakeError(api, op, node, "unknown error");
  }
}

}  // namespace onnx_perforate
