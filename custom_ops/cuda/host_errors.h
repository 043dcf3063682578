// How the host helpers of libonnx_perforate_cuda_kernels.so report an exception through their C ABI.
#pragma once

#include <algorithm>
#include <cstring>
#include <exception>

namespace onnx_perforate {

// Copies e.what() into error (error_size bytes, NUL-terminated; error may be NULL) and returns 1.
inline int ReportHostError(const std::exception& e, char* error, size_t error_size) {
  if (error && error_size) {
    const size_t n = std::min(error_size - 1, std::strlen(e.what()));
    std::memcpy(error, e.what(), n);
    error[n] = '\0';
  }
  return 1;
}

}  // namespace onnx_perforate
