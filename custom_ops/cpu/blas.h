// The single-precision GEMM used by the CPU PerforatedConv: OpenBLAS from the `scipy-openblas32` wheel,
// loaded at run time (dlopen) rather than linked, so that
//  - OPENBLAS_CORETYPE can be set before OpenBLAS initialises (its runtime CPU detection can fall back
//    to AVX2 kernels on AVX-512 CPUs it does not know), and
//  - the custom-op library loads in any process and reports a clear error if OpenBLAS is missing.
#pragma once

namespace onnx_perforate {

struct Blas {
  // Row-major C = A * B (alpha 1, beta 0): A [m, k] lda, B [k, n] ldb, C [m, n] ldc. Single-threaded:
  // parallelism comes from ORT's intra-op thread pool around the calls.
  void Sgemm(int m, int n, int k, const float* a, int lda, const float* b, int ldb, float* c, int ldc) const;
  using SgemmFn = void (*)(int, int, int, int, int, int, float, const float*, int, const float*, int, float,
                           float*, int);
  SgemmFn sgemm = nullptr;
};

// Loads OpenBLAS once (thread-safe); throws OpError with the paths it tried when it cannot.
const Blas& GetBlas();

}  // namespace onnx_perforate
